"""DemoCascade: its steps, input, progress and result, and the inputs of its activities."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from konstruct.platform.models import StrictModel

DEMO_TENANT = "demo"
DEMO_ALIAS = "demo-production"

Scenario = Literal["demo_minimal", "showcase_rich"]
StepStatus = Literal["pending", "running", "pass", "fail", "skip", "compensated"]
RunStatus = Literal[
    "running", "paused", "awaiting_approval", "compensating", "completed", "failed", "cancelled"
]
Decision = Literal["PROMOTE", "HOLD"]


class StepSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    phase: str
    scenarios: tuple[Scenario, ...]
    summary: str


_BOTH: tuple[Scenario, ...] = ("demo_minimal", "showcase_rich")
_RICH: tuple[Scenario, ...] = ("showcase_rich",)

# The whole showcase, in order. A scenario runs the steps that name it.
DEMO_STEPS: tuple[StepSpec, ...] = (
    StepSpec(
        name="precheck",
        phase="setup",
        scenarios=_BOTH,
        summary="schema, tenant, providers; remember the alias",
    ),
    StepSpec(name="reset", phase="setup", scenarios=_BOTH, summary="delete finished demo rows"),
    StepSpec(name="seed_data", phase="data", scenarios=_BOTH, summary="synthetic daily sales"),
    StepSpec(name="backfill", phase="data", scenarios=_RICH, summary="historical backfill"),
    StepSpec(name="features", phase="data", scenarios=_BOTH, summary="feature table"),
    StepSpec(
        name="train_baselines",
        phase="modeling",
        scenarios=_BOTH,
        summary="naive, seasonal_naive, moving_average",
    ),
    StepSpec(
        name="train_v2", phase="modeling", scenarios=_RICH, summary="trend + seasonality model"
    ),
    StepSpec(name="backtest", phase="modeling", scenarios=_BOTH, summary="rolling-origin WAPE"),
    StepSpec(name="batch_sweep", phase="modeling", scenarios=_RICH, summary="preset sweep (child)"),
    StepSpec(name="register_runs", phase="registry", scenarios=_BOTH, summary="runs and artifacts"),
    StepSpec(name="compat_compare", phase="registry", scenarios=_RICH, summary="v1 vs v2 runs"),
    StepSpec(
        name="promote", phase="registry", scenarios=_BOTH, summary="best run becomes champion"
    ),
    StepSpec(name="stale_alias_check", phase="registry", scenarios=_RICH, summary="stale aliases"),
    StepSpec(
        name="safer_promote",
        phase="decision",
        scenarios=_RICH,
        summary="swap to a worse run, detect, roll back",
    ),
    StepSpec(
        name="scenario_simulate_and_save",
        phase="planning",
        scenarios=_RICH,
        summary="plans on the recorded champion",
    ),
    StepSpec(name="plan_compare", phase="planning", scenarios=_RICH, summary="multi-plan compare"),
    StepSpec(
        name="rag_index", phase="knowledge", scenarios=_RICH, summary="embed a subset of docs"
    ),
    StepSpec(name="agent_decision", phase="agents", scenarios=_RICH, summary="promote or hold"),
    StepSpec(
        name="agent_eval", phase="agents", scenarios=_RICH, summary="Experiment on the rationale"
    ),
    StepSpec(name="verify", phase="ops", scenarios=_BOTH, summary="alias on champion, hashes"),
    StepSpec(name="cleanup", phase="ops", scenarios=_BOTH, summary="scratch data, session"),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in DEMO_STEPS)


def steps_of(scenario: Scenario) -> list[StepSpec]:
    return [s for s in DEMO_STEPS if scenario in s.scenarios]


class ScenarioSize(StrictModel):
    stores: int
    products: int
    days: int
    backfill_days: int = 0
    horizon: int = 14
    folds: int = 3


# Small on purpose: the showcase is about the registry and the saga, not scale.
SCENARIO_SIZES: dict[str, ScenarioSize] = {
    "demo_minimal": ScenarioSize(stores=2, products=2, days=182),
    "showcase_rich": ScenarioSize(stores=2, products=3, days=182, backfill_days=182),
}


# --- the workflow's input, progress and result ---------------------------------


class DemoCascadeInput(StrictModel):
    scenario: Scenario = "showcase_rich"
    seed: int = Field(42, ge=0, le=2**31 - 1, strict=True)
    approval: Literal["auto", "manual"] = "auto"
    # A step name: the step's activity fails (non-retryably) after its side effects.
    fail_at: str | None = None

    @field_validator("fail_at")
    @classmethod
    def _known_step(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if value not in STEP_NAMES:
            raise ValueError(f"unknown step {value!r}; steps: {', '.join(STEP_NAMES)}")
        scenario = info.data.get("scenario")
        if scenario is not None and value not in [s.name for s in steps_of(scenario)]:
            raise ValueError(f"step {value!r} is not part of scenario {scenario!r}")
        return value


class DemoStep(StrictModel):
    name: str
    phase: str
    status: StepStatus = "pending"
    detail: str = ""
    # Wall time of the step as the workflow saw it, and the time its activities
    # spent working (the rest is orchestration).
    duration_ms: float = 0.0
    work_ms: float = 0.0


class PendingApproval(StrictModel):
    proposal: Decision
    rationale: str
    champion_run_id: str
    challenger_run_id: str
    champion_wape: float
    challenger_wape: float
    deadline: datetime
    how: str = "signal `approve` or `reject` (konstruct demo approve|reject WORKFLOW_ID)"


class CompensationRecord(StrictModel):
    step: str
    action: str
    status: Literal["pass", "fail"]
    detail: str = ""


class ApprovalSignal(StrictModel):
    by: str = ""
    note: str = ""


class DemoProgress(StrictModel):
    workflow_id: str
    scenario: Scenario
    approval: str
    fail_at: str | None
    status: RunStatus
    current_step: str | None = None
    steps: list[DemoStep]
    pending_approval: PendingApproval | None = None
    decision: str | None = None
    compensations: list[CompensationRecord] = Field(default_factory=list)
    champion_run_id: str | None = None
    pre_run_alias_run_id: str | None = None
    alias_run_id: str | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)


class DemoCascadeResult(StrictModel):
    workflow_id: str
    workflow_run_id: str
    scenario: Scenario
    seed: int
    approval: str
    overall_status: Literal["pass", "fail"]
    steps: list[DemoStep]
    champion_run_id: str | None
    pre_run_alias_run_id: str | None
    alias_run_id: str | None
    decision: str | None = None
    total_ms: float = 0.0


# --- activity inputs and results ------------------------------------------------


class StepInput(StrictModel):
    """What every demo step activity gets: where its data lives, and whether to fail."""

    tenant_id: str = DEMO_TENANT
    step: str
    # `demo/sessions/<workflow run id>/`: everything scratch this run writes.
    session_prefix: str
    inject_failure: bool = False


In = TypeVar("In", bound=StepInput)


@dataclass(frozen=True)
class StepContext:
    """The step being run: its name, whether `fail_at` names it, where its data goes."""

    name: str
    inject: bool
    session_prefix: str
    tenant_id: str = DEMO_TENANT

    def input(self, kind: type[In], /, **fields: Any) -> In:
        """The step activity's input: its own fields, and where the step's data lives."""
        return kind(
            tenant_id=self.tenant_id,
            step=self.name,
            session_prefix=self.session_prefix,
            inject_failure=self.inject,
            **fields,
        )

    def without_injection(self) -> StepContext:
        """For a step's read-only activities: `fail_at` fails the one that makes the change."""
        return replace(self, inject=False)


