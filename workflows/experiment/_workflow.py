"""The Experiment workflow itself: its messages, and a run from loading to the summary.

A run loads the dataset (or takes the counters carried over by continue-as-new),
dispatches passes until every item has a result, stopping and resuming as told,
continues as new every `continue_as_new_every` task activities, and ends with
`experiment_finalize`'s summary. The parts it is made of are mixins over one
state (`workflows.experiment._state`).
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.experiment._dispatch import Dispatching
from workflows.experiment._monitor import Monitoring
from workflows.experiment._options import (
    BATCH_CALLS,
    BATCHES_IN_FLIGHT,
    BATCHES_ON_WORKFLOW_QUEUE,
    DB_RETRY_POLICY,
    FAILED_BATCH_CALL_IS_AN_ATTEMPT,
    FEWER_LARGER_BATCHES,
    FINALIZE_HEARTBEAT,
    FINALIZE_TIMEOUT,
    PREPARE_HEARTBEAT,
    PREPARE_TIMEOUT,
    SETTLE_UNFINISHED,
)

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from konstruct.experiments.models import (
        ExperimentCarry,
        ExperimentInput,
        ExperimentProgress,
        ExperimentResult,
        ExperimentStatus,
        ExperimentSummary,
        FinalizeInput,
        PrepareInput,
        PrepareResult,
        ToggleInput,
        ToggleResult,
    )
    from konstruct.platform.errors import workflow_failure
    from konstruct.platform.temporal.search_attributes import KIND, STATUS, TENANT
    from konstruct.platform.temporal.validation import parse_input


@workflow.defn
class Experiment(Dispatching, Monitoring):
    # --- messages ------------------------------------------------------------------

    @workflow.query
    def progress(self) -> ExperimentProgress:
        return self._progress()

    @workflow.signal
    def stop(self, input: ToggleInput | None = None) -> None:
        self._toggle("stop", input)

    @workflow.signal
    def resume(self, input: ToggleInput | None = None) -> None:
        self._toggle("resume", input)

    @workflow.update
    def request_stop(self, input: ToggleInput | None = None) -> ToggleResult:
        """`stop`, answered: accepted, or refused with the reason."""
        return self._toggle("stop", input)

    @workflow.update
    def request_resume(self, input: ToggleInput | None = None) -> ToggleResult:
        return self._toggle("resume", input)

    # --- the run -------------------------------------------------------------------

    @workflow.run
    async def run(self, raw_input: dict[str, Any]) -> ExperimentResult:
        inp = parse_input(ExperimentInput, raw_input, "Experiment")
        self._input = inp
        self._batching = workflow.patched(BATCH_CALLS)
        if workflow.patched(FEWER_LARGER_BATCHES):
            self._batches_in_flight = BATCHES_IN_FLIGHT
        self._batches_on_own_queue = workflow.patched(BATCHES_ON_WORKFLOW_QUEUE)
        self._batch_failures_count = workflow.patched(FAILED_BATCH_CALL_IS_AN_ATTEMPT)
        workflow.upsert_search_attributes(
            [
                TENANT.value_set(inp.tenant_id),
                KIND.value_set("experiment"),
                STATUS.value_set("running"),
            ]
        )
        if inp.carry is None:
            self._carry = await self._prepare(inp)
        else:
            self._carry = inp.carry
            self._stop_requested = inp.carry.stop_requested
            self._status_on_row = None  # the last run may have left it paused
        early, self._early_toggles = self._early_toggles, []
        for action, toggle in early:
            self._toggle(action, toggle)
        monitor_task = asyncio.create_task(self._monitor_loop())
        outcome = "again"
        while outcome != "done":
            if self._stop_requested:
                await self._stop_and_wait()
                continue
            outcome = await self._dispatch_pass()
            if outcome == "done" and workflow.patched(SETTLE_UNFINISHED):
                outcome = await self._settle_unfinished()
            if outcome == "continue_as_new":
                await self._continue_as_new(inp, monitor_task)
        self._finishing = self._monitor_off = True
        await monitor_task
        summary = await self._finalize(inp)
        # The budget as the summary read it, after the calls' holds were given back:
        # not the last monitor sample's, taken while calls were in flight.
        self._budget = summary.budget
        self._publish()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return ExperimentResult(summary=summary, registry_run_id=summary.registry_run_id)

    async def _prepare(self, inp: ExperimentInput) -> ExperimentCarry:
        """Load the dataset into PostgreSQL; the first run's counters from what it holds."""
        self._publish("loading the dataset")
        try:
            prepared: PrepareResult = await workflow.execute_activity_method(
                ExperimentActivities.prepare,
                PrepareInput(experiment=inp, workflow_id=workflow.info().workflow_id),
                start_to_close_timeout=PREPARE_TIMEOUT,
                heartbeat_timeout=PREPARE_HEARTBEAT,
                retry_policy=DB_RETRY_POLICY,
            )
        except ActivityError as err:
            self._set_status("failed")
            self._error = str(err.cause or err)
            raise workflow_failure(err) from None
        return ExperimentCarry(
            prepared=prepared,
            completed=prepared.completed,
            failed=prepared.failed,
            evaluated=prepared.evaluated,
            cost_usd=prepared.cost_usd,
            cost_known=prepared.cost_known,
            cache_hits=prepared.cache_hits,
            cost_saved_usd=prepared.cost_saved_usd,
            started_at=workflow.now().timestamp(),
        )

    async def _continue_as_new(
        self, inp: ExperimentInput, monitor_task: asyncio.Task[None]
    ) -> NoReturn:
        """Hand the counters and the stop flag to a new run, once the monitor and
        every handler are done."""
        assert self._carry is not None
        self._monitor_off = True
        await monitor_task
        await workflow.wait_condition(workflow.all_handlers_finished)
        carry = self._carry
        carry.run_index += 1
        carry.stop_requested = self._stop_requested
        next_input = inp.model_copy(update={"carry": carry})
        if next_input.dataset.items is not None:
            # The items are in PostgreSQL; the next run's history need not carry them.
            next_input.dataset = next_input.dataset.model_copy(update={"items": []})
        workflow.continue_as_new(next_input.model_dump(mode="json", exclude_none=True))

    async def _finalize(self, inp: ExperimentInput) -> ExperimentSummary:
        """End `completed` (or `incomplete`) and summarise from PostgreSQL."""
        assert self._carry is not None
        status: ExperimentStatus = "incomplete" if self._unfinished else "completed"
        self._set_status(status)
        summary: ExperimentSummary = await workflow.execute_activity_method(
            ExperimentActivities.finalize,
            FinalizeInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                name=inp.name or inp.experiment_id,
                status=status,
                reason=self._unrecorded if self._unfinished else None,
                workflow_id=workflow.info().workflow_id,
                workflow_run_id=workflow.info().run_id,
                providers=self._carry.prepared.providers,
                params={
                    "model_group": inp.task.model_group,
                    **({"agent": inp.task.agent} if inp.task.agent else {}),
                    "evals": [e.kind for e in inp.evals],
                    "max_concurrency": inp.max_concurrency,
                },
            ),
            start_to_close_timeout=FINALIZE_TIMEOUT,
            heartbeat_timeout=FINALIZE_HEARTBEAT,
            retry_policy=DB_RETRY_POLICY,
        )
        return summary
