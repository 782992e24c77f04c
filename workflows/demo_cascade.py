"""DemoCascade: the forecasting registry showcase as a saga.

Every step is one or more activities; every registry change pushes its
compensation on a stack *before* it is made (so a change whose activity
committed but never reported back is still undone). However the run ends -
a step failing, `fail_at`, a cancel from the CLI or the Web UI - the stack is
unwound in reverse and `demo-production` is settled on the champion this run
recorded, or on what it pointed at before the run when no champion was
recorded. Then the workflow fails with the original error; a compensation
that fails is logged and shown in `progress`, and never replaces it.

Champion semantics. `promote` records the best run as this run's champion:
from then on the alias belongs on it, so the promote move is not undone (it is
the saga's pivot; a promote by the agent step is a second one). Scenario
planning reads the recorded champion, never the live alias. Alias moves are
serialised by a row lock, and an undo or the final settle only moves the alias
if no other workflow run moved it after this one: with demo runs at once, the
last run to move the alias wins, and the alias always ends on a champion some
run recorded (see docs/demo.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.demo_agent import DemoAgentActivities
    from activities.demo_data import DemoDataActivities
    from activities.demo_registry import DemoRegistryActivities
    from activities.demo_session import DemoSessionActivities
    from activities.llm import LlmActivities
    from activities.registry import RegistryActivities
    from konstruct.models.demo import (
        DEMO_ALIAS,
        DEMO_TENANT,
        SCENARIO_SIZES,
        ApprovalSignal,
        BackfillInput,
        BacktestInput,
        BacktestResult,
        BacktestScore,
        CleanupInput,
        CompatInput,
        CompatResult,
        CompensationRecord,
        DataRef,
        Decision,
        DecisionApplyInput,
        DecisionApplyResult,
        DeletePrefixInput,
        DemoCascadeInput,
        DemoCascadeResult,
        DemoProgress,
        DemoStep,
        EvalRecordInput,
        FeaturesInput,
        FinishInput,
        MoveOutput,
        OpenSessionInput,
        PendingApproval,
        PlanCompareInput,
        PlanCompareResult,
        PrecheckInput,
        PrecheckResult,
        PromoteInput,
        RagInput,
        RagResult,
        RegisteredRun,
        RegisterInput,
        RegisterResult,
        RegressionCheck,
        RegressionCheckInput,
        ResetResult,
        RunStatus,
        SavedPlan,
        ScenarioInput,
        ScenarioResult,
        SeedDataInput,
        SessionStart,
        StaleCheckInput,
        StaleCheckResult,
        StepInput,
        StepOutput,
        SweepInput,
        SweepResult,
        TrainedModel,
        TrainInput,
        TrainResult,
        VerifyInput,
        steps_of,
    )
    from konstruct.models.experiments import ExperimentInput, ExperimentResult
    from konstruct.models.llm import ChatTurn, LlmCallInput, LlmCallResult
    from konstruct.models.registry import (
        AliasMoveResult,
        DiscardRunsInput,
        DiscardRunsResult,
        SettleAliasInput,
        UndoAliasMoveInput,
    )
    from konstruct.naming import registry_run_id
    from konstruct.search_attributes import KIND, STATUS, TENANT
    from konstruct.validation import parse_input
    from workflows.batch_sweep import BatchSweep
    from workflows.experiment import Experiment


# Steps are short: local activities, retried inside the workflow task.
STEP_TIMEOUT = timedelta(seconds=60)
STEP_SCHEDULE_TO_CLOSE = timedelta(minutes=3)
# Errors no retry can fix fail the step at once.
NON_RETRYABLE_ERRORS = [
    "InjectedFailure",
    "InvalidInput",
    "NotFound",
    "ArtifactMissing",
    "ArtifactIntegrityError",
    "InvariantViolated",
    "RegressionNotDetected",
    "PrecheckFailed",
    "ForecastingError",
]
STEP_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
# A compensation gets a few tries; after that it is reported, not retried forever.
COMPENSATION_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
LLM_CALL_TIMEOUT = timedelta(seconds=120)
LLM_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=8),
    maximum_attempts=3,
)
CHILD_EXECUTION_TIMEOUT = timedelta(minutes=10)
# No answer to a manual approval within this long means hold.
APPROVAL_TIMEOUT = timedelta(seconds=90)
SWEEP_PRESET = "moving_average_windows"
# The v1 models: `promote` picks the champion among them; v2 and the sweep's best
# are the challengers the agent step weighs against it.
BASELINES = ("naive", "seasonal_naive", "moving_average")
_DECISION_LINE = re.compile(r"decision\s*:\s*\**\s*(promote|hold)", re.IGNORECASE)
_RATIONALE_LINE = re.compile(r"rationale\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


@dataclass
class _Outcome:
    status: Literal["pass", "skip"] = "pass"
    detail: str = ""
    work_ms: float = 0.0


@dataclass
class _Compensation:
    step: str
    action: str
    # Identifies the entry, so a step that commits its change can drop it.
    key: str
    run: Callable[[], Awaitable[str]]


def _error_text(error: BaseException) -> str:
    """The innermost message of an error chain, with its type."""
    innermost = _innermost_application_error(error)
    if innermost is not None:
        return f"{innermost.type or 'ApplicationError'}: {innermost.message}"
    cause: BaseException | None = error
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{type(cause).__name__}: {cause}"


def _innermost_application_error(error: BaseException) -> ApplicationError | None:
    found = None
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ApplicationError):
            found = cause
        cause = cause.__cause__
    return found


def _original_error(error: BaseException) -> BaseException:
    """What the workflow fails with: the first error, unwrapped to its own type and message."""
    if is_cancelled_exception(error):
        return error
    innermost = _innermost_application_error(error)
    if innermost is not None:
        return ApplicationError(innermost.message, type=innermost.type, non_retryable=True)
    kind = type(error).__name__
    if isinstance(error, FailureError):
        return ApplicationError(_error_text(error), type=kind, non_retryable=True)
    # A bug in this workflow: fail the run (compensated) rather than retry the task forever.
    return ApplicationError(f"{kind}: {error}", type=kind, non_retryable=True)


async def _shielded(run: Callable[[], Awaitable[str]]) -> str:
    """Run a compensation to its end even if a cancel request arrives meanwhile."""
    task = asyncio.ensure_future(run())
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            # The cancel hit our await, not the compensation: keep waiting for it.


def parse_proposal(text: str) -> tuple[Decision, str]:
    """`Decision: PROMOTE|HOLD` and `Rationale: ...` from the agent's answer; hold if unclear."""
    decision_match = _DECISION_LINE.search(text)
    rationale_match = _RATIONALE_LINE.search(text)
    rationale = rationale_match.group(1).strip() if rationale_match else text.strip()
    if decision_match is None:
        return "HOLD", f"(no decision in the answer, holding) {rationale}"[:1000]
    decision: Decision = "PROMOTE" if decision_match.group(1).upper() == "PROMOTE" else "HOLD"
    return decision, rationale[:1000]


