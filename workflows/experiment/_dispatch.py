"""The Experiment workflow's dispatch: page through pending items, start them within
`max_concurrency`, and settle the items left without a result at the end."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow

from workflows.experiment._batches import Batching
from workflows.experiment._options import (
    CANCEL_WAITING_BEFORE_NEW_RUN,
    SETTLE_PAUSES_S,
    db_call,
)

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from konstruct.experiments.models import (
        PendingItem,
        PendingPage,
        PendingPageInput,
        ResultCount,
        ResultCountInput,
        WaitingCalls,
        WaitingCallsInput,
    )


class Dispatching(Batching):
    async def _dispatch_pass(self) -> str:
        """Dispatch every pending item once; 'done', 'stopped', 'again' or 'continue_as_new'."""
        assert self._input is not None and self._carry is not None
        inp = self._input
        cursor = -1
        dispatched = 0
        outcome = "again"
        upcoming: Any = None
        if self._batching and self._batches_on_own_queue:
            # Whether an item goes in a batch follows the provider's rate, which the
            # monitor's first sample of the run brings: items dispatched before it went
            # one by one (a run continued as new every 10 activities on a loaded
            # machine: 100 single calls and 4 batches for 120 items).
            await workflow.wait_condition(lambda: self._monitor_tries > 0 or self._stop_requested)
        while outcome == "again":
            if upcoming is not None:
                page: PendingPage = await upcoming
            else:
                page = await self._pending_page(cursor)
            upcoming = None
            if not page.items:
                break
            if self._batching:
                # The next page is read while this one is dispatched: a page read
                # takes tens of ms, a dip of that at every page at 200 items/s.
                upcoming = asyncio.create_task(self._pending_page(page.items[-1].seq))
            # Items gathered into batches, per provider, not yet dispatched.
            gathered: dict[str, list[PendingItem]] = {}
            for item in page.items:
                if len(self._in_flight) >= inp.max_concurrency:
                    self._dispatch_batches(gathered)
                await workflow.wait_condition(
                    lambda: len(self._in_flight) < inp.max_concurrency or self._stop_requested
                )
                if self._stop_requested:
                    outcome = "stopped"
                    break
                if self._should_continue_as_new():
                    outcome = "continue_as_new"
                    break
                cursor = item.seq
                if item.item_id in self._in_flight:
                    continue
                self._in_flight[item.item_id] = True
                dispatched += 1
                size, provider = self._batch_size(item)
                if size <= 1:
                    self._calls_this_run += 1
                    asyncio.create_task(self._run_item(item))
                    continue
                batch = gathered.setdefault(provider, [])
                batch.append(item)
                if len(batch) >= size:
                    self._dispatch_batches({provider: gathered.pop(provider)})
            if outcome == "again":
                self._dispatch_batches(gathered)
            else:
                for batch in gathered.values():  # never sent: still pending
                    for item in batch:
                        self._in_flight.pop(item.item_id, None)
        if outcome == "continue_as_new" and workflow.patched(CANCEL_WAITING_BEFORE_NEW_RUN):
            await self._cancel_waiting_calls()
        await workflow.wait_condition(lambda: not self._in_flight)
        if outcome != "again":
            return outcome
        if self._stop_requested:
            return "stopped"
        return "again" if dispatched else "done"

    async def _pending_page(self, after_seq: int) -> PendingPage:
        assert self._input is not None
        inp = self._input
        return await db_call(
            ExperimentActivities.pending_page,
            PendingPageInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                after_seq=after_seq,
                limit=inp.options.page_size,
            ),
        )

    def _should_continue_as_new(self) -> bool:
        assert self._input is not None
        done = self._calls_this_run if self._batching else self._done_this_run
        return (
            done >= self._input.options.continue_as_new_every
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _cancel_waiting_calls(self) -> None:
        """Before continue-as-new: calls still queued for capacity go to the next run.

        Draining them here would leave the provider idle while the queue empties;
        cancelled before they start, they make no request, and their items, still
        without a result, are the next run's first page. Calls already started finish.
        """
        waiting: WaitingCalls = await db_call(
            ExperimentActivities.waiting_calls,
            WaitingCallsInput(workflow_id=workflow.info().workflow_id),
        )
        self._cancel_calls(waiting.activity_ids)

    async def _settle_unfinished(self) -> str:
        """'done' when PostgreSQL holds a result for every item; else 'again' (the
        next pass dispatches the items left without one), or, after the last
        pause, 'done' with `_unfinished` set: the experiment ends `incomplete`."""
        assert self._input is not None and self._carry is not None
        inp, carry = self._input, self._carry
        count: ResultCount = await db_call(
            ExperimentActivities.result_count,
            ResultCountInput(tenant_id=inp.tenant_id, experiment_id=inp.experiment_id),
        )
        # The total prepare loaded is what must be accounted for, whatever the rows say.
        self._unfinished = max(carry.prepared.total, count.total) - count.with_result
        if self._unfinished <= 0:
            self._unfinished = 0
            return "done"
        if carry.settle_rounds >= len(SETTLE_PAUSES_S):
            self._unrecorded = (
                f"{self._unfinished} of {carry.prepared.total} items have no result after "
                f"{carry.settle_rounds} more passes: {self._unrecorded or 'none could be run'}"
            )
            return "done"
        self._publish(f"{self._unfinished} items without a result: dispatching them again")
        await workflow.sleep(SETTLE_PAUSES_S[carry.settle_rounds])
        carry.settle_rounds += 1
        return "again"
