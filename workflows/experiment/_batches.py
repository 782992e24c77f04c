"""The Experiment workflow's batches: task calls of several items in one activity at high rates.

While a provider's rate is high (`ExperimentOptions.batch_*`), items to it are
gathered into one activity on its batch queue. What a batch settled is counted
here; what it handed back (a Retry-After, judges still to run, a batch that
failed for good) goes on the single-call path, `ItemRunning._run_item`.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

from workflows.experiment._item import ItemRunning
from workflows.experiment._options import pick_route

with workflow.unsafe.imports_passed_through():
    from activities.provider_batches import ProviderBatchActivities
    from konstruct.experiments.models import (
        BatchItem,
        BatchItemResult,
        PendingItem,
        RunBatchInput,
        RunBatchResult,
    )


class Batching(ItemRunning):
    def _batch_size(self, item: PendingItem) -> tuple[int, str]:
        """How many items go in one task activity to the item's provider now (1: no
        batch), from the provider's rate at the last monitor sample."""
        assert self._input is not None and self._carry is not None
        if not self._batching or not item.needs_task or self._input.task.agent is not None:
            return 1, ""  # an agent's item is one activity of its own
        provider = pick_route(self._carry.prepared.task_routes, item.item_id).provider
        rate = next((p.rate_rps for p in self._providers if p.provider == provider), 0.0)
        o = self._input.options
        if rate < o.batch_above_rps:
            return 1, provider
        # At least `_batches_in_flight` batches fit in `max_concurrency` (4; 8 in runs
        # before `FEWER_LARGER_BATCHES`): a batch is done
        # when its slowest call is, and one large batch at a time would stall the flow.
        in_flight_cap = self._input.max_concurrency // self._batches_in_flight
        size = min(o.batch_max_items, in_flight_cap, int(rate * o.batch_window_s))
        return max(2, size), provider

    def _dispatch_batches(self, gathered: dict[str, list[PendingItem]]) -> None:
        for provider, items in gathered.items():
            if items:
                self._calls_this_run += 1
                asyncio.create_task(self._run_batch(provider, items))
        gathered.clear()

    async def _run_batch(self, provider: str, items: list[PendingItem]) -> None:
        """Task calls of several items in one activity. What the batch settled is
        counted here; what it handed back goes on the single-call path."""
        assert self._input is not None and self._carry is not None
        inp, carry = self._input, self._carry
        by_id = {item.item_id: item for item in items}
        handed_over: set[str] = set()
        handle, key = self._start_call(
            ProviderBatchActivities.run_batch,
            RunBatchInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                provider=provider,
                items=[
                    BatchItem(
                        item_id=item.item_id,
                        deployment_id=pick_route(
                            carry.prepared.task_routes, item.item_id
                        ).deployment_id,
                        seq=item.seq,
                    )
                    for item in items
                ],
                max_attempts=inp.options.max_attempts,
            ),
            provider,
            f"batch:{items[0].item_id}",
            batch=True,
        )
        try:
            try:
                result: RunBatchResult = await handle
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, CancelledError):
                    return  # stopped before it ran: its items are still pending
                # The batch itself failed for good: each item goes the single way,
                # whose errors say what is wrong with it.
                for item in items:
                    handed_over.add(item.item_id)
                    asyncio.create_task(self._run_item(item))
                return
            for r in result.items:
                item = by_id[r.item_id]
                if r.status == "retry":
                    handed_over.add(item.item_id)
                    failed = None
                    if r.failed_kind is not None and self._batch_failures_count:
                        failed = (r.failed_kind, r.message or r.failed_kind)
                    asyncio.create_task(
                        self._run_item(item, delay_s=r.retry_in_s, failed_once=failed)
                    )
                elif r.status == "quota":
                    self._quota_spent(r.message or f"provider {provider!r} quota exceeded")
                elif r.status == "budget":
                    self._quota_spent(r.message or "a budget is spent", "budget")
                elif r.status in ("ok", "failed"):
                    if self._count_batch_result(item, r):
                        handed_over.add(item.item_id)
        finally:
            self._handles.pop(key, None)
            for item_id in by_id:
                if item_id not in handed_over:
                    self._in_flight.pop(item_id, None)

    def _count_batch_result(self, item: PendingItem, r: BatchItemResult) -> bool:
        """Count a stored result; True when its judges still run (on their own)."""
        if r.status == "failed":
            self._count_done(failed=True)
            return False
        self._count_task(r)
        if r.missing_evals:
            judged = PendingItem(
                seq=item.seq, item_id=item.item_id, needs_task=False, missing_evals=r.missing_evals
            )
            asyncio.create_task(self._run_item(judged))
            return True
        self._count_done(failed=False)
        return False