# Results keep every field they ever had, read or not: recorded histories carry them
# and replay decodes them strictly.
class StepOutput(StrictModel):
    detail: str = ""
    work_ms: float = 0.0


class OpenSessionInput(StrictModel):
    tenant_id: str = DEMO_TENANT
    scenario: Scenario
    seed: int
    alias: str = DEMO_ALIAS


class SessionStart(StrictModel):
    """Where the alias was when this run began, as first recorded (a re-run reads the same)."""

    pre_run_alias_run_id: str | None
    history_mark: int


class PrecheckResult(StepOutput):
    llm_groups: list[str] = Field(default_factory=list)
    embed_available: bool = False
    agent_group: str | None = None
    judge_group: str | None = None


class ResetResult(StepOutput):
    deleted: dict[str, int] = Field(default_factory=dict)


class SeedDataInput(StepInput):
    seed: int
    size: ScenarioSize


class DataRef(StepOutput):
    uri: str
    sha256: str
    rows: int = 0
    series: int = 0


class BackfillInput(StepInput):
    data: DataRef
    seed: int
    size: ScenarioSize


class FeaturesInput(StepInput):
    data: DataRef


class TrainInput(StepInput):
    features: DataRef
    models: list[str]
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)


class TrainedModel(StrictModel):
    model: str
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    artifact_uri: str
    artifact_sha256: str
    artifact_size: int


