"""Experiment: its input, progress and result, and the inputs of its activities.

Over 600 lines for one reason: every payload the Experiment histories record has one home.

Side-effect free: the workflow imports it. New fields get defaults, so
recorded histories keep replaying.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from konstruct.platform.models import StrictModel
from konstruct.providers.structured import check_response_format, check_schema

_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_EXPERIMENT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

# Items in flight per experiment, unless the input says otherwise.
DEFAULT_MAX_CONCURRENCY = 20
MAX_CONCURRENCY_LIMIT = 1000

ExperimentStatus = Literal[
    "running", "stopping", "stopped", "paused", "completed", "incomplete", "failed"
]
ItemStatus = Literal["pending", "ok", "failed"]


# --- the input ------------------------------------------------------------------


# An agent task's item fields beyond `input`: further user turns and tool fixtures.
AGENT_ITEM_FIELDS = ("turns", "tool_results")


class DatasetItem(StrictModel):
    id: str = Field(min_length=1, max_length=200)
    input: str = Field(min_length=1)
    expected: Any = None
    # Extra fields: a dataset file's other columns (as text), or given inline; each
    # is usable in the prompt template as `{name}`.
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _agent_fields(cls, value: Any) -> Any:
        """An agent task's `turns` and `tool_results` may be given beside `input`; they
        are kept with the item's other fields (`konstruct.experiments.trajectory`)."""
        if isinstance(value, dict) and any(k in value for k in AGENT_ITEM_FIELDS):
            value = dict(value)
            metadata = dict(value.get("metadata") or {})
            for key in AGENT_ITEM_FIELDS:
                if key in value:
                    metadata[key] = value.pop(key)
            value["metadata"] = metadata
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # JSONL files often number their items; 7 and "7" are the same id.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


DatasetFormat = Literal["jsonl", "csv", "parquet"]
# A template's placeholders: `{name}` (letters, digits, `_`, `-`, `.`; not starting
# with a digit); `{{name}}` is the literal text `{name}`.
PLACEHOLDER = re.compile(r"\{\{([^\W\d][\w.-]*)\}\}|\{([^\W\d][\w.-]*)\}")


def template_fields(template: str) -> list[str]:
    """The names a prompt template's placeholders refer to, in order, once each."""
    names = (m.group(2) for m in PLACEHOLDER.finditer(template) if m.group(2) is not None)
    return list(dict.fromkeys(names))


class DatasetSpec(StrictModel):
    """Either a file read by the worker (JSONL, CSV or Parquet, mapped to items by
    the `*_field` columns; every other column is an extra field of the item) or
    the items inline."""

    path: str | None = None
    items: list[DatasetItem] | None = None
    # The columns (JSONL keys) holding each item's input, expected answer and id.
    # Without an id column an item's id is `row-<n>`, n its row (see datasets.md).
    input_field: str = Field("input", min_length=1)
    expected_field: str = Field("expected", min_length=1)
    id_field: str = Field("id", min_length=1)
    # Default: from the extension (.jsonl/.json/.ndjson, .csv, .parquet/.pq).
    format: DatasetFormat | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.items is None):
            raise ValueError(
                "give exactly one of `path` (a JSONL, CSV or Parquet file) or `items` (inline)"
            )
        if self.items is not None:
            mapped = [
                name
                for name in ("input_field", "expected_field", "id_field")
                if getattr(self, name) != type(self).model_fields[name].default
            ] + (["format"] if self.format is not None else [])
            if mapped:
                raise ValueError(f"{', '.join(mapped)}: only for a dataset file (`path`)")
        return self


