"""KonstructPlugin on a real worker: our errors reach workflows typed and not retried.

The worker here is built like `workers.main.build_worker` builds its own: from
a client connected by `konstruct.platform.temporal.client.connect`, passing no
interceptors, so what it gets comes from the client's plugin.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from konstruct.platform.errors import UnknownAgent

# Attempts per workflow id; the activities run in this process.
attempts: Counter[str] = Counter()


@activity.defn(name="plugin_test_raise")
async def raise_for(kind: str) -> None:
    attempts[activity.info().workflow_id or ""] += 1
    if kind == "ours":
        raise UnknownAgent("agent 'ghost' is not defined for tenant 'demo'; create it first")
    raise RuntimeError("not one of ours")


@workflow.defn(name="PluginTestRaise")
class RaiseInActivity:
    @workflow.run
    async def run(self, kind: str, local: bool) -> None:
        # Without the interceptor every error here would be retried three times.
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=10), maximum_attempts=3)
        timeout = timedelta(seconds=10)
        if local:
            # Each retry after a workflow timer, not in place in the SDK core: an
            # in-place retry leaves the earlier attempt's start-to-close timer running
            # (temporalio/sdk-rust#1454, in temporalio 1.35.0), and when it fires after
            # the worker has shut down the core panics ("receive half not dropped"),
            # printed to this process's stderr in the middle of the suite. (A zero
            # threshold is taken as unset: 1 ms, under the 10 ms backoff.)
            await workflow.execute_local_activity(
                raise_for,
                kind,
                start_to_close_timeout=timeout,
                retry_policy=retry,
                local_retry_threshold=timedelta(milliseconds=1),
            )
        else:
            await workflow.execute_activity(
                raise_for, kind, start_to_close_timeout=timeout, retry_policy=retry
            )


async def _failure(
    client: Client, task_queue: str, kind: str, local: bool
) -> tuple[ApplicationError, int]:
    """The error the workflow's activity failed with, and how many times it ran."""
    workflow_id = f"plugin-{kind}-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            RaiseInActivity.run, args=[kind, local], id=workflow_id, task_queue=task_queue
        )
    cause: BaseException | None = info.value.cause
    # A local activity's failure reaches the client without the ActivityError around it.
    if isinstance(cause, ActivityError):
        cause = cause.cause
    assert isinstance(cause, ApplicationError)
    return cause, attempts[workflow_id]


@pytest.mark.parametrize("local", [False, True], ids=["activity", "local_activity"])
async def test_a_konstruct_error_fails_at_once_with_its_type(
    client: Client, task_queue: str, local: bool
) -> None:
    async with Worker(
        client, task_queue=task_queue, workflows=[RaiseInActivity], activities=[raise_for]
    ):
        ours, ours_attempts = await _failure(client, task_queue, "ours", local)
        other, other_attempts = await _failure(client, task_queue, "other", local)
    assert ours.type == "UnknownAgent" and ours.non_retryable is True
    assert "ghost" in ours.message
    assert ours_attempts == 1
    # The failure ends at the mapped error (so workflows read its details through
    # innermost_application_error), and its trace still points at the activity.
    assert ours.cause is None
    assert ours.failure is not None and "raise_for" in ours.failure.stack_trace
    # Anything else is left to the retry policy.
    assert other.type == "RuntimeError" and other.non_retryable is False
    assert other_attempts == 3
