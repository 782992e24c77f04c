"""One experiment item on the single-call path: its task call, then its judges, then its count.

Each call is an activity on its provider's queue (`Calls._start_call`). A spent
quota or budget pauses the experiment and leaves the item pending; any other
failure is recorded in PostgreSQL, and an item whose failure cannot be recorded
is left without a result for the count at the end to find.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

from workflows.experiment._options import db_call, pick_route
from workflows.experiment._toggles import Toggles

with workflow.unsafe.imports_passed_through():
    from activities.agent_items import AgentItemActivities
    from activities.experiments import ExperimentActivities
    from activities.provider_calls import ProviderCallActivities
    from konstruct.experiments.models import (
        JudgeItemInput,
        JudgeItemResult,
        PendingItem,
        RecordFailureInput,
        RunItemInput,
        RunItemResult,
    )
    from konstruct.platform.errors import (
        ExperimentPaused,
        ExperimentStopped,
        failure_of,
        is_failure,
    )


class ItemRunning(Toggles):
    async def _run_item(
        self,
        item: PendingItem,
        delay_s: float = 0.0,
        failed_once: tuple[str, str] | None = None,
    ) -> None:
        """One item on the single-call path: its task call (after `delay_s`, a
        batch's Retry-After), then its judges. `failed_once`: a batch's call of the
        item failed so (kind, message), one of its `max_attempts` spent."""
        keys: list[str] = []
        task_done = not item.needs_task
        spent = 0 if failed_once is None else 1
        try:
            if item.needs_task and failed_once is not None and not self._attempts_left(spent):
                await self._record_failure(item, *failed_once, task_done=False)
                return
            if delay_s > 0 and await self._stopped_within(delay_s):
                return  # still pending: a resume runs it
            missing = item.missing_evals
            if item.needs_task:
                result = await self._call_task(item, keys, spent)
                if result.status == "failed":
                    self._count_done(failed=True)
                    return
                self._count_task(result)
                task_done = True
                missing = result.missing_evals
            for name in missing:
                self._count_cost(await self._call_judge(item, name, keys))
            self._count_done(failed=False)
        except ActivityError as err:
            await self._item_failed(item, err, task_done)
        finally:
            self._in_flight.pop(item.item_id, None)
            for key in keys:
                self._handles.pop(key, None)

    async def _stopped_within(self, delay_s: float) -> bool:
        """Wait `delay_s`, or less if a stop comes first: True if one did."""
        try:
            await workflow.wait_condition(
                lambda: self._stop_requested, timeout=timedelta(seconds=delay_s)
            )
        except TimeoutError:
            pass
        return self._stop_requested

    async def _call_task(
        self, item: PendingItem, keys: list[str], attempts_spent: int = 0
    ) -> RunItemResult:
        assert self._carry is not None and self._input is not None
        route = pick_route(self._carry.prepared.task_routes, item.item_id)
        agent = self._input.task.agent is not None
        handle, key = self._start_call(
            # An agent's item: every turn, step and tool call in one activity (its
            # transcript in PostgreSQL, not in history).
            AgentItemActivities.run_agent_item if agent else ProviderCallActivities.run_item,
            RunItemInput(**self._item_call(item, route)),
            route.provider,
            f"task:{item.item_id}",
            long=agent,
            attempts_spent=attempts_spent,
        )
        keys.append(key)
        result: RunItemResult = await handle
        return result

    async def _call_judge(self, item: PendingItem, name: str, keys: list[str]) -> JudgeItemResult:
        assert self._carry is not None
        route = pick_route(self._carry.prepared.judge_routes[name], item.item_id)
        handle, key = self._start_call(
            ProviderCallActivities.judge_item,
            JudgeItemInput(eval_name=name, **self._item_call(item, route)),
            route.provider,
            f"judge:{name}:{item.item_id}",
        )
        keys.append(key)
        judged: JudgeItemResult = await handle
        return judged

    async def _item_failed(self, item: PendingItem, err: ActivityError, task_done: bool) -> None:
        """A call of the item failed for good: pause, leave it pending, or record the failure."""
        assert self._input is not None
        cause = err.cause
        if isinstance(cause, CancelledError) or is_failure(cause, ExperimentStopped):
            return  # stopped before its call: still pending, a resume runs it
        paused = failure_of(cause, ExperimentPaused)
        if paused is not None and isinstance(cause, ApplicationError):
            # A spent quota or budget: a stop, then a wait for a resume; still pending.
            self._quota_spent(cause.message, paused.pause_kind)
            return
        kind = cause.type if isinstance(cause, ApplicationError) and cause.type else "Error"
        await self._record_failure(item, kind, str(cause or err), task_done)

    async def _record_failure(
        self, item: PendingItem, kind: str, error: str, task_done: bool
    ) -> None:
        """The item's failure in PostgreSQL, and counted; or, if it cannot be
        recorded, left without a result for the count at the end."""
        assert self._input is not None
        try:
            recorded: bool = await db_call(
                ExperimentActivities.record_failure,
                RecordFailureInput(
                    tenant_id=self._input.tenant_id,
                    experiment_id=self._input.experiment_id,
                    item_id=item.item_id,
                    error_kind=kind,
                    error=error,
                ),
            )
        except ActivityError as unrecordable:
            recorded, error = False, str(unrecordable.cause or unrecordable)
        if not recorded:
            # Nothing holds this item's failure, so it is counted nowhere: it stays
            # without a result and the count at the end finds it.
            self._unrecorded = f"item {item.item_id!r} failed and could not be recorded: {error}"
            return
        # A judge that gave up leaves the item scored without it.
        self._count_done(failed=not task_done)