@workflow.defn
class DemoCascade:
    def __init__(self) -> None:
        self._input: DemoCascadeInput | None = None
        self._steps: list[DemoStep] = []
        self._status: RunStatus = "running"
        self._current: str | None = None
        self._next_step: str | None = None
        self._paused = False
        self._notes: list[str] = []
        self._error: str | None = None
        # Saga state.
        self._compensations: list[_Compensation] = []
        self._compensation_records: list[CompensationRecord] = []
        self._alias_touched = False
        self._pre_run_alias: str | None = None
        self._history_mark = 0
        self._champion: RegisteredRun | None = None
        self._alias_run_id: str | None = None
        # Human in the loop.
        self._pending: PendingApproval | None = None
        self._answer: Literal["approve", "reject"] | None = None
        self._decision: str | None = None
        # What the steps hand each other.
        self._precheck: PrecheckResult | None = None
        self._sales: DataRef | None = None
        self._features: DataRef | None = None
        self._models: list[TrainedModel] = []
        self._scores: list[BacktestScore] = []
        self._sweep: SweepResult | None = None
        self._runs: list[RegisteredRun] = []
        self._plans: list[SavedPlan] = []
        self._rationale = ""

    # --- messages ---------------------------------------------------------------

    @workflow.query
    def progress(self) -> DemoProgress:
        input = self._input
        return DemoProgress(
            workflow_id=workflow.info().workflow_id,
            scenario=input.scenario if input else "showcase_rich",
            approval=input.approval if input else "auto",
            fail_at=input.fail_at if input else None,
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
    def approve(self, input: ApprovalSignal | None = None) -> None:
        self._answer_approval("approve", input)

    @workflow.signal
    def reject(self, input: ApprovalSignal | None = None) -> None:
        self._answer_approval("reject", input)

    def _answer_approval(
        self, answer: Literal["approve", "reject"], input: ApprovalSignal | None
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
        input = parse_input(DemoCascadeInput, raw_input, "DemoCascade")
        self._input = input
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
            raise _original_error(error) from None
        self._compensations.clear()
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
        assert self._input is not None
        inject = self._input.fail_at == name
        started = workflow.now()
        try:
            outcome: _Outcome = await getattr(self, f"_step_{name}")(inject)
        except BaseException as error:
            row.status = "fail"
            row.detail = ("cancelled" if is_cancelled_exception(error) else _error_text(error))[
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
        self._error = "cancelled" if cancelled else _error_text(error)
        self._current = None
        self._set_status("compensating")
        for row in self._steps:
            if row.status == "pending":
                row.status = "skip"
                row.detail = (
                    f"not reached: the run {'was cancelled' if cancelled else 'failed'} {where}"
                )
        while self._compensations:
            entry = self._compensations.pop()
            await self._compensate(entry.step, entry.action, entry.run)
        if self._alias_touched:
            await self._compensate("(invariant)", "settle demo-production", self._settle_alias)
        try:
            await self._local(
                DemoSessionActivities.finish,
                FinishInput(
                    status="cancelled" if cancelled else "failed",
                    champion_run_id=self._champion.run_id if self._champion else None,
                    decision=self._decision,
                ),
                retry_policy=COMPENSATION_RETRY_POLICY,
            )
        except Exception:
            workflow.logger.exception("could not mark the demo session finished")
        self._set_status("cancelled" if cancelled else "failed")

    async def _compensate(self, step: str, action: str, run: Callable[[], Awaitable[str]]) -> None:
        try:
            detail = await _shielded(run)
        except Exception as error:
            # Never masks the original error: logged, shown in progress, and on we go.
            workflow.logger.exception("compensation %r of step %s failed", action, step)
            self._compensation_records.append(
                CompensationRecord(
                    step=step, action=action, status="fail", detail=_error_text(error)
                )
            )
            self._show()
            return
        self._compensation_records.append(
            CompensationRecord(step=step, action=action, status="pass", detail=detail)
        )
        for row in self._steps:
            if row.name == step and row.status == "pass":
                row.status = "compensated"
                row.detail = f"{row.detail} | compensated: {detail}".strip(" |")
        self._show()

    def _push(self, step: str, action: str, key: str, run: Callable[[], Awaitable[str]]) -> None:
        self._compensations.append(_Compensation(step=step, action=action, key=key, run=run))

    def _drop(self, key: str) -> None:
        self._compensations = [c for c in self._compensations if c.key != key]

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
        """The Web UI's current details: the step table and what the run waits for."""
        marks = {
            "pending": "·",
            "running": "▶",
            "pass": "✔",
            "fail": "✘",
            "skip": "↷",
            "compensated": "↺",
        }
        lines = [f"**DemoCascade {self._status}**", ""]
        if self._pending is not None and self._answer is None:
            p = self._pending
            lines += [
                f"**Waiting for approval** (until {p.deadline.isoformat(timespec='seconds')}):"
                f" agent proposes **{p.proposal}**",
                f"challenger WAPE {p.challenger_wape:.4f} vs champion {p.champion_wape:.4f}",
                f"> {p.rationale}",
                f"{p.how}",
                "",
            ]
        lines += ["| step | status | detail |", "|---|---|---|"]
        for s in self._steps:
            lines.append(f"| {s.name} | {marks[s.status]} {s.status} | {s.detail[:120]} |")
        failed = [c for c in self._compensation_records if c.status == "fail"]
        if failed:
            lines += ["", "**Compensations that failed:**"]
            lines += [f"- {c.step}: {c.action}: {c.detail[:200]}" for c in failed]
        workflow.set_current_details("\n".join(lines))

    def _step_input(self, name: str, inject: bool) -> dict[str, Any]:
        return {
            "tenant_id": DEMO_TENANT,
            "step": name,
            "session_prefix": self._prefix,
            "inject_failure": inject,
        }

    @property
    def _prefix(self) -> str:
        return f"demo/sessions/{workflow.info().run_id}/"

    async def _local(self, activity: Callable[..., Any], arg: Any, **options: Any) -> Any:
        options.setdefault("start_to_close_timeout", STEP_TIMEOUT)
        options.setdefault("schedule_to_close_timeout", STEP_SCHEDULE_TO_CLOSE)
        options.setdefault("retry_policy", STEP_RETRY_POLICY)
        return await workflow.execute_local_activity_method(activity, arg, **options)

    def _move_id(self, what: str) -> str:
        return f"{workflow.info().run_id}/{what}"

    async def _undo_move(self, what: str, reason: str) -> AliasMoveResult:
        result: AliasMoveResult = await self._local(
            RegistryActivities.undo_alias_move,
            UndoAliasMoveInput(
                tenant_id=DEMO_TENANT,
                alias=DEMO_ALIAS,
                undo_move_id=self._move_id(what),
                move_id=self._move_id(f"undo-{what}"),
                reason=reason,
            ),
            retry_policy=COMPENSATION_RETRY_POLICY,
        )
        self._alias_run_id = result.run_id
        return result

    async def _settle_alias(self) -> str:
        target = self._champion.run_id if self._champion else self._pre_run_alias
        result: AliasMoveResult = await self._local(
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
            retry_policy=COMPENSATION_RETRY_POLICY,
        )
        self._alias_run_id = result.run_id
        return f"{result.detail}: {result.run_id}"

    async def _delete_prefix(self, prefix: str) -> str:
        output: StepOutput = await self._local(
            DemoSessionActivities.delete_prefix,
            DeletePrefixInput(prefix=prefix),
            retry_policy=COMPENSATION_RETRY_POLICY,
        )
        return output.detail

    def _push_delete(self, step: str, what: str, prefix: str) -> None:
        async def run() -> str:
            return await self._delete_prefix(prefix)

        self._push(step, f"delete {what}", f"{step}:delete", run)

    def _v1_runs(self) -> list[RegisteredRun]:
        """The baseline runs, best first: what `promote` chooses the champion from."""
        return sorted(
            (r for r in self._runs if r.name in BASELINES), key=lambda r: (r.wape, r.name)
        )

    # --- the steps ----------------------------------------------------------------

    async def _step_precheck(self, inject: bool) -> _Outcome:
        assert self._input is not None
        # Recorded first, on its own: the invariant needs it however precheck ends,
        # and a re-executed step (worker crash) reads the first record back.
        start: SessionStart = await self._local(
            DemoSessionActivities.open_session,
            OpenSessionInput(scenario=self._input.scenario, seed=self._input.seed),
            summary="precheck: open session",
        )
        self._pre_run_alias = self._alias_run_id = start.pre_run_alias_run_id
        self._history_mark = start.history_mark
        result: PrecheckResult = await self._local(
            DemoSessionActivities.precheck,
            PrecheckInput(**self._step_input("precheck", inject), scenario=self._input.scenario),
            summary="precheck",
        )
        self._precheck = result
        before = self._pre_run_alias or "(none)"
        return _Outcome(
            detail=f"{DEMO_ALIAS} before the run: {before}; {result.detail}",
            work_ms=result.work_ms,
        )

    async def _step_reset(self, inject: bool) -> _Outcome:
        result: ResetResult = await self._local(
            DemoSessionActivities.reset,
            StepInput(**self._step_input("reset", inject)),
            summary="reset",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_seed_data(self, inject: bool) -> _Outcome:
        assert self._input is not None
        self._push_delete("seed_data", "sales series", self._prefix + "data/sales")
        result: DataRef = await self._local(
            DemoDataActivities.seed_data,
            SeedDataInput(
                **self._step_input("seed_data", inject),
                seed=self._input.seed,
                size=SCENARIO_SIZES[self._input.scenario],
            ),
            summary="seed_data",
        )
        self._sales = result
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_backfill(self, inject: bool) -> _Outcome:
        assert self._input is not None and self._sales is not None
        self._push_delete("backfill", "backfilled series", self._prefix + "data/backfill")
        result: DataRef = await self._local(
            DemoDataActivities.backfill,
            BackfillInput(
                **self._step_input("backfill", inject),
                data=self._sales,
                seed=self._input.seed,
                size=SCENARIO_SIZES[self._input.scenario],
            ),
            summary="backfill",
        )
        self._sales = result
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_features(self, inject: bool) -> _Outcome:
        assert self._sales is not None
        self._push_delete("features", "feature table", self._prefix + "data/features")
        result: DataRef = await self._local(
            DemoDataActivities.features,
            FeaturesInput(**self._step_input("features", inject), data=self._sales),
            summary="features",
        )
        self._features = result
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _train(self, step: str, inject: bool, models: list[str]) -> _Outcome:
        assert self._features is not None
        self._push_delete(step, "trained model files", self._prefix + f"models/{step}/")
        result: TrainResult = await self._local(
            DemoDataActivities.train,
            TrainInput(**self._step_input(step, inject), features=self._features, models=models),
            summary=step,
        )
        self._models += result.models
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_train_baselines(self, inject: bool) -> _Outcome:
        return await self._train("train_baselines", inject, list(BASELINES))

    async def _step_train_v2(self, inject: bool) -> _Outcome:
        return await self._train("train_v2", inject, ["trend_seasonal_v2"])

    async def _step_backtest(self, inject: bool) -> _Outcome:
        assert self._input is not None and self._features is not None
        result: BacktestResult = await self._local(
            DemoDataActivities.backtest,
            BacktestInput(
                **self._step_input("backtest", inject),
                features=self._features,
                models=self._models,
                size=SCENARIO_SIZES[self._input.scenario],
            ),
            summary="backtest",
        )
        self._scores = result.scores
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_batch_sweep(self, inject: bool) -> _Outcome:
        assert self._input is not None and self._features is not None
        self._push_delete("batch_sweep", "sweep model files", self._prefix + "models/batch_sweep/")
        result: SweepResult = await workflow.execute_child_workflow(
            BatchSweep.run,
            SweepInput(
                session_prefix=self._prefix,
                features=self._features,
                preset=SWEEP_PRESET,
                size=SCENARIO_SIZES[self._input.scenario],
                inject_failure=inject,
            ),
            id=f"{workflow.info().workflow_id}-sweep",
            execution_timeout=CHILD_EXECUTION_TIMEOUT,
            static_summary=f"batch sweep {SWEEP_PRESET} for {workflow.info().workflow_id}",
        )
        self._sweep = result
        self._models.append(result.best)
        self._scores.append(
            BacktestScore(
                name=result.best.name, model=result.best.model, wape=result.best_wape, folds=0
            )
        )
        ranked = ", ".join(f"{p.params} {p.wape:.4f}" for p in result.points)
        return _Outcome(
            detail=f"preset {result.preset}: {len(result.points)} configs ({ranked});"
            f" best {result.best.name} WAPE {result.best_wape:.4f}",
            work_ms=result.work_ms,
        )

    async def _step_register_runs(self, inject: bool) -> _Outcome:
        assert self._input is not None
        run_ids = {m.name: str(workflow.uuid4()) for m in self._models}

        async def discard() -> str:
            keep = [self._champion.run_id] if self._champion else []
            result: DiscardRunsResult = await self._local(
                RegistryActivities.discard_runs,
                DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=list(run_ids.values()), keep=keep),
                retry_policy=COMPENSATION_RETRY_POLICY,
            )
            return f"discarded {len(result.deleted)} runs, kept {len(result.kept)}"

        self._push("register_runs", "discard registered runs", "register_runs:discard", discard)
        result: RegisterResult = await self._local(
            DemoRegistryActivities.register,
            RegisterInput(
                **self._step_input("register_runs", inject),
                models=self._models,
                scores=self._scores,
                run_ids=run_ids,
                seed=self._input.seed,
                scenario=self._input.scenario,
            ),
            summary="register_runs",
        )
        self._runs = result.runs
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_compat_compare(self, inject: bool) -> _Outcome:
        v1 = self._v1_runs()[0]
        v2 = next(r for r in self._runs if r.model == "trend_seasonal_v2")
        result: CompatResult = await self._local(
            DemoRegistryActivities.compat_compare,
            CompatInput(**self._step_input("compat_compare", inject), v1=v1, v2=v2),
            summary="compat_compare",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_promote(self, inject: bool) -> _Outcome:
        best = self._v1_runs()[0]
        self._alias_touched = True

        async def undo() -> str:
            return (await self._undo_move("promote", "undo promote (step failed)")).detail

        self._push("promote", "undo the promote move", "promote:move", undo)
        result: MoveOutput = await self._local(
            DemoRegistryActivities.promote,
            PromoteInput(
                **self._step_input("promote", inject),
                champion=best,
                move_id=self._move_id("promote"),
                reason=f"promote champion {best.name} (WAPE {best.wape:.4f})",
            ),
            summary="promote",
        )
        # The pivot: the champion is recorded and the alias stays on it.
        self._champion = best
        self._alias_run_id = best.run_id
        self._drop("promote:move")
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_stale_alias_check(self, inject: bool) -> _Outcome:
        assert self._champion is not None
        result: StaleCheckResult = await self._local(
            DemoRegistryActivities.stale_alias_check,
            StaleCheckInput(
                **self._step_input("stale_alias_check", inject),
                champion_run_id=self._champion.run_id,
            ),
            summary="stale_alias_check",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_safer_promote(self, inject: bool) -> _Outcome:
        assert self._champion is not None
        worse = self._v1_runs()[-1]

        async def undo() -> str:
            return (await self._undo_move("safer-swap", "undo the trial swap (run ended)")).detail

        self._push("safer_promote", "undo the swap to the worse run", "safer:swap", undo)
        swap: MoveOutput = await self._local(
            DemoRegistryActivities.safer_promote_swap,
            PromoteInput(
                **self._step_input("safer_promote", inject),
                champion=worse,
                move_id=self._move_id("safer-swap"),
                reason=f"safer promote: trial swap to {worse.name} (WAPE {worse.wape:.4f})",
            ),
            summary="safer_promote: swap",
        )
        check: RegressionCheck = await self._local(
            DemoRegistryActivities.check_regression,
            RegressionCheckInput(
                **self._step_input("safer_promote", False),
                champion=self._champion,
                swap_move_id=self._move_id("safer-swap"),
            ),
            summary="safer_promote: detect",
        )
        rollback = await self._undo_move("safer-swap", "safer promote: regression, roll back")
        self._drop("safer:swap")
        if not check.regressed:
            raise ApplicationError(
                f"safer promote swapped to {worse.name} but the check saw no regression "
                f"({check.detail})",
                type="RegressionNotDetected",
                non_retryable=True,
            )
        return _Outcome(
            detail=f"{swap.detail}; {check.detail}; rollback: {rollback.detail}",
            work_ms=swap.work_ms + check.work_ms,
        )

    async def _step_scenario_simulate_and_save(self, inject: bool) -> _Outcome:
        assert self._champion is not None and self._features is not None
        self._push_delete(
            "scenario_simulate_and_save", "saved scenarios", self._prefix + "scenarios/"
        )
        # The recorded champion, never the live alias (the seed's cascade).
        result: ScenarioResult = await self._local(
            DemoDataActivities.scenario_simulate_and_save,
            ScenarioInput(
                **self._step_input("scenario_simulate_and_save", inject),
                champion=self._champion,
                features=self._features,
                horizon=SCENARIO_SIZES["showcase_rich"].horizon,
            ),
            summary="scenario_simulate_and_save",
        )
        self._plans = result.plans
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_plan_compare(self, inject: bool) -> _Outcome:
        result: PlanCompareResult = await self._local(
            DemoDataActivities.plan_compare,
            PlanCompareInput(**self._step_input("plan_compare", inject), plans=self._plans),
            summary="plan_compare",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_rag_index(self, inject: bool) -> _Outcome:
        self._push_delete("rag_index", "RAG index", self._prefix + "rag/")
        result: RagResult = await self._local(
            DemoAgentActivities.rag_index,
            RagInput(
                **self._step_input("rag_index", inject),
                question="How does the demo keep demo-production on the champion?",
            ),
            summary="rag_index",
        )
        return _Outcome(
            status="skip" if result.skipped else "pass",
            detail=result.detail,
            work_ms=result.work_ms,
        )

    async def _step_agent_decision(self, inject: bool) -> _Outcome:
        assert self._input is not None and self._precheck is not None
        assert self._champion is not None
        champion = self._champion
        challenger = self._challenger()
        group = self._precheck.agent_group
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
                        ChatTurn(role="system", content=_AGENT_SYSTEM_PROMPT),
                        ChatTurn(role="user", content=_agent_prompt(champion, challenger)),
                    ],
                    temperature=0,
                ),
                start_to_close_timeout=LLM_CALL_TIMEOUT,
                retry_policy=LLM_RETRY_POLICY,
                summary="agent_decision: propose",
            )
            work_ms = (workflow.now() - asked).total_seconds() * 1000
            proposal, rationale = parse_proposal(answer.content)
        self._rationale = rationale
        approved, how = True, "auto approval"
        if self._input.approval == "manual":
            approved, how = await self._wait_for_approval(proposal, rationale, challenger)
        if proposal == "PROMOTE" and approved:
            self._alias_touched = True

            async def undo() -> str:
                return (await self._undo_move("agent-promote", "undo agent promote")).detail

            self._push("agent_decision", "undo the agent's promote", "agent:move", undo)
        result: DecisionApplyResult = await self._local(
            DemoAgentActivities.apply_decision,
            DecisionApplyInput(
                **self._step_input("agent_decision", inject),
                proposal=proposal,
                approved=approved,
                how=how,
                rationale=rationale,
                champion=champion,
                challenger=challenger,
                move_id=self._move_id("agent-promote"),
            ),
            summary="agent_decision: apply",
        )
        self._decision = result.decision
        if result.promoted:
            # A second pivot: the challenger is the recorded champion now.
            self._champion = challenger
            self._alias_run_id = challenger.run_id
        self._drop("agent:move")
        return _Outcome(
            detail=f"agent proposed {proposal} ({how}): {rationale[:200]} | {result.detail}",
            work_ms=work_ms + result.work_ms,
        )

    def _challenger(self) -> RegisteredRun:
        """The best run that is not a baseline (v2, the sweep's best), else the runner-up."""
        assert self._champion is not None
        ranked = sorted(
            (r for r in self._runs if r.run_id != self._champion.run_id),
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

    async def _step_agent_eval(self, inject: bool) -> _Outcome:
        """A short Experiment child scores the agent's rationale; the record step carries fail_at."""
        assert self._precheck is not None
        group, judge = self._precheck.agent_group, self._precheck.judge_group
        experiment_id = f"demo-eval-{workflow.info().run_id}"
        summary: dict[str, Any] = {"experiment_id": experiment_id, "rationale": self._rationale}
        status: Literal["pass", "skip"] = "pass"
        if group is None or judge is None:
            status = "skip"
            detail = "skipped: no chat or judge model group is configured"
        else:
            run_id = registry_run_id(DEMO_TENANT, experiment_id)

            async def discard() -> str:
                result: DiscardRunsResult = await self._local(
                    RegistryActivities.discard_runs,
                    DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=[run_id]),
                    retry_policy=COMPENSATION_RETRY_POLICY,
                )
                return f"discarded {len(result.deleted)} evaluation run"

            self._push("agent_eval", "discard the evaluation's registry run", "eval", discard)
            evaluated: ExperimentResult = await workflow.execute_child_workflow(
                Experiment.run,
                _evaluation(
                    experiment_id, group, judge, self._rationale, self._decision
                ).model_dump(mode="json", exclude_none=True),
                id=f"{workflow.info().workflow_id}-eval",
                execution_timeout=CHILD_EXECUTION_TIMEOUT,
                cancellation_type=workflow.ChildWorkflowCancellationType.TRY_CANCEL,
                static_summary=f"evaluate the agent's rationale for {workflow.info().workflow_id}",
            )
            scores = {
                e.name: {"mean": e.mean, "pass_rate": e.pass_rate} for e in evaluated.summary.evals
            }
            summary.update(
                registry_run_id=evaluated.registry_run_id,
                total=evaluated.summary.total,
                failed=evaluated.summary.failed,
                scores=scores,
            )
            detail = f"Experiment {experiment_id}: " + ", ".join(
                f"{name} mean {v['mean'] if v['mean'] is None else round(v['mean'], 3)}"
                f" pass {v['pass_rate'] if v['pass_rate'] is None else round(v['pass_rate'], 3)}"
                for name, v in scores.items()
            )
        result: StepOutput = await self._local(
            DemoAgentActivities.record_eval,
            EvalRecordInput(**self._step_input("agent_eval", inject), summary=summary),
            summary="agent_eval: record",
        )
        return _Outcome(status=status, detail=f"{detail} | {result.detail}", work_ms=result.work_ms)

    async def _step_verify(self, inject: bool) -> _Outcome:
        assert self._champion is not None
        result: StepOutput = await self._local(
            DemoRegistryActivities.verify,
            VerifyInput(
                **self._step_input("verify", inject),
                champion=self._champion,
                history_mark=self._history_mark,
            ),
            summary="verify",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)

    async def _step_cleanup(self, inject: bool) -> _Outcome:
        result: StepOutput = await self._local(
            DemoSessionActivities.cleanup,
            CleanupInput(**self._step_input("cleanup", inject)),
            summary="cleanup",
        )
        await self._local(
            DemoSessionActivities.finish,
            FinishInput(
                status="completed",
                champion_run_id=self._champion.run_id if self._champion else None,
                decision=self._decision,
            ),
            summary="cleanup: finish session",
        )
        return _Outcome(detail=result.detail, work_ms=result.work_ms)


_AGENT_SYSTEM_PROMPT = (
    "You are the release agent of a forecasting model registry. You decide whether a "
    "challenger model replaces the production champion; a smaller backtest WAPE (weighted "
    "absolute percentage error) means a more accurate model."
)


# The evaluation's rubric: what a good rationale of a release decision looks like.
EVAL_RUBRIC = (
    "Score 1 if the answer gives a clear promote-or-hold decision and a reason grounded in "
    "the backtest metrics; 0.5 if the reason is vague; 0 if there is no decision."
)


def _evaluation(
    experiment_id: str, group: str, judge: str, rationale: str, decision: str | None
) -> ExperimentInput:
    """A two-item dataset built from the rationale: restate it, and challenge it."""
    return ExperimentInput.model_validate(
        {
            "experiment_id": experiment_id,
            "tenant_id": DEMO_TENANT,
            "name": "demo: agent rationale",
            "dataset": {
                "items": [
                    {"id": "restate", "input": rationale, "expected": decision or "HOLD"},
                    {
                        "id": "challenge",
                        "input": f"{rationale} (a reviewer doubts this)",
                        "expected": decision or "HOLD",
                    },
                ]
            },
            "task": {
                "model_group": group,
                "prompt_template": "A release agent justified its decision with: {input}\n"
                "Should we promote or hold? Answer in two lines:\n"
                "Decision: PROMOTE or HOLD\nRationale: one sentence.",
            },
            "evals": [
                {"kind": "contains", "name": "has_decision", "value": "Decision:"},
                {
                    "kind": "llm_judge",
                    "name": "judge",
                    "model_group": judge,
                    "rubric": EVAL_RUBRIC,
                    "pass_threshold": 0.5,
                },
            ],
            "max_concurrency": 2,
        }
    )


def _agent_prompt(champion: RegisteredRun, challenger: RegisteredRun) -> str:
    if challenger.wape < champion.wape:
        comparison = (
            f"The challenger has the lower WAPE: it improves on the champion by "
            f"{(champion.wape - challenger.wape) / champion.wape:.1%}."
        )
    else:
        comparison = "The challenger's WAPE is not below the champion's."
    return (
        "Should we promote or hold?\n"
        f"Champion: {champion.name} ({champion.model}), backtest WAPE {champion.wape:.4f}.\n"
        f"Challenger: {challenger.name} ({challenger.model}), backtest WAPE "
        f"{challenger.wape:.4f}.\n{comparison}\n"
        "Answer in exactly two lines:\nDecision: PROMOTE or HOLD\nRationale: one sentence."
    )