class TaskSpec(StrictModel):
    """A prompt task (`model_group` and `prompt_template`), or a tenant's agent
    (`agent`: each item is a message to it, or a conversation; `model_group`, if
    given, runs the agent on that group instead of its own)."""

    model_group: str | None = Field(None, min_length=1)
    prompt_template: str | None = Field(None, min_length=1)
    agent: str | None = Field(None, pattern=_ID)
    # Agent tasks: `fixtures` answers every tool with side effects from the item's
    # `tool_results` (calculator and knowledge_search run live); `live` runs them all.
    tools: Literal["fixtures", "live"] = "fixtures"
    # Agent tasks: how a call that needs a person's approval is answered.
    approvals: Literal["approve", "reject"] = "reject"
    system_prompt: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    # OpenAI's structured output, passed to the provider as it is:
    # {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}.
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _a_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_response_format(value)

    @field_validator("prompt_template")
    @classmethod
    def _uses_input(cls, value: str | None) -> str | None:
        if value is not None and "input" not in template_fields(value):
            raise ValueError("must contain `{input}`, where each item's input goes")
        return value

    @model_validator(mode="after")
    def _prompt_or_agent(self) -> TaskSpec:
        if self.agent is not None:
            if self.prompt_template is not None or self.system_prompt is not None:
                raise ValueError(
                    "task.prompt_template: an agent task takes its prompt from the agent;"
                    " give `agent` or `prompt_template`, not both"
                )
            return self
        missing = [f for f in ("model_group", "prompt_template") if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"task.{missing[0]}: required for a prompt task (or give task.agent to"
                " evaluate one of the tenant's agents)"
            )
        return self

    @property
    def template(self) -> str:
        """A prompt task's template (validated present)."""
        assert self.prompt_template is not None, "an agent task has no template"
        return self.prompt_template


class _Eval(StrictModel):
    # Defaults to the kind; two evals of one kind need names to tell them apart.
    name: str | None = None


class ExactMatchEval(_Eval):
    kind: Literal["exact_match"]
    case_sensitive: bool = False


class ContainsEval(_Eval):
    kind: Literal["contains"]
    # The text to look for; default: the item's `expected`.
    value: str | None = None
    case_sensitive: bool = False


class RegexEval(_Eval):
    kind: Literal["regex"]
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class NumericCloseEval(_Eval):
    kind: Literal["numeric_close"]
    tolerance: float = Field(1e-6, ge=0)
    relative: bool = False


class JsonValidEval(_Eval):
    kind: Literal["json_valid"]


class JsonSchemaEval(_Eval):
    """Passes when the reply is JSON (a ```json fence allowed) that validates against
    `schema` (JSON Schema, its own draft by `$schema`, else 2020-12)."""

    # `schema` on the wire, in and out (a field of that name would shadow BaseModel's).
    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True)

    kind: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema(value)
        return value


class LlmJudgeEval(_Eval):
    kind: Literal["llm_judge"]
    model_group: str = Field(min_length=1)
    rubric: str = Field(min_length=1)
    # A score (0..1) at or above this passes.
    pass_threshold: float = Field(0.5, ge=0, le=1)


LocalEvalSpec = Annotated[
    ExactMatchEval | ContainsEval | RegexEval | NumericCloseEval | JsonValidEval | JsonSchemaEval,
    Field(discriminator="kind"),
]


# --- trajectory evals: what an agent did, read from its transcript (agent tasks) ---


class ToolCalledEval(_Eval):
    """Passes when the agent called `tool` (with arguments that include `arguments`,
    if given), at least once, or exactly `count` times."""

    kind: Literal["tool_called"]
    tool: str = Field(min_length=1)
    arguments: dict[str, Any] | None = None
    count: int | None = Field(None, ge=0)


class ToolNotCalledEval(_Eval):
    kind: Literal["tool_not_called"]
    tool: str = Field(min_length=1)


class MaxStepsEval(_Eval):
    """Passes when the item took at most `max` model steps over all its turns."""

    kind: Literal["max_steps"]
    max: int = Field(ge=1)


class FinalAnswerEval(_Eval):
    """A deterministic eval (`check`) of the agent's last reply."""

    kind: Literal["final_answer"]
    check: LocalEvalSpec


