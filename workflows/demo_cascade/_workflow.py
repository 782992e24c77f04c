"""The DemoCascade workflow itself: its messages, the run through the step table, and its end.

`_STEP_RUNS` (at the end) maps every step of `DEMO_STEPS` to the method that
runs it; the methods live with their kind of step (`_data_steps`,
`_registry_steps`, `_agent_steps`), the undo machinery in `_saga`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import is_cancelled_exception

from workflows.demo_cascade._agent_steps import AgentSteps
from workflows.demo_cascade._data_steps import DataSteps
from workflows.demo_cascade._options import Outcome
from workflows.demo_cascade._registry_steps import RegistrySteps

with workflow.unsafe.imports_passed_through():
    from konstruct.demo import models as dm
    from konstruct.demo.models import (
        STEP_NAMES,
        DemoCascadeResult,
        DemoProgress,
        DemoStep,
        StepContext,
        steps_of,
    )
    from konstruct.platform.temporal.saga import error_text, failure_of


@workflow.defn
class DemoCascade(DataSteps, RegistrySteps, AgentSteps):
    @workflow.init
    def __init__(self, raw_input: dict[str, Any]) -> None:
        super().__init__(raw_input)

    # --- messages ---------------------------------------------------------------

    @workflow.query
    def progress(self) -> DemoProgress:
        return self._progress()

    @workflow.signal
    def stop(self) -> None:
        """Pause before the next step (the step running now finishes)."""
        self._paused = True
        self._note("stop received: pausing before the next step")

    @workflow.signal
    def resume(self) -> None:
        self._paused = False
        self._note("resume received")

    @workflow.signal
    def approve(self, input: dm.ApprovalSignal | None = None) -> None:
        self._answer_approval("approve", input)

    @workflow.signal
    def reject(self, input: dm.ApprovalSignal | None = None) -> None:
        self._answer_approval("reject", input)

    # --- the run ----------------------------------------------------------------

    @workflow.run
    async def run(self, raw_input: dict[str, Any]) -> DemoCascadeResult:
        if self._invalid is not None:
            raise self._invalid
        input = self._input
        specs = steps_of(input.scenario)
        self._steps = [DemoStep(name=s.name, phase=s.phase) for s in specs]
        self._set_status("running")
        started = workflow.now()
        try:
            for spec in specs:
                self._next_step = spec.name
                await self._wait_while_paused()
                await self._run_step(spec.name)
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError) and workflow.cancellation_reason() is None:
                # Not a cancel request: the worker is evicting this run from its
                # cache. It resumes elsewhere; nothing to undo.
                raise
            await self._unwind(error)
            raise failure_of(error) from None
        self._saga.clear()
        self._set_status("completed")
        await workflow.wait_condition(workflow.all_handlers_finished)
        overall = "pass" if all(s.status in ("pass", "skip") for s in self._steps) else "fail"
        return DemoCascadeResult(
            workflow_id=workflow.info().workflow_id,
            workflow_run_id=workflow.info().run_id,
            scenario=input.scenario,
            seed=input.seed,
            approval=input.approval,
            overall_status=overall,
            steps=self._steps,
            champion_run_id=self._champion.run_id if self._champion else None,
            pre_run_alias_run_id=self._pre_run_alias,
            alias_run_id=self._alias_run_id,
            decision=self._decision,
            total_ms=(workflow.now() - started).total_seconds() * 1000,
        )

    async def _wait_while_paused(self) -> None:
        if not self._paused:
            return
        self._set_status("paused")
        await workflow.wait_condition(lambda: not self._paused)
        self._set_status("running")

    async def _run_step(self, name: str) -> None:
        row = self._row(name)
        row.status = "running"
        self._current = name
        self._show()
        step = StepContext(name, self._input.fail_at == name, self._prefix)
        started = workflow.now()
        try:
            outcome = await _STEP_RUNS[name](self, step)
        except BaseException as error:
            row.status = "fail"
            row.detail = ("cancelled" if is_cancelled_exception(error) else error_text(error))[
                :2000
            ]
            row.duration_ms = (workflow.now() - started).total_seconds() * 1000
            raise
        row.status = outcome.status
        row.detail = outcome.detail
        row.work_ms = round(outcome.work_ms, 3)
        row.duration_ms = (workflow.now() - started).total_seconds() * 1000
        self._current = None
        self._show()


# Each step of DEMO_STEPS (its name, phase and scenarios) and the method that runs it.
_STEP_RUNS: dict[str, Callable[[DemoCascade, StepContext], Awaitable[Outcome]]] = {
    "precheck": DemoCascade._precheck,
    "reset": DemoCascade._reset,
    "seed_data": DemoCascade._seed_data,
    "backfill": DemoCascade._backfill,
    "features": DemoCascade._features,
    "train_baselines": DemoCascade._train_baselines,
    "train_v2": DemoCascade._train_v2,
    "backtest": DemoCascade._backtest,
    "batch_sweep": DemoCascade._batch_sweep,
    "register_runs": DemoCascade._register_runs,
    "compat_compare": DemoCascade._compat_compare,
    "promote": DemoCascade._promote,
    "stale_alias_check": DemoCascade._stale_alias_check,
    "safer_promote": DemoCascade._safer_promote,
    "scenario_simulate_and_save": DemoCascade._scenario_simulate_and_save,
    "plan_compare": DemoCascade._plan_compare,
    "rag_index": DemoCascade._rag_index,
    "agent_decision": DemoCascade._agent_decision,
    "agent_eval": DemoCascade._agent_eval,
    "verify": DemoCascade._verify,
    "cleanup": DemoCascade._cleanup,
}
assert tuple(_STEP_RUNS) == STEP_NAMES, "every step of DEMO_STEPS needs its method, in order"