class TrainResult(StepOutput):
    models: list[TrainedModel]


class BacktestInput(StepInput):
    features: DataRef
    models: list[TrainedModel]
    size: ScenarioSize


class BacktestScore(StrictModel):
    name: str
    model: str
    wape: float
    folds: int


class BacktestResult(StepOutput):
    scores: list[BacktestScore]


class SweepInput(StrictModel):
    """Input of the BatchSweep child workflow."""

    tenant_id: str = DEMO_TENANT
    session_prefix: str
    features: DataRef
    preset: str
    size: ScenarioSize
    inject_failure: bool = False


class SweepConfig(StrictModel):
    model: str
    params: dict[str, Any] = Field(default_factory=dict)


class SweepPlanInput(StrictModel):
    preset: str


class SweepPlan(StrictModel):
    preset: str
    configs: list[SweepConfig] = Field(min_length=1)


class SweepPointInput(StepInput):
    features: DataRef
    model: str
    params: dict[str, Any]
    size: ScenarioSize


class SweepPoint(StepOutput):
    model: str
    params: dict[str, Any]
    wape: float


class SweepResult(StrictModel):
    preset: str
    points: list[SweepPoint]
    best: TrainedModel
    best_wape: float
    work_ms: float = 0.0


class RegisterInput(StepInput):
    models: list[TrainedModel]
    scores: list[BacktestScore]
    run_ids: dict[str, str]  # model name -> run id chosen by the workflow
    seed: int
    scenario: Scenario


class RegisteredRun(StrictModel):
    run_id: str
    name: str
    model: str
    wape: float
    artifact_uri: str
    artifact_sha256: str


class RegisterResult(StepOutput):
    runs: list[RegisteredRun]


class CompatInput(StepInput):
    v1: RegisteredRun
    v2: RegisteredRun


class CompatResult(StepOutput):
    compatible: bool


class PromoteInput(StepInput):
    alias: str = DEMO_ALIAS
    champion: RegisteredRun
    move_id: str
    reason: str


class MoveOutput(StepOutput):
    moved: bool
    from_run_id: str | None = None
    to_run_id: str | None = None


class StaleCheckInput(StepInput):
    champion_run_id: str
    alias: str = DEMO_ALIAS


class StaleCheckResult(StepOutput):
    checked: int
    stale: list[str] = Field(default_factory=list)


class RegressionCheckInput(StepInput):
    alias: str = DEMO_ALIAS
    champion: RegisteredRun
    # The trial swap: the run it put live is the one judged.
    swap_move_id: str


class RegressionCheck(StepOutput):
    alias_run_id: str | None
    alias_wape: float | None
    champion_wape: float
    regressed: bool
    artifact_key: str | None = None


class ScenarioInput(StepInput):
    champion: RegisteredRun
    features: DataRef
    horizon: int


class SavedPlan(StrictModel):
    name: str
    uri: str
    sha256: str
    total_units: float
    summary: dict[str, Any] = Field(default_factory=dict)


class ScenarioResult(StepOutput):
    plans: list[SavedPlan]


class PlanCompareInput(StepInput):
    plans: list[SavedPlan]


class PlanCompareResult(StepOutput):
    ranking: list[str]
    best: str


class RagInput(StepInput):
    question: str


class RagResult(StepOutput):
    skipped: bool = False
    chunks: int = 0
    uri: str | None = None
    top_documents: list[str] = Field(default_factory=list)


class DecisionApplyInput(StepInput):
    alias: str = DEMO_ALIAS
    proposal: Decision
    approved: bool
    how: str
    rationale: str
    champion: RegisteredRun
    challenger: RegisteredRun
    move_id: str


class DecisionApplyResult(StepOutput):
    decision: Decision
    promoted: bool
    champion_run_id: str


class EvalRecordInput(StepInput):
    summary: dict[str, Any] = Field(default_factory=dict)


class VerifyInput(StepInput):
    alias: str = DEMO_ALIAS
    champion: RegisteredRun
    history_mark: int


class FinishInput(StrictModel):
    tenant_id: str = DEMO_TENANT
    status: str
    champion_run_id: str | None
    decision: str | None = None


class DeletePrefixInput(StrictModel):
    tenant_id: str = DEMO_TENANT
    prefix: str