EvalSpec = Annotated[
    ExactMatchEval
    | ContainsEval
    | RegexEval
    | NumericCloseEval
    | JsonValidEval
    | JsonSchemaEval
    | LlmJudgeEval
    | ToolCalledEval
    | ToolNotCalledEval
    | MaxStepsEval
    | FinalAnswerEval,
    Field(discriminator="kind"),
]
TRAJECTORY_KINDS = ("tool_called", "tool_not_called", "max_steps", "final_answer")
EVAL_KINDS = (
    "exact_match",
    "contains",
    "regex",
    "numeric_close",
    "json_valid",
    "json_schema",
    "llm_judge",
    *TRAJECTORY_KINDS,
)


def eval_name(spec: Any) -> str:
    return str(spec.name or spec.kind)


def usd(amount: float | None) -> str:
    """US dollars for people: cents above $100, else four or six decimals."""
    if amount is None:
        return "$?"
    if abs(amount) >= 100:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if abs(amount) >= 0.01 or amount == 0 else f"${amount:.6f}"


class ExperimentOptions(StrictModel):
    """Workflow-side settings. `ExperimentSettings` inherits them (flat keys under
    `experiments.`); `konstruct experiments start` copies them into the input."""

    # A stop/resume within this long of the previous accepted one is refused.
    toggle_cooldown_s: float = Field(5.0, ge=0)
    # One provider call: start-to-close and heartbeat timeout.
    call_timeout_s: float = Field(120.0, gt=0)
    heartbeat_timeout_s: float = Field(10.0, gt=0)
    # Temporal retries of a call: 1 s, 2 s, 4 s ... 32 s.
    retry_initial_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(32.0, gt=0)
    # 0: retry a retryable error forever (the breaker stops a dead provider).
    max_attempts: int = Field(0, ge=0)
    # Completed items per workflow run before continue-as-new (bounded history).
    continue_as_new_every: int = Field(1000, ge=1)
    # Pending item ids fetched per page.
    page_size: int = Field(500, ge=1, le=5000)
    # How often progress, rates and breakers are refreshed into the workflow.
    monitor_interval_s: float = Field(2.0, gt=0)
    # At a provider rate of `batch_above_rps` or more, task calls go in batches of
    # rate x `batch_window_s` items (2 to `batch_max_items`), one activity each:
    # the per-item cost of an activity is what bounds throughput at high rates.
    batch_above_rps: float = Field(40.0, gt=0)
    batch_window_s: float = Field(0.1, gt=0)
    batch_max_items: int = Field(50, ge=2, le=500)


def attempts_left(max_attempts: int, made: int) -> bool:
    """Whether an item (or a call) that made `made` attempts may make another, under
    `max_attempts` (0: no limit)."""
    return max_attempts == 0 or made < max_attempts


class BudgetSpec(StrictModel):
    """What an experiment may spend: US dollars and/or tokens (prompt + completion)
    over all its calls, task and judges. Each call reserves its estimate first; a
    reservation that does not fit pauses the experiment (`paused`, reason `budget`)."""

    max_usd: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)


# Why an experiment is `paused`: a spent budget or quota (until resumed), or an
# open circuit breaker (resumes by itself).
PauseKind = Literal["budget", "quota", "breaker"]


class ToggleRecord(StrictModel):
    action: Literal["stop", "resume"]
    accepted: bool
    reason: str = ""
    at: str  # ISO time on the workflow clock


class SpendTotals(StrictModel):
    """What an experiment's calls cost so far: US dollars (a call of unknown price
    counts 0 and clears `cost_known`), the calls the output cache answered (they
    cost 0) and what they had cost when they were made."""

    cost_usd: float = 0.0
    cost_known: bool = True
    cache_hits: int = 0
    cost_saved_usd: float = 0.0


class ResultTotals(SpendTotals):
    """The results stored so far (ok, failed, with every eval scored) and their cost."""

    completed: int = 0
    failed: int = 0
    evaluated: int = 0


