"""The server-side dispatch rate of a task queue (Temporal's task queue config API)."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import RateLimit, TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    UpdateTaskQueueConfigRequest,
)
from temporalio.client import Client

# Pushes whose callers stopped waiting, still running to their end.
_IN_FLIGHT: set[asyncio.Task[object]] = set()


async def push_rate(client: Client, queue: str, rps: float, reason: str = "") -> None:
    """Set the activity dispatch rate of `queue` on the Temporal server.

    A push already sent is never cancelled: a caller that is cancelled (an activity
    cancelled, a worker shutting down) stops waiting and the request runs to its end.
    The server's matching service writes a queue's config with a version check and
    keeps the version in memory; an update whose caller went away after the write
    leaves that memory one version behind, and every later update of the queue's
    config then fails ("Expected exactly one row to be updated") until the server
    reloads the queue. Seen as an experiment's `prepare` failing for 2 to 5 minutes
    (tests/test_limits_age.py, ci58: 334 s instead of 18 s)."""
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity=client.identity,
        task_queue=queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    request.update_queue_rate_limit.rate_limit.CopyFrom(RateLimit(requests_per_second=rps))
    request.update_queue_rate_limit.reason = reason or "konstruct adaptive rate"
    task: asyncio.Task[object] = asyncio.ensure_future(
        client.workflow_service.update_task_queue_config(request)
    )
    _IN_FLIGHT.add(task)
    task.add_done_callback(_forget)
    await asyncio.shield(task)


def _forget(task: asyncio.Task[object]) -> None:
    _IN_FLIGHT.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a caller that stopped waiting has no use for it


async def pushes_settled(timeout_s: float = 10.0) -> None:
    """Wait (up to `timeout_s`) for the pushes still in flight: a worker shutting down
    lets them land before its client goes."""
    if _IN_FLIGHT:
        await asyncio.wait(list(_IN_FLIGHT), timeout=timeout_s)


async def queue_rate(client: Client, queue: str) -> float | None:
    """The activity dispatch rate the server holds for `queue` (None: none set)."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_config=True,
        )
    )
    config = response.config
    if not config.HasField("queue_rate_limit"):
        return None
    return float(config.queue_rate_limit.rate_limit.requests_per_second)
