"""The Experiment workflow's provider calls: started on their provider's queue, cancelled
while still waiting for capacity, and what their results add to the counters."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import Priority, RetryPolicy

from workflows.experiment._options import BATCH_TIMEOUT
from workflows.experiment._state import ExperimentState

with workflow.unsafe.imports_passed_through():
    from konstruct.experiments.models import (
        BatchItemResult,
        JudgeItemResult,
        PendingItem,
        Route,
        RunItemResult,
        attempts_left,
    )
    from konstruct.platform.naming import ProviderQueue


class Calls(ExperimentState):
    def _retry_policy(self, attempts_spent: int = 0) -> RetryPolicy:
        """`attempts_spent`: attempts the item already made elsewhere (a batch's call)."""
        assert self._input is not None
        o = self._input.options
        return RetryPolicy(
            initial_interval=timedelta(seconds=o.retry_initial_s),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=o.retry_max_s),
            maximum_attempts=max(1, o.max_attempts - attempts_spent) if o.max_attempts else 0,
        )

    def _attempts_left(self, attempts_spent: int) -> bool:
        """Whether an item that made `attempts_spent` attempts may make another."""
        assert self._input is not None
        return attempts_left(self._input.options.max_attempts, attempts_spent)

    def _start_call(
        self,
        method: Any,
        arg: Any,
        provider: str,
        key: str,
        batch: bool = False,
        long: bool = False,
        attempts_spent: int = 0,
    ) -> tuple[Any, str]:
        """`batch`: on the workflow's own queue (its worker starts it at once), or the
        provider's batch queue in runs recorded before `BATCHES_ON_WORKFLOW_QUEUE`;
        `batch` or `long` (an agent's item, many calls): as long as a batch may
        take, kept alive by its heartbeats."""
        assert self._input is not None
        o = self._input.options
        self._dispatched += 1
        activity_id = f"{key}#{self._dispatched}"
        own = workflow.info().task_queue
        queue = ProviderQueue(own, provider)
        if not batch:
            task_queue = queue.name
        else:
            task_queue = own if self._batches_on_own_queue else queue.batch_name
        handle = workflow.start_activity_method(
            method,
            arg,
            task_queue=task_queue,
            start_to_close_timeout=BATCH_TIMEOUT
            if batch or long
            else timedelta(seconds=o.call_timeout_s),
            heartbeat_timeout=timedelta(seconds=o.heartbeat_timeout_s),
            retry_policy=self._retry_policy(attempts_spent),
            activity_id=activity_id,
            # A stop cancels only calls still waiting for capacity; wait for the answer.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            priority=Priority(fairness_key=self._input.experiment_id),
        )
        self._handles[activity_id] = handle
        return handle, activity_id

    def _item_call(self, item: PendingItem, route: Route) -> dict[str, Any]:
        """What every single call of an item names: whose, which item (and its place
        in the dataset, which its row is looked up by), which deployment."""
        assert self._input is not None
        return {
            "tenant_id": self._input.tenant_id,
            "experiment_id": self._input.experiment_id,
            "item_id": item.item_id,
            "seq": item.seq,
            "deployment_id": route.deployment_id,
            "provider": route.provider,
        }

    def _cancel_calls(self, activity_ids: list[str]) -> None:
        for activity_id in activity_ids:
            handle = self._handles.get(activity_id)
            if handle is not None and not handle.done():
                handle.cancel()

    # --- counting ------------------------------------------------------------------

    def _count_cost(self, r: RunItemResult | BatchItemResult | JudgeItemResult) -> None:
        """What a call of this run cost, or saved by coming from the cache."""
        assert self._carry is not None
        carry = self._carry
        carry.cost_usd += r.cost_usd
        carry.cost_known = carry.cost_known and r.cost_known
        if r.cached:
            carry.cache_hits += 1
            carry.cost_saved_usd += r.saved_usd

    def _count_task(self, r: RunItemResult | BatchItemResult) -> None:
        """A task call that stored its output: its tokens and cost when it made a request."""
        assert self._carry is not None
        carry = self._carry
        carry.completed += 1
        if r.fresh:
            carry.prompt_tokens += r.prompt_tokens
            carry.completion_tokens += r.completion_tokens
            self._count_cost(r)

    def _count_done(self, failed: bool) -> None:
        """An item settled this run: evaluated (every eval scored) or failed."""
        assert self._carry is not None
        if failed:
            self._carry.failed += 1
        else:
            self._carry.evaluated += 1
        self._done_this_run += 1