class CallCost(StrictModel):
    """What one call cost, as the workflow counts it: US dollars (0 from the cache;
    0 with `cost_known` false: no price known), whether the cache answered it, and
    what that answer had cost."""

    cost_usd: float = 0.0
    cost_known: bool = True
    cached: bool = False
    saved_usd: float = 0.0


class ExperimentCarry(ResultTotals):
    """What one workflow run hands the next at continue-as-new."""

    run_index: int = 0
    prepared: PrepareResult
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_requested: bool = False
    last_toggle_at: float | None = None
    toggles: list[ToggleRecord] = Field(default_factory=list)
    started_at: float = 0.0
    # Passes made again over items left without a result (see `Experiment`).
    settle_rounds: int = 0


class ExperimentInput(StrictModel):
    experiment_id: str = Field(pattern=_EXPERIMENT_ID)
    tenant_id: str = Field(pattern=_ID)
    name: str | None = Field(None, max_length=200)
    dataset: DatasetSpec
    task: TaskSpec
    evals: list[EvalSpec] = Field(default_factory=list)
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1, le=MAX_CONCURRENCY_LIMIT)
    # Each item runs this many times; a result per (item, epoch).
    epochs: int = Field(1, ge=1, le=100)
    # Answer a call from the tenant's output cache when the same call (deployment,
    # messages, temperature, max_tokens, epoch) succeeded before; false: always call.
    cache: bool = True
    budget: BudgetSpec | None = None
    options: ExperimentOptions = ExperimentOptions()
    # Set by the workflow itself when it continues as new; never by a caller.
    carry: ExperimentCarry | None = None

    @field_validator("evals", mode="before")
    @classmethod
    def _known_kinds(cls, value: Any) -> Any:
        if isinstance(value, list):
            for index, spec in enumerate(value):
                kind = spec.get("kind") if isinstance(spec, dict) else getattr(spec, "kind", None)
                if kind not in EVAL_KINDS:
                    raise ValueError(
                        f"evals.{index}.kind: unknown eval kind {kind!r}; "
                        f"known: {', '.join(EVAL_KINDS)}"
                    )
        return value

    @field_validator("evals")
    @classmethod
    def _unique_names(cls, value: list[Any]) -> list[Any]:
        names = [eval_name(e) for e in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two evals are named {duplicates}; give each a distinct `name`")
        return value

    @model_validator(mode="after")
    def _trajectory_needs_an_agent(self) -> ExperimentInput:
        if self.task.agent is None:
            for index, spec in enumerate(self.evals):
                if spec.kind in TRAJECTORY_KINDS:
                    raise ValueError(
                        f"evals.{index}.kind: {spec.kind} reads an agent's transcript;"
                        " it needs an agent task (task.agent)"
                    )
        return self


# --- the activities ---------------------------------------------------------------


class Route(StrictModel):
    """One deployment of a model group: its provider decides the task queue."""

    deployment_id: str
    provider: str


class PrepareInput(StrictModel):
    experiment: ExperimentInput
    workflow_id: str


class PrepareResult(ResultTotals):
    """The experiment stored, with the results already stored and what they cost (a
    restart or a resume after a crash), and where its calls go."""

    total: int
    task_routes: list[Route]
    # Eval name -> routes of its judge group (llm_judge evals only).
    judge_routes: dict[str, list[Route]] = Field(default_factory=dict)
    providers: list[str]


class PendingPageInput(StrictModel):
    tenant_id: str
    experiment_id: str
    after_seq: int = -1
    limit: int = 500


class PendingItem(StrictModel):
    seq: int
    item_id: str
    # The task output is stored; only judge evals are missing.
    needs_task: bool = True
    missing_evals: list[str] = Field(default_factory=list)


class PendingPage(StrictModel):
    items: list[PendingItem]


class RunItemInput(StrictModel):
    tenant_id: str
    experiment_id: str
    item_id: str
    deployment_id: str
    provider: str
    # The item's place in the dataset, which its row is looked up by (None in runs
    # recorded before it was sent: by `item_id`).
    seq: int | None = None


class RunItemResult(CallCost):
    item_id: str
    status: ItemStatus
    # Judge evals still to run for this item.
    missing_evals: list[str] = Field(default_factory=list)
    latency_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_kind: str | None = None
    # False when the result was stored by an earlier attempt or run.
    fresh: bool = True


class BatchItem(StrictModel):
    item_id: str
    deployment_id: str
    # The item's place in the dataset: its row is looked up by it (None in batches
    # of runs recorded before it was sent: by `item_id`).
    seq: int | None = None


class RunBatchInput(StrictModel):
    """Task calls of several items to one provider, in one activity (high rates)."""

    tenant_id: str
    experiment_id: str
    provider: str
    items: list[BatchItem]
    # The items' `max_attempts` (0: no limit). A batch's failed call is one of them:
    # it is counted as retried only when another is left.
    max_attempts: int = Field(0, ge=0)


# What became of one item of a batch: a stored result (ok or failed), or, for the
# workflow to act on: "stopped" (never called: still pending), "quota" (the
# provider's quota is spent: pause), "retry" (not done here: the item goes on the
# single-call path with its Temporal retries, after `retry_in_s`), "budget" (its
# reservation did not fit in a budget: pause; still pending).
BatchItemStatus = Literal["ok", "failed", "stopped", "quota", "retry", "budget"]


class BatchItemResult(CallCost):
    item_id: str
    status: BatchItemStatus
    missing_evals: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fresh: bool = True
    retry_in_s: float = 0.0
    message: str | None = None
    # A `retry` whose call was made and failed (not a 429, not held back): the
    # failure's kind, and `message` its words. That call was one of the item's
    # `max_attempts`.
    failed_kind: str | None = None


class RunBatchResult(StrictModel):
    items: list[BatchItemResult]


class JudgeItemInput(StrictModel):
    tenant_id: str
    experiment_id: str
    item_id: str
    eval_name: str
    deployment_id: str
    provider: str
    seq: int | None = None  # as `RunItemInput.seq`


class JudgeItemResult(CallCost):
    """A judge eval's score; its cost is 0 when the score was stored before."""

    item_id: str
    eval_name: str
    score: float | None
    evaluated: bool


class RecordFailureInput(StrictModel):
    tenant_id: str
    experiment_id: str
    item_id: str
    error_kind: str
    error: str


class StopFlagInput(StrictModel):
    tenant_id: str
    experiment_id: str
    stopped: bool
    workflow_id: str
    # Activity ids still waiting for capacity: cancelled, they make no call.
    cancel_waiting: bool = True


class StatusInput(StrictModel):
    """The status the workflow has now, for the experiment's row (list, show, report)."""

    tenant_id: str
    experiment_id: str
    status: ExperimentStatus


class StopFlagResult(StrictModel):
    waiting_activity_ids: list[str] = Field(default_factory=list)


class WaitingCallsInput(StrictModel):
    workflow_id: str


class WaitingCalls(StrictModel):
    activity_ids: list[str] = Field(default_factory=list)


class MonitorInput(StrictModel):
    tenant_id: str
    experiment_id: str
    providers: list[str]
    with_latency: bool = True


class ProviderProgress(StrictModel):
    provider: str
    rate_rps: float
    initial_rps: float
    ceiling_rps: float | None = None
    breaker: str = "closed"
    consecutive_failures: int = 0
    breaker_trips: int = 0
    cooldown_left_s: float = 0.0
    ok_total: int = 0
    throttled_total: int = 0
    failure_total: int = 0
    # Per second over the last monitor interval.
    ok_per_s: float = 0.0
    throttled_per_s: float = 0.0


class LatencyStats(StrictModel):
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


class BudgetProgress(StrictModel):
    """An experiment's budget and its tenant's for this month, as PostgreSQL holds them."""

    max_usd: float | None = None
    max_tokens: int | None = None
    spent_usd: float = 0.0
    spent_tokens: int = 0
    # Held by calls in flight (their estimates).
    reserved_usd: float = 0.0
    reserved_tokens: int = 0
    tenant_month: str | None = None
    tenant_max_usd: float | None = None
    tenant_spent_usd: float = 0.0
    tenant_reserved_usd: float = 0.0


class MonitorResult(StrictModel):
    providers: list[ProviderProgress]
    latency: LatencyStats = LatencyStats()
    at: float = 0.0
    # None: neither the experiment nor its tenant has a budget.
    budget: BudgetProgress | None = None


class FinalizeInput(StrictModel):
    tenant_id: str
    experiment_id: str
    name: str
    status: ExperimentStatus
    workflow_id: str
    workflow_run_id: str
    providers: list[str]
    params: dict[str, Any] = Field(default_factory=dict)
    # With status `incomplete`: why items were left without a result.
    reason: str | None = None


class ResultCountInput(StrictModel):
    tenant_id: str
    experiment_id: str


class ResultCount(StrictModel):
    """What PostgreSQL holds: the experiment's items, and how many have a result."""

    total: int
    with_result: int


class EvalSummary(StrictModel):
    name: str
    kind: str
    scored: int
    mean: float | None
    pass_rate: float | None
    # Over the dataset's items (each item's mean over its epochs): the standard
    # error of `mean`, and with epochs > 1 the share of items passed at least once.
    stderr: float | None = None
    pass_at_k: float | None = None


class ExperimentSummary(SpendTotals):
    experiment_id: str
    tenant_id: str
    name: str
    status: ExperimentStatus
    total: int
    completed: int
    failed: int
    evals: list[EvalSummary]
    latency: LatencyStats
    prompt_tokens: int
    completion_tokens: int
    errors_by_kind: dict[str, int]
    # Per provider: 429s, 429 share, breaker trips, final rate.
    providers: dict[str, dict[str, float]] = Field(default_factory=dict)
    duration_s: float | None = None
    epochs: int = 1
    # The spend totals count task calls and judge calls (the cache answers both);
    # here apart.
    task_cost_usd: float = 0.0
    judge_cost_usd: float = 0.0
    budget: BudgetProgress | None = None
    registry_run_id: str | None = None
    # Items with neither an ok nor a failed result (status `incomplete`), and why.
    unfinished: int = 0
    incomplete_reason: str | None = None


# --- the workflow's progress and result -----------------------------------------------


class ExperimentProgress(SpendTotals):
    experiment_id: str
    tenant_id: str
    name: str
    status: ExperimentStatus
    paused_reason: str | None = None
    # With status `paused`: why, in one word (`paused_reason` says more).
    paused_kind: PauseKind | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    evaluated: int = 0
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    # in_flight / max_concurrency.
    slot_utilisation: float = 0.0
    items_per_s: float = 0.0
    eta_s: float | None = None
    providers: list[ProviderProgress] = Field(default_factory=list)
    latency: LatencyStats = LatencyStats()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    budget: BudgetProgress | None = None
    run_index: int = 0
    toggles: list[ToggleRecord] = Field(default_factory=list)
    last_refusal: ToggleRecord | None = None
    error: str | None = None
    # Items found without a result at the end, being dispatched again (or, when
    # `incomplete`, left so), and why.
    unfinished: int = 0
    incomplete_reason: str | None = None


class ToggleInput(StrictModel):
    by: str = ""


class ToggleResult(StrictModel):
    accepted: bool
    status: ExperimentStatus
    reason: str = ""


class ExperimentResult(StrictModel):
    summary: ExperimentSummary
    registry_run_id: str | None = None


ExperimentCarry.model_rebuild()
