"""DemoCascade: the forecasting registry showcase as a saga.

Every step is one or more activities; every registry change pushes its
compensation on the saga (`konstruct.platform.temporal.saga`) *before* it is made (so a change
whose activity committed but never reported back is still undone). However
the run ends - a step failing, `fail_at`, a cancel from the CLI or the Web UI -
the compensations run in reverse and `demo-production` is settled on the
champion this run recorded, or on what it pointed at before the run when no
champion was recorded. Then the workflow fails with the original error; a
compensation that fails is logged and shown in `progress`, and never replaces it.

Champion semantics. `promote` records the best run as this run's champion:
from then on the alias belongs on it, so the promote move is not undone (it is
the saga's pivot; a promote by the agent step is a second one). Scenario
planning reads the recorded champion, never the live alias. Alias moves are
serialised by a row lock, and an undo or the final settle only moves the alias
if no other workflow run moved it after this one: with demo runs at once, the
last run to move the alias wins, and the alias always ends on a champion some
run recorded (see docs/demo.md).

The module is longer than most because its 21 steps are one saga: each step
is a short method that pushes its undo and hands its result to the next ones
through the run's state, and `_STEP_RUNS` (at the end) maps every step of
`DEMO_STEPS` to its method. Prompts and texts are `konstruct.demo.content`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.exceptions import ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.demo_agent import DemoAgentActivities
    from activities.demo_data import DemoDataActivities
    from activities.demo_registry import DemoRegistryActivities
    from activities.demo_session import DemoSessionActivities
    from activities.llm import LlmActivities
    from activities.registry import RegistryActivities
    from konstruct.demo import content as demo_content
    from konstruct.demo import models as dm
    from konstruct.demo.models import (
        DEMO_ALIAS,
        DEMO_TENANT,
        SCENARIO_SIZES,
        STEP_NAMES,
        BacktestScore,
        CompensationRecord,
        DataRef,
        Decision,
        DemoCascadeInput,
        DemoCascadeResult,
        DemoProgress,
        DemoStep,
        PendingApproval,
        PrecheckResult,
        RegisteredRun,
        RunStatus,
        SavedPlan,
        StepContext,
        StepInput,
        TrainedModel,
        steps_of,
    )
    from konstruct.experiments.models import ExperimentResult
    from konstruct.platform.errors import RegressionNotDetected, to_application_error
    from konstruct.platform.naming import move_id, registry_run_id
    from konstruct.platform.temporal.activity_options import LocalActivityOptions, retries
    from konstruct.platform.temporal.saga import Saga, error_text, failure_of
    from konstruct.platform.temporal.search_attributes import KIND, STATUS, TENANT
    from konstruct.platform.temporal.validation import parse_input
    from konstruct.providers.models import ChatTurn, LlmCallInput, LlmCallResult
    from konstruct.registry.models import (
        AliasMoveResult,
        DiscardRunsInput,
        DiscardRunsResult,
        SettleAliasInput,
        UndoAliasMoveInput,
    )
    from workflows.batch_sweep import BatchSweep
    from workflows.experiment import Experiment

T = TypeVar("T")


_SECOND = timedelta(seconds=1)
# Errors no retry can fix (ours carry non_retryable) fail the step at once.
# Steps are short: local activities, retried inside the workflow task for at most 3 minutes.
STEP = LocalActivityOptions(60 * _SECOND, retries(_SECOND / 5, 5 * _SECOND, 5), 180 * _SECOND)
# A compensation gets a few tries; after that it is reported, not retried forever.
COMPENSATION = dataclasses.replace(STEP, retry_policy=retries(_SECOND / 2, 2 * _SECOND, 3))
LLM_CALL = dataclasses.replace(
    STEP, start_to_close=120 * _SECOND, retry_policy=retries(_SECOND, 8 * _SECOND, 3)
)
CHILD_EXECUTION_TIMEOUT = timedelta(minutes=10)
# No answer to a manual approval within this long means hold.
APPROVAL_TIMEOUT = timedelta(seconds=90)
SWEEP_PRESET = "moving_average_windows"
# The v1 models: `promote` picks the champion among them; v2 and the sweep's best
# are the challengers the agent step weighs against it.
BASELINES = ("naive", "seasonal_naive", "moving_average")


@dataclass
class _Outcome:
    status: Literal["pass", "skip"] = "pass"
    detail: str = ""
    work_ms: float = 0.0

    @classmethod
    def of(cls, result: dm.StepOutput) -> _Outcome:
        return cls(detail=result.detail, work_ms=result.work_ms)


@dataclass
class _Handoff:
    """What the steps hand each other."""

    precheck: PrecheckResult | None = None
    sales: DataRef | None = None
    features: DataRef | None = None
    models: list[TrainedModel] = field(default_factory=list)
    scores: list[BacktestScore] = field(default_factory=list)
    runs: list[RegisteredRun] = field(default_factory=list)
    plans: list[SavedPlan] = field(default_factory=list)
    rationale: str = ""


@workflow.defn
class DemoCascade:
    @workflow.init
    def __init__(self, raw_input: dict[str, Any]) -> None:
        self._invalid: ApplicationError | None = None
        try:
            self._input = parse_input(DemoCascadeInput, raw_input, "DemoCascade")
        except ApplicationError as error:
            # `run` fails with it; until then progress shows the defaults.
            self._invalid = error
            self._input = DemoCascadeInput()
        self._steps: list[DemoStep] = []
        self._status: RunStatus = "running"
        self._current: str | None = None
        self._next_step: str | None = None
        self._paused = False
        self._notes: list[str] = []
        self._error: str | None = None
        self._saga = Saga(self._record_compensation)
        self._compensation_records: list[CompensationRecord] = []
        self._alias_touched = False
        self._pre_run_alias: str | None = None
        self._history_mark = 0
        self._champion: RegisteredRun | None = None
        self._alias_run_id: str | None = None
        self._decision: str | None = None
        # Human in the loop.
        self._pending: PendingApproval | None = None
        self._answer: Literal["approve", "reject"] | None = None
        self._handoff = _Handoff()

    # --- messages ---------------------------------------------------------------

    @workflow.query
    def progress(self) -> DemoProgress:
        return DemoProgress(
            workflow_id=workflow.info().workflow_id,
            scenario=self._input.scenario,
            approval=self._input.approval,
            fail_at=self._input.fail_at,
            status=self._status,
            current_step=self._current,
            steps=[s.model_copy() for s in self._steps],
            pending_approval=self._pending,
            decision=self._decision,
            compensations=list(self._compensation_records),
            champion_run_id=self._champion.run_id if self._champion else None,
            pre_run_alias_run_id=self._pre_run_alias,
            alias_run_id=self._alias_run_id,
            error=self._error,
            notes=list(self._notes),
        )

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

    def _answer_approval(
        self, answer: Literal["approve", "reject"], input: dm.ApprovalSignal | None
    ) -> None:
        who = f" by {input.by}" if input and input.by else ""
        if self._pending is None or self._answer is not None:
            self._note(f"{answer}{who} ignored: no decision is waiting for approval")
            return
        self._answer = answer
        self._note(f"{answer}{who} received")

    def _note(self, text: str) -> None:
        self._notes.append(f"{workflow.now().isoformat(timespec='seconds')} {text}")

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

    async def _unwind(self, error: BaseException) -> None:
        """Run the compensations in reverse, settle the alias, close the session."""
        cancelled = is_cancelled_exception(error)
        where = f"at {self._current}" if self._current else f"while paused before {self._next_step}"
        self._error = "cancelled" if cancelled else error_text(error)
        self._current = None
        self._set_status("compensating")
        for row in self._steps:
            if row.status == "pending":
                row.status = "skip"
                row.detail = (
                    f"not reached: the run {'was cancelled' if cancelled else 'failed'} {where}"
                )
        await self._saga.unwind()
        if self._alias_touched:
            await self._saga.compensate("(invariant)", "settle demo-production", self._settle_alias)
        try:
            await self._finish("cancelled" if cancelled else "failed", COMPENSATION)
        except Exception:
            workflow.logger.exception("could not mark the demo session finished")
        self._set_status("cancelled" if cancelled else "failed")

    def _record_compensation(self, step: str, action: str, passed: bool, detail: str) -> None:
        self._compensation_records.append(
            CompensationRecord(
                step=step, action=action, status="pass" if passed else "fail", detail=detail
            )
        )
        for row in self._steps:
            if passed and row.name == step and row.status == "pass":
                row.status = "compensated"
                row.detail = f"{row.detail} | compensated: {detail}".strip(" |")
        self._show()

    # --- helpers ----------------------------------------------------------------

    def _row(self, name: str) -> DemoStep:
        return next(s for s in self._steps if s.name == name)

    def _set_status(self, status: RunStatus) -> None:
        self._status = status
        workflow.upsert_search_attributes(
            [TENANT.value_set(DEMO_TENANT), KIND.value_set("demo"), STATUS.value_set(status)]
        )
        self._show()

    def _show(self) -> None:
        waiting = self._pending if self._answer is None else None
        workflow.set_current_details(
            demo_content.current_details(
                self._status, self._steps, waiting, self._compensation_records
            )
        )

    @property
    def _prefix(self) -> str:
        return f"demo/sessions/{workflow.info().run_id}/"

    async def _local(
        self,
        activity: Callable[..., Awaitable[T]],
        arg: BaseModel,
        options: LocalActivityOptions = STEP,
        summary: str | None = None,
    ) -> T:
        return await options.run(activity, arg, summary)

    async def _step(
        self,
        activity: Callable[..., Awaitable[T]],
        step: StepContext,
        arg: BaseModel,
        part: str = "",
        deletes: tuple[str, str] | None = None,
    ) -> T:
        """Run a step's activity; its summary is the step's name (and which part of it).

        `deletes` is (what, path in the session) the activity writes: its delete is
        pushed on the saga first.
        """
        if deletes is not None:
            what, path = deletes
            self._push_delete(step.name, what, self._prefix + path)
        return await self._local(
            activity, arg, summary=f"{step.name}: {part}" if part else step.name
        )

    def _move_id(self, what: str) -> str:
        return move_id(workflow.info().run_id, what)

    async def _undo_move(self, what: str, reason: str) -> AliasMoveResult:
        result = await self._local(
            RegistryActivities.undo_alias_move,
            UndoAliasMoveInput(
                tenant_id=DEMO_TENANT,
                alias=DEMO_ALIAS,
                undo_move_id=self._move_id(what),
                move_id=self._move_id(f"undo-{what}"),
                reason=reason,
            ),
            COMPENSATION,
        )
        self._alias_run_id = result.run_id
        return result

    def _push_undo_move(self, step: str, action: str, what: str, reason: str) -> None:
        """Push the undo of the move `what` (its key on the saga too)."""

        async def undo() -> str:
            return (await self._undo_move(what, reason)).detail

        self._saga.push(step, action, what, undo)

    async def _settle_alias(self) -> str:
        target = self._champion.run_id if self._champion else self._pre_run_alias
        result = await self._local(
            RegistryActivities.settle_alias,
            SettleAliasInput(
                tenant_id=DEMO_TENANT,
                alias=DEMO_ALIAS,
                target_run_id=target,
                history_mark=self._history_mark,
                move_id=self._move_id("settle"),
                reason=(
                    "settle on the recorded champion"
                    if self._champion
                    else "settle on the alias before the run (no champion recorded)"
                ),
            ),
            COMPENSATION,
        )
        self._alias_run_id = result.run_id
        return f"{result.detail}: {result.run_id}"

    def _push_delete(self, step: str, what: str, prefix: str) -> None:
        async def delete() -> str:
            output = await self._local(
                DemoSessionActivities.delete_prefix,
                dm.DeletePrefixInput(prefix=prefix),
                COMPENSATION,
            )
            return output.detail

        self._saga.push(step, f"delete {what}", f"{step}:delete", delete)

    def _push_discard(self, step: str, action: str, key: str, run_ids: list[str]) -> None:
        async def discard() -> str:
            keep = [self._champion.run_id] if self._champion else []
            result: DiscardRunsResult = await self._local(
                RegistryActivities.discard_runs,
                DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=run_ids, keep=keep),
                COMPENSATION,
            )
            return f"discarded {len(result.deleted)} runs, kept {len(result.kept)}"

        self._saga.push(step, action, key, discard)

    async def _finish(
        self, status: str, options: LocalActivityOptions = STEP, summary: str | None = None
    ) -> None:
        await self._local(
            DemoSessionActivities.finish,
            dm.FinishInput(
                status=status,
                champion_run_id=self._champion.run_id if self._champion else None,
                decision=self._decision,
            ),
            options,
            summary,
        )

    def _v1_runs(self) -> list[RegisteredRun]:
        """The baseline runs, best first: what `promote` chooses the champion from."""
        return sorted(
            (r for r in self._handoff.runs if r.name in BASELINES), key=lambda r: (r.wape, r.name)
        )

    def _size(self) -> dm.ScenarioSize:
        return SCENARIO_SIZES[self._input.scenario]

    # --- the steps: setup and data ---------------------------------------------------

    async def _precheck(self, step: StepContext) -> _Outcome:
        # Recorded first, on its own: the invariant needs it however precheck ends,
        # and a re-executed step (worker crash) reads the first record back.
        start = await self._step(
            DemoSessionActivities.open_session,
            step,
            dm.OpenSessionInput(scenario=self._input.scenario, seed=self._input.seed),
            "open session",
        )
        self._pre_run_alias = self._alias_run_id = start.pre_run_alias_run_id
        self._history_mark = start.history_mark
        result = await self._step(
            DemoSessionActivities.precheck,
            step,
            step.input(StepInput),
        )
        self._handoff.precheck = result
        before = self._pre_run_alias or "(none)"
        return _Outcome(
            detail=f"{DEMO_ALIAS} before the run: {before}; {result.detail}",
            work_ms=result.work_ms,
        )

    async def _reset(self, step: StepContext) -> _Outcome:
        return _Outcome.of(
            await self._step(DemoSessionActivities.reset, step, step.input(StepInput))
        )

    async def _seed_data(self, step: StepContext) -> _Outcome:
        result = await self._step(
            DemoDataActivities.seed_data,
            step,
            step.input(dm.SeedDataInput, seed=self._input.seed, size=self._size()),
            deletes=("sales series", "data/sales"),
        )
        self._handoff.sales = result
        return _Outcome.of(result)

    async def _backfill(self, step: StepContext) -> _Outcome:
        assert self._handoff.sales is not None
        result = await self._step(
            DemoDataActivities.backfill,
            step,
            step.input(
                dm.BackfillInput, data=self._handoff.sales, seed=self._input.seed, size=self._size()
            ),
            deletes=("backfilled series", "data/backfill"),
        )
        self._handoff.sales = result
        return _Outcome.of(result)

    async def _features(self, step: StepContext) -> _Outcome:
        assert self._handoff.sales is not None
        result = await self._step(
            DemoDataActivities.features,
            step,
            step.input(dm.FeaturesInput, data=self._handoff.sales),
            deletes=("feature table", "data/features"),
        )
        self._handoff.features = result
        return _Outcome.of(result)

    # --- modeling --------------------------------------------------------------------

    async def _train(self, step: StepContext, models: list[str]) -> _Outcome:
        assert self._handoff.features is not None
        result = await self._step(
            DemoDataActivities.train,
            step,
            step.input(dm.TrainInput, features=self._handoff.features, models=models),
            deletes=("trained model files", f"models/{step.name}/"),
        )
        self._handoff.models += result.models
        return _Outcome.of(result)

    async def _train_baselines(self, step: StepContext) -> _Outcome:
        return await self._train(step, list(BASELINES))

    async def _train_v2(self, step: StepContext) -> _Outcome:
        return await self._train(step, ["trend_seasonal_v2"])

    async def _backtest(self, step: StepContext) -> _Outcome:
        assert self._handoff.features is not None
        result = await self._step(
            DemoDataActivities.backtest,
            step,
            step.input(
                dm.BacktestInput,
                features=self._handoff.features,
                models=self._handoff.models,
                size=self._size(),
            ),
        )
        self._handoff.scores = result.scores
        return _Outcome.of(result)

    async def _batch_sweep(self, step: StepContext) -> _Outcome:
        assert self._handoff.features is not None
        self._push_delete(step.name, "sweep model files", self._prefix + "models/batch_sweep/")
        result = await workflow.execute_child_workflow(
            BatchSweep.run,
            dm.SweepInput(
                session_prefix=self._prefix,
                features=self._handoff.features,
                preset=SWEEP_PRESET,
                size=self._size(),
                inject_failure=step.inject,
            ),
            id=f"{workflow.info().workflow_id}-sweep",
            execution_timeout=CHILD_EXECUTION_TIMEOUT,
            static_summary=f"batch sweep {SWEEP_PRESET} for {workflow.info().workflow_id}",
        )
        best = result.best
        self._handoff.models.append(best)
        self._handoff.scores.append(
            BacktestScore(name=best.name, model=best.model, wape=result.best_wape, folds=0)
        )
        ranked = ", ".join(f"{p.params} {p.wape:.4f}" for p in result.points)
        return _Outcome(
            detail=f"preset {result.preset}: {len(result.points)} configs ({ranked});"
            f" best {best.name} WAPE {result.best_wape:.4f}",
            work_ms=result.work_ms,
        )

    # --- registry --------------------------------------------------------------------

    async def _register_runs(self, step: StepContext) -> _Outcome:
        run_ids = {m.name: str(workflow.uuid4()) for m in self._handoff.models}
        self._push_discard(
            step.name, "discard registered runs", "register_runs:discard", list(run_ids.values())
        )
        result = await self._step(
            DemoRegistryActivities.register,
            step,
            step.input(
                dm.RegisterInput,
                models=self._handoff.models,
                scores=self._handoff.scores,
                run_ids=run_ids,
                seed=self._input.seed,
                scenario=self._input.scenario,
            ),
        )
        self._handoff.runs = result.runs
        return _Outcome.of(result)

    async def _compat_compare(self, step: StepContext) -> _Outcome:
        v1 = self._v1_runs()[0]
        v2 = next(r for r in self._handoff.runs if r.model == "trend_seasonal_v2")
        return _Outcome.of(
            await self._step(
                DemoRegistryActivities.compat_compare,
                step,
                step.input(dm.CompatInput, v1=v1, v2=v2),
            )
        )

    async def _promote(self, step: StepContext) -> _Outcome:
        best = self._v1_runs()[0]
        self._alias_touched = True
        self._push_undo_move(
            step.name,
            "undo the promote move",
            "promote",
            "undo promote (step failed)",
        )
        result = await self._step(
            DemoRegistryActivities.promote,
            step,
            step.input(
                dm.PromoteInput,
                champion=best,
                move_id=self._move_id("promote"),
                reason=f"promote champion {best.name} (WAPE {best.wape:.4f})",
            ),
        )
        # The pivot: the champion is recorded and the alias stays on it.
        self._champion = best
        self._alias_run_id = best.run_id
        self._saga.drop("promote")
        return _Outcome.of(result)

    async def _stale_alias_check(self, step: StepContext) -> _Outcome:
        assert self._champion is not None
        return _Outcome.of(
            await self._step(
                DemoRegistryActivities.stale_alias_check,
                step,
                step.input(dm.StaleCheckInput, champion_run_id=self._champion.run_id),
            )
        )

    async def _safer_promote(self, step: StepContext) -> _Outcome:
        assert self._champion is not None
        worse = self._v1_runs()[-1]
        self._push_undo_move(
            step.name,
            "undo the swap to the worse run",
            "safer-swap",
            "undo the trial swap (run ended)",
        )
        swap = await self._step(
            DemoRegistryActivities.safer_promote_swap,
            step,
            step.input(
                dm.PromoteInput,
                champion=worse,
                move_id=self._move_id("safer-swap"),
                reason=f"safer promote: trial swap to {worse.name} (WAPE {worse.wape:.4f})",
            ),
            "swap",
        )
        check = await self._step(
            DemoRegistryActivities.check_regression,
            step,
            step.without_injection().input(
                dm.RegressionCheckInput,
                champion=self._champion,
                swap_move_id=self._move_id("safer-swap"),
            ),
            "detect",
        )
        rollback = await self._undo_move("safer-swap", "safer promote: regression, roll back")
        self._saga.drop("safer-swap")
        if not check.regressed:
            # Raised by the workflow itself, so mapped here rather than by the interceptor.
            raise to_application_error(
                RegressionNotDetected(
                    f"safer promote swapped to {worse.name} but the check saw no regression "
                    f"({check.detail})"
                )
            )
        return _Outcome(
            detail=f"{swap.detail}; {check.detail}; rollback: {rollback.detail}",
            work_ms=swap.work_ms + check.work_ms,
        )

    # --- planning and knowledge ------------------------------------------------------

    async def _scenario_simulate_and_save(self, step: StepContext) -> _Outcome:
        assert self._champion is not None and self._handoff.features is not None
        # Plans come from the recorded champion, never from whatever the live alias points at.
        result = await self._step(
            DemoDataActivities.scenario_simulate_and_save,
            step,
            step.input(
                dm.ScenarioInput,
                champion=self._champion,
                features=self._handoff.features,
                horizon=SCENARIO_SIZES["showcase_rich"].horizon,
            ),
            deletes=("saved scenarios", "scenarios/"),
        )
        self._handoff.plans = result.plans
        return _Outcome.of(result)

    async def _plan_compare(self, step: StepContext) -> _Outcome:
        return _Outcome.of(
            await self._step(
                DemoDataActivities.plan_compare,
                step,
                step.input(dm.PlanCompareInput, plans=self._handoff.plans),
            )
        )

    async def _rag_index(self, step: StepContext) -> _Outcome:
        result = await self._step(
            DemoAgentActivities.rag_index,
            step,
            step.input(dm.RagInput, question=demo_content.RAG_QUESTION),
            deletes=("RAG index", "rag/"),
        )
        return _Outcome(
            status="skip" if result.skipped else "pass",
            detail=result.detail,
            work_ms=result.work_ms,
        )

    # --- agents ----------------------------------------------------------------------

    async def _agent_decision(self, step: StepContext) -> _Outcome:
        assert self._handoff.precheck is not None and self._champion is not None
        champion = self._champion
        challenger = self._challenger()
        group = self._handoff.precheck.agent_group
        work_ms = 0.0
        if group is None:
            proposal: Decision = "HOLD"
            rationale = "no chat model is configured, so nothing can be proposed"
        else:
            # call_llm does not time itself: its work is its span as this workflow sees it.
            asked = workflow.now()
            answer: LlmCallResult = await self._local(
                LlmActivities.call_llm,
                LlmCallInput(
                    model_group=group,
                    messages=[
                        ChatTurn(role="system", content=demo_content.AGENT_SYSTEM_PROMPT),
                        ChatTurn(
                            role="user", content=demo_content.agent_prompt(champion, challenger)
                        ),
                    ],
                    temperature=0,
                ),
                LLM_CALL,
                summary="agent_decision: propose",
            )
            work_ms = (workflow.now() - asked).total_seconds() * 1000
            proposal, rationale = demo_content.parse_proposal(answer.content)
        self._handoff.rationale = rationale
        approved, how = True, "auto approval"
        if self._input.approval == "manual":
            approved, how = await self._wait_for_approval(proposal, rationale, challenger)
        if proposal == "PROMOTE" and approved:
            self._alias_touched = True
            self._push_undo_move(
                step.name,
                "undo the agent's promote",
                "agent-promote",
                "undo agent promote",
            )
        result = await self._step(
            DemoAgentActivities.apply_decision,
            step,
            step.input(
                dm.DecisionApplyInput,
                proposal=proposal,
                approved=approved,
                how=how,
                rationale=rationale,
                champion=champion,
                challenger=challenger,
                move_id=self._move_id("agent-promote"),
            ),
            "apply",
        )
        self._decision = result.decision
        if result.promoted:
            # A second pivot: the challenger is the recorded champion now.
            self._champion = challenger
            self._alias_run_id = challenger.run_id
        self._saga.drop("agent-promote")
        return _Outcome(
            detail=f"agent proposed {proposal} ({how}): {rationale[:200]} | {result.detail}",
            work_ms=work_ms + result.work_ms,
        )

    def _challenger(self) -> RegisteredRun:
        """The best run that is not a baseline (v2, the sweep's best), else the runner-up."""
        assert self._champion is not None
        ranked = sorted(
            (r for r in self._handoff.runs if r.run_id != self._champion.run_id),
            key=lambda r: (r.name in BASELINES, r.wape, r.name),
        )
        return ranked[0] if ranked else self._champion

    async def _wait_for_approval(
        self, proposal: Decision, rationale: str, challenger: RegisteredRun
    ) -> tuple[bool, str]:
        assert self._champion is not None
        self._pending = PendingApproval(
            proposal=proposal,
            rationale=rationale,
            champion_run_id=self._champion.run_id,
            challenger_run_id=challenger.run_id,
            champion_wape=self._champion.wape,
            challenger_wape=challenger.wape,
            deadline=workflow.now() + APPROVAL_TIMEOUT,
        )
        self._answer = None
        self._set_status("awaiting_approval")
        try:
            await workflow.wait_condition(
                lambda: self._answer is not None,
                timeout=APPROVAL_TIMEOUT,
                timeout_summary="approval deadline",
            )
        except TimeoutError:
            self._note(f"no answer within {APPROVAL_TIMEOUT.total_seconds():.0f} s: hold")
            return False, f"no answer within {APPROVAL_TIMEOUT.total_seconds():.0f} s, hold"
        finally:
            self._pending = None
            if self._status == "awaiting_approval":
                self._set_status("running")
        if self._answer == "approve":
            return True, "approved by signal"
        return False, "rejected by signal"

    async def _agent_eval(self, step: StepContext) -> _Outcome:
        """A short Experiment child scores the agent's rationale; the record step carries fail_at."""
        assert self._handoff.precheck is not None
        group, judge = self._handoff.precheck.agent_group, self._handoff.precheck.judge_group
        rationale = self._handoff.rationale
        experiment_id = f"demo-eval-{workflow.info().run_id}"
        summary: dict[str, Any] = {"experiment_id": experiment_id, "rationale": rationale}
        status: Literal["pass", "skip"] = "pass"
        if group is None or judge is None:
            status = "skip"
            detail = "skipped: no chat or judge model group is configured"
        else:
            run_id = registry_run_id(DEMO_TENANT, experiment_id)

            async def discard() -> str:
                result = await self._local(
                    RegistryActivities.discard_runs,
                    DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=[run_id]),
                    COMPENSATION,
                )
                return f"discarded {len(result.deleted)} evaluation run"

            self._saga.push(step.name, "discard the evaluation's registry run", "eval", discard)
            evaluated: ExperimentResult = await workflow.execute_child_workflow(
                Experiment.run,
                demo_content.evaluation(
                    experiment_id, group, judge, rationale, self._decision
                ).model_dump(mode="json", exclude_none=True),
                id=f"{workflow.info().workflow_id}-eval",
                execution_timeout=CHILD_EXECUTION_TIMEOUT,
                cancellation_type=workflow.ChildWorkflowCancellationType.TRY_CANCEL,
                static_summary=f"evaluate the agent's rationale for {workflow.info().workflow_id}",
            )
            recorded, detail = demo_content.evaluation_report(experiment_id, evaluated)
            summary.update(recorded)
        result = await self._step(
            DemoAgentActivities.record_eval,
            step,
            step.input(dm.EvalRecordInput, summary=summary),
            "record",
        )
        return _Outcome(status=status, detail=f"{detail} | {result.detail}", work_ms=result.work_ms)

    # --- ops -------------------------------------------------------------------------

    async def _verify(self, step: StepContext) -> _Outcome:
        assert self._champion is not None
        return _Outcome.of(
            await self._step(
                DemoRegistryActivities.verify,
                step,
                step.input(
                    dm.VerifyInput, champion=self._champion, history_mark=self._history_mark
                ),
            )
        )

    async def _cleanup(self, step: StepContext) -> _Outcome:
        result = await self._step(DemoSessionActivities.cleanup, step, step.input(StepInput))
        await self._finish("completed", summary="cleanup: finish session")
        return _Outcome.of(result)


# Each step of DEMO_STEPS (its name, phase and scenarios) and the method that runs it.
_STEP_RUNS: dict[str, Callable[[DemoCascade, StepContext], Awaitable[_Outcome]]] = {
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
