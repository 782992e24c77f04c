"""The experiments' SQL: experiments, their items and results, summaries.

Read by the experiment activities and the CLI alike; every statement runs
inside `db.tenant_transaction`, so row-level security scopes it to a tenant.
An item read for a provider call also joins the provider's breaker row, so a
call with a closed breaker needs no second round trip.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from pydantic import TypeAdapter

from konstruct.db import tenant_transaction
from konstruct.errors import NotFound
from konstruct.models.experiments import (
    DatasetItem,
    EvalSpec,
    EvalSummary,
    ExperimentSummary,
    LatencyStats,
    PendingItem,
    TaskSpec,
    eval_name,
)
from konstruct.provider_control import BreakerState
from konstruct.store.providers import breaker_from_row

_EVALS = TypeAdapter(list[EvalSpec])
_INSERT_BATCH = 2000
_BREAKER_COLUMNS = (
    "b.status as breaker_status, b.consecutive_failures, b.opened_at, b.probe_started_at, b.trips"
)


# The result row of item `i`, looked up by its key: with `offset 0` the planner keeps
# it a probe per item instead of hashing every result of the experiment (which
# grows with it: 20 ms a page at 100,000 items, against 3 ms).
_RESULT_OF_ITEM = (
    "(select {columns} from experiment_results r where r.tenant_id = i.tenant_id"
    " and r.experiment_id = i.experiment_id and r.item_id = i.item_id offset 0) r"
)

# --- the experiment and its items ---------------------------------------------------


@dataclass(frozen=True)
class StoredSpec:
    """The task and evals an experiment was stored with."""

    task: TaskSpec
    evals: list[Any]

    @property
    def judges(self) -> dict[str, Any]:
        """The `llm_judge` evals by name."""
        return {eval_name(e): e for e in self.evals if e.kind == "llm_judge"}

    @classmethod
    def from_json(cls, raw: str) -> StoredSpec:
        spec = json.loads(raw)
        return cls(
            task=TaskSpec.model_validate(spec["task"]), evals=_EVALS.validate_python(spec["evals"])
        )


@dataclass(frozen=True)
class ResultCounts:
    completed: int
    failed: int
    evaluated: int


async def tenant_exists(conn: asyncpg.Connection, tenant_id: str) -> bool:
    return bool(await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id))


async def _experiment_column(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    column: Literal["spec", "spec_digest", "workflow_id"],
) -> str | None:
    """One text column of an experiment (None: no such experiment)."""
    found = await conn.fetchval(
        f"select {column} from experiments where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return None if found is None else str(found)


async def spec_digest(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> str | None:
    """The digest of the spec and dataset an experiment was stored with (None: new)."""
    return await _experiment_column(conn, tenant_id, experiment_id, "spec_digest")


async def store_experiment(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    *,
    name: str,
    spec: dict[str, Any],
    digest: str,
    workflow_id: str,
    items: list[DatasetItem],
    on_batch: Callable[[int], None] = lambda _start: None,
) -> ResultCounts:
    """The experiment (running again if it existed) and its items, each stored once;
    returns the results already stored. `on_batch` is told each batch's first index."""
    await conn.execute(
        "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
        " workflow_id, total) values ($1, $2, $3, $4, $5, $6, $7)"
        " on conflict (tenant_id, experiment_id) do update set workflow_id = $6,"
        " status = 'running', stop_requested = false, updated_at = now()",
        tenant_id,
        experiment_id,
        name,
        json.dumps(spec),
        digest,
        workflow_id,
        len(items),
    )
    for start in range(0, len(items), _INSERT_BATCH):
        on_batch(start)
        batch = items[start : start + _INSERT_BATCH]
        await conn.execute(
            "insert into experiment_items (tenant_id, experiment_id, item_id, seq, input,"
            " expected, metadata) select $1, $2, * from unnest($3::text[], $4::int[],"
            " $5::text[], $6::jsonb[], $7::jsonb[]) on conflict do nothing",
            tenant_id,
            experiment_id,
            [i.id for i in batch],
            list(range(start, start + len(batch))),
            [i.input for i in batch],
            [None if i.expected is None else json.dumps(i.expected) for i in batch],
            [json.dumps(i.metadata) for i in batch],
        )
    counts = await conn.fetchrow(
        "select count(*) filter (where status = 'ok') as completed,"
        " count(*) filter (where status = 'failed') as failed,"
        " count(*) filter (where status = 'ok' and evaluated) as evaluated"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return ResultCounts(counts["completed"], counts["failed"], counts["evaluated"])


async def stored_spec(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> StoredSpec | None:
    raw = await _experiment_column(conn, tenant_id, experiment_id, "spec")
    return None if raw is None else StoredSpec.from_json(raw)


async def pending_items(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, after_seq: int, limit: int
) -> list[PendingItem]:
    """Items after `after_seq` that have no complete result, in dataset order."""
    spec = await stored_spec(conn, tenant_id, experiment_id)
    rows = await conn.fetch(
        "select i.seq, i.item_id, r.status, r.scores from experiment_items i"
        " left join lateral "
        + _RESULT_OF_ITEM.format(columns="status, scores, evaluated")
        + " on true"
        " where i.tenant_id = $1 and i.experiment_id = $2 and i.seq > $3"
        " and (r.status is null or (r.status = 'ok' and not r.evaluated))"
        " order by i.seq limit $4",
        tenant_id,
        experiment_id,
        after_seq,
        limit,
    )
    judges = list(spec.judges) if spec is not None else []
    items = []
    for r in rows:
        scores = _scores(r["scores"])
        items.append(
            PendingItem(
                seq=r["seq"],
                item_id=r["item_id"],
                needs_task=r["status"] is None,
                missing_evals=[n for n in judges if n not in scores],
            )
        )
    return items


async def set_stop_flag(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, stopped: bool
) -> None:
    await _update_experiment(
        conn,
        tenant_id,
        experiment_id,
        "stop_requested = $3, status = $4, updated_at = now()",
        stopped,
        "stopping" if stopped else "running",
    )


async def count_retried_call(
    pool: asyncpg.Pool,
    tenant_id: str,
    experiment_id: str,
    what: Literal["throttled", "call_failures"],
    calls: int = 1,
) -> None:
    """More calls of the experiment that a 429 or a provider failure sent back."""
    async with tenant_transaction(pool, tenant_id) as conn:
        await _update_experiment(conn, tenant_id, experiment_id, f"{what} = {what} + $3", calls)


async def stop_requested(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "select stop_requested from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
    )


async def store_summary(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    summary: ExperimentSummary,
    registry_run_id: str,
) -> None:
    """The experiment is finished: its status, summary and registry run."""
    await _update_experiment(
        conn,
        tenant_id,
        experiment_id,
        "status = $3, summary = $4, registry_run_id = $5, completed_at = now(), updated_at = now()",
        summary.status,
        summary.model_dump_json(),
        uuid.UUID(registry_run_id),
    )


async def _update_experiment(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, assignments: str, *values: Any
) -> None:
    """`update experiments set <assignments>` of one experiment; values start at $3."""
    await conn.execute(
        f"update experiments set {assignments} where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
        *values,
    )


# --- results ------------------------------------------------------------------------


def _scores(raw: str | None) -> dict[str, Any]:
    return json.loads(raw) if raw else {}


def _expected(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


def _breaker_seen(row: Any) -> BreakerState | None:
    if row["breaker_status"] is None:
        return None
    return breaker_from_row(row, status_column="breaker_status")


@dataclass(frozen=True)
class StoredResult:
    status: Literal["ok", "failed"]
    scores: dict[str, Any]
    latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    error_kind: str | None

    @classmethod
    def from_row(cls, row: Any) -> StoredResult:
        return cls(
            status=row["status"],
            scores=_scores(row["scores"]),
            latency_ms=row["latency_ms"],
            prompt_tokens=row["prompt_tokens"] or 0,
            completion_tokens=row["completion_tokens"] or 0,
            error_kind=row["error_kind"],
        )


@dataclass(frozen=True)
class CallRef:
    """The item a provider call is for, and the provider queue whose breaker it reads."""

    tenant_id: str
    experiment_id: str
    item_id: str
    task_queue: str
    provider: str

    @property
    def args(self) -> tuple[str, str, str, str, str]:
        return (self.tenant_id, self.experiment_id, self.item_id, self.task_queue, self.provider)


@dataclass(frozen=True)
class TaskCall:
    """An item about to get its task call, read with its result and the breaker."""

    seq: int
    input: str
    expected: Any
    stop_requested: bool
    # Stored by an earlier attempt or run: no call needed.
    result: StoredResult | None
    # The provider's breaker (None: no row yet).
    breaker: BreakerState | None


@dataclass(frozen=True)
class JudgeCall:
    """An item's task output about to be judged, read with the breaker."""

    input: str
    expected: Any
    output: str
    scores: dict[str, Any]
    stop_requested: bool
    breaker: BreakerState | None


async def task_call(conn: asyncpg.Connection, ref: CallRef) -> TaskCall | None:
    row = await conn.fetchrow(
        "select i.seq, i.input, i.expected, e.stop_requested, r.status, r.scores,"
        " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
        + _BREAKER_COLUMNS
        + " from experiment_items i join experiments e using (tenant_id, experiment_id)"
        " left join experiment_results r using (tenant_id, experiment_id, item_id)"
        " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
        " where i.tenant_id = $1 and i.experiment_id = $2 and i.item_id = $3",
        *ref.args,
    )
    if row is None:
        return None
    return _task_call(row)


async def task_calls(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    item_ids: list[str],
    task_queue: str,
    provider: str,
) -> dict[str, TaskCall]:
    """`task_call` of several items in one query (a batch's); absent ids are missing."""
    rows = await conn.fetch(
        "select i.item_id, i.seq, i.input, i.expected, e.stop_requested, r.status, r.scores,"
        " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
        + _BREAKER_COLUMNS
        + " from experiment_items i join experiments e using (tenant_id, experiment_id)"
        " left join lateral "
        + _RESULT_OF_ITEM.format(
            columns="status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
        )
        + " on true"
        " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
        " where i.tenant_id = $1 and i.experiment_id = $2 and i.item_id = any($3::text[])",
        tenant_id,
        experiment_id,
        item_ids,
        task_queue,
        provider,
    )
    return {row["item_id"]: _task_call(row) for row in rows}


def _task_call(row: Any) -> TaskCall:
    return TaskCall(
        seq=row["seq"],
        input=row["input"],
        expected=_expected(row["expected"]),
        stop_requested=row["stop_requested"],
        result=None if row["status"] is None else StoredResult.from_row(row),
        breaker=_breaker_seen(row),
    )


async def judge_call(conn: asyncpg.Connection, ref: CallRef) -> JudgeCall | None:
    row = await conn.fetchrow(
        "select i.input, i.expected, r.output, r.scores, e.stop_requested, "
        + _BREAKER_COLUMNS
        + " from experiment_results r join experiment_items i"
        " using (tenant_id, experiment_id, item_id)"
        " join experiments e using (tenant_id, experiment_id)"
        " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
        " where r.tenant_id = $1 and r.experiment_id = $2 and r.item_id = $3",
        *ref.args,
    )
    if row is None:
        return None
    return JudgeCall(
        input=row["input"],
        expected=_expected(row["expected"]),
        output=row["output"] or "",
        scores=_scores(row["scores"]),
        stop_requested=row["stop_requested"],
        breaker=_breaker_seen(row),
    )


@dataclass(frozen=True)
class NewResult:
    """A task call's outcome, to store once."""

    seq: int
    status: Literal["ok", "failed"]
    output: str | None
    scores: dict[str, Any]
    evaluated: bool
    latency_ms: float
    model: str | None
    deployment_id: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    error_kind: str | None
    error: str | None
    attempt: int


async def store_result(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str, item_id: str, new: NewResult
) -> StoredResult:
    """Store the item's result unless an earlier attempt did; returns the stored one."""
    returning = "status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    async with tenant_transaction(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
            " output, scores, evaluated, latency_ms, model, deployment_id, provider,"
            " prompt_tokens, completion_tokens, error_kind, error, attempt)"
            " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
            " $17) on conflict (tenant_id, experiment_id, item_id) do nothing"
            f" returning {returning}",
            tenant_id,
            experiment_id,
            item_id,
            *_result_values(new),
        )
        if row is None:  # an earlier attempt stored it first
            row = await conn.fetchrow(
                f"select {returning} from experiment_results"
                " where tenant_id = $1 and experiment_id = $2 and item_id = $3",
                tenant_id,
                experiment_id,
                item_id,
            )
    return StoredResult.from_row(row)


async def store_results(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str, new: list[tuple[str, NewResult]]
) -> dict[str, tuple[StoredResult, bool]]:
    """`store_result` of several items in one transaction: per item the stored
    result, and whether this call stored it (False: an earlier attempt had)."""
    returning = "item_id, status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    columns = list(zip(*[(item_id, *_result_values(r)) for item_id, r in new], strict=True))
    async with tenant_transaction(pool, tenant_id) as conn:
        rows = await conn.fetch(
            "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
            " output, scores, evaluated, latency_ms, model, deployment_id, provider,"
            " prompt_tokens, completion_tokens, error_kind, error, attempt)"
            " select $1, $2, * from unnest($3::text[], $4::int[], $5::text[], $6::text[],"
            " $7::jsonb[], $8::bool[], $9::float8[], $10::text[], $11::text[], $12::text[],"
            " $13::int[], $14::int[], $15::text[], $16::text[], $17::int[])"
            " on conflict (tenant_id, experiment_id, item_id) do nothing"
            f" returning {returning}",
            tenant_id,
            experiment_id,
            *[list(c) for c in columns],
        )
        stored = {r["item_id"]: (StoredResult.from_row(r), True) for r in rows}
        earlier = [item_id for item_id, _ in new if item_id not in stored]
        if earlier:
            for r in await conn.fetch(
                f"select {returning} from experiment_results"
                " where tenant_id = $1 and experiment_id = $2 and item_id = any($3::text[])",
                tenant_id,
                experiment_id,
                earlier,
            ):
                stored[r["item_id"]] = (StoredResult.from_row(r), False)
    return stored


def _result_values(new: NewResult) -> tuple[Any, ...]:
    return (
        new.seq,
        new.status,
        new.output,
        json.dumps(new.scores),
        new.evaluated,
        new.latency_ms,
        new.model,
        new.deployment_id,
        new.provider,
        new.prompt_tokens,
        new.completion_tokens,
        new.error_kind,
        new.error,
        new.attempt,
    )


@dataclass(frozen=True)
class MergedScores:
    scores: dict[str, Any]
    # Every judge eval of the item has its score now.
    evaluated: bool


async def merge_judge_score(
    pool: asyncpg.Pool,
    tenant_id: str,
    experiment_id: str,
    item_id: str,
    eval_name: str,
    entry: dict[str, Any],
    judges: list[str],
) -> MergedScores:
    """Add a judge's score to the result once (a score stored first stays)."""
    async with tenant_transaction(pool, tenant_id) as conn:
        updated = await conn.fetchrow(
            "update experiment_results"
            " set scores = case when scores ? $4 then scores else scores || $5::jsonb end,"
            " updated_at = now()"
            " where tenant_id = $1 and experiment_id = $2 and item_id = $3"
            " returning scores",
            tenant_id,
            experiment_id,
            item_id,
            eval_name,
            json.dumps({eval_name: entry}),
        )
        merged = _scores(updated["scores"])
        evaluated = all(name in merged for name in judges)
        if evaluated:
            await _mark_evaluated(conn, tenant_id, experiment_id, item_id)
    return MergedScores(scores=merged, evaluated=evaluated)


async def record_failure(
    conn: asyncpg.Connection,
    tenant_id: str,
    experiment_id: str,
    item_id: str,
    error_kind: str,
    error: str,
) -> bool:
    """An item whose calls gave up: a failed result, unless one is stored already.

    False when there is nothing to record it on: the item is not in the experiment.
    """
    status = await conn.execute(
        "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
        " evaluated, error_kind, error) select tenant_id, experiment_id, item_id, seq,"
        " 'failed', true, $4, $5 from experiment_items"
        " where tenant_id = $1 and experiment_id = $2 and item_id = $3"
        " on conflict do nothing",
        tenant_id,
        experiment_id,
        item_id,
        error_kind,
        error[:1000],
    )
    if not status.endswith(" 0"):
        return True
    # A result exists: if only a judge eval gave up, the item is evaluated now.
    return await _mark_evaluated(conn, tenant_id, experiment_id, item_id)


async def _mark_evaluated(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, item_id: str
) -> bool:
    """Whether the item has a result (now marked evaluated)."""
    status = await conn.execute(
        "update experiment_results set evaluated = true"
        " where tenant_id = $1 and experiment_id = $2 and item_id = $3",
        tenant_id,
        experiment_id,
        item_id,
    )
    return not status.endswith(" 0")


async def result_count(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> tuple[int, int]:
    """The experiment's total as prepared, and how many items have a result (ok or failed)."""
    row = await conn.fetchrow(
        "select e.total, (select count(*) from experiment_results r"
        " where r.tenant_id = e.tenant_id and r.experiment_id = e.experiment_id) as with_result"
        " from experiments e where e.tenant_id = $1 and e.experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    if row is None:
        return 0, 0
    return int(row["total"]), int(row["with_result"])


# --- summaries ----------------------------------------------------------------------


async def latency_stats(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> LatencyStats:
    row = await conn.fetchrow(
        "select percentile_cont(array[0.5, 0.95, 0.99]) within group (order by latency_ms) as p"
        " from experiment_results where tenant_id = $1 and experiment_id = $2"
        " and latency_ms is not null",
        tenant_id,
        experiment_id,
    )
    p = row["p"] if row and row["p"] else None
    if not p:
        return LatencyStats()
    return LatencyStats(p50_ms=round(p[0], 1), p95_ms=round(p[1], 1), p99_ms=round(p[2], 1))


async def summarise(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentSummary:
    """Per-eval mean and pass rate, latency percentiles, tokens and errors, from the rows."""
    exp = await conn.fetchrow(
        "select name, spec, status, total, throttled, call_failures,"
        " extract(epoch from coalesce(completed_at, now()) - created_at) as duration"
        " from experiments where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    evals = StoredSpec.from_json(exp["spec"]).evals
    counts = await conn.fetchrow(
        "select count(*) filter (where status = 'ok') as completed,"
        " count(*) filter (where status = 'failed') as failed,"
        " coalesce(sum(prompt_tokens), 0) as prompt_tokens,"
        " coalesce(sum(completion_tokens), 0) as completion_tokens"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    summaries = []
    for spec in evals:
        name = eval_name(spec)
        row = await conn.fetchrow(
            "select count(*) filter (where scores->$3->>'score' is not null) as scored,"
            " avg((scores->$3->>'score')::float8) as mean,"
            " avg(case when (scores->$3->>'passed')::boolean then 1.0 else 0.0 end)"
            " filter (where scores ? $3) as pass_rate"
            " from experiment_results where tenant_id = $1 and experiment_id = $2"
            " and status = 'ok'",
            tenant_id,
            experiment_id,
            name,
        )
        summaries.append(
            EvalSummary(
                name=name,
                kind=spec.kind,
                scored=row["scored"],
                mean=None if row["mean"] is None else round(float(row["mean"]), 4),
                pass_rate=None if row["pass_rate"] is None else round(float(row["pass_rate"]), 4),
            )
        )
    errors = await conn.fetch(
        "select coalesce(error_kind, 'unknown') as kind, count(*) as n from experiment_results"
        " where tenant_id = $1 and experiment_id = $2 and status = 'failed' group by 1",
        tenant_id,
        experiment_id,
    )
    by_kind = {r["kind"]: r["n"] for r in errors}
    calls = counts["completed"] + exp["throttled"] + exp["call_failures"]
    if exp["throttled"]:
        by_kind["RateLimited (retried)"] = exp["throttled"]
    if exp["call_failures"]:
        by_kind["provider failures (retried)"] = exp["call_failures"]
    return ExperimentSummary(
        experiment_id=experiment_id,
        tenant_id=tenant_id,
        name=exp["name"],
        status=exp["status"],
        total=exp["total"],
        completed=counts["completed"],
        failed=counts["failed"],
        evals=summaries,
        latency=await latency_stats(conn, tenant_id, experiment_id),
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        errors_by_kind=by_kind,
        providers={
            "calls": {
                "throttled": float(exp["throttled"]),
                "failures": float(exp["call_failures"]),
                "throttled_share": round(exp["throttled"] / calls, 4) if calls else 0.0,
            }
        },
        duration_s=round(float(exp["duration"]), 2),
    )


def summary_metrics(summary: ExperimentSummary) -> dict[str, float]:
    """Flat metrics for the registry run, comparable across experiments."""
    metrics: dict[str, float] = {
        "items": float(summary.total),
        "completed": float(summary.completed),
        "failed": float(summary.failed),
        "prompt_tokens": float(summary.prompt_tokens),
        "completion_tokens": float(summary.completion_tokens),
    }
    if summary.unfinished:
        metrics["unfinished"] = float(summary.unfinished)
    for e in summary.evals:
        if e.mean is not None:
            metrics[f"{e.name}.mean"] = e.mean
        if e.pass_rate is not None:
            metrics[f"{e.name}.pass_rate"] = e.pass_rate
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        value = getattr(summary.latency, key)
        if value is not None:
            metrics[f"latency_{key}"] = value
    calls = summary.providers.get("calls", {})
    metrics["throttled"] = calls.get("throttled", 0.0)
    metrics["throttled_share"] = calls.get("throttled_share", 0.0)
    if summary.duration_s is not None:
        metrics["duration_s"] = summary.duration_s
    return metrics


_ROWS_QUERY = (
    "select i.seq, i.item_id, i.input, i.expected, r.status, r.output, r.scores,"
    " r.latency_ms, r.model, r.provider, r.prompt_tokens, r.completion_tokens,"
    " r.error_kind, r.error from experiment_items i left join experiment_results r"
    " using (tenant_id, experiment_id, item_id)"
    " where i.tenant_id = $1 and i.experiment_id = $2 order by i.seq"
)


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "item_id": row["item_id"],
        "status": row["status"] or "pending",
        "input": row["input"],
        "expected": None if row["expected"] is None else json.loads(row["expected"]),
        "output": row["output"],
        "scores": json.loads(row["scores"]) if row["scores"] else {},
        "latency_ms": row["latency_ms"],
        "model": row["model"],
        "provider": row["provider"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "error_kind": row["error_kind"],
        "error": row["error"],
    }


async def find_workflow_id(pool: asyncpg.Pool, tenant_id: str, experiment_id: str) -> str | None:
    """The workflow id recorded for an experiment, if PostgreSQL has the experiment."""
    async with tenant_transaction(pool, tenant_id) as conn:
        return await _experiment_column(conn, tenant_id, experiment_id, "workflow_id")


async def experiment_detail(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str
) -> dict[str, Any]:
    """The experiment with one row per item (what `experiments show --json` prints)."""
    async with tenant_transaction(pool, tenant_id) as conn:
        exp = await conn.fetchrow(
            "select * from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
        if exp is None:
            raise NotFound(
                f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist;"
                " see `konstruct experiments list`"
            )
        rows = await conn.fetch(_ROWS_QUERY, tenant_id, experiment_id)
    return {
        "experiment_id": exp["experiment_id"],
        "tenant_id": exp["tenant_id"],
        "name": exp["name"],
        "status": exp["status"],
        "workflow_id": exp["workflow_id"],
        "total": exp["total"],
        "spec": json.loads(exp["spec"]),
        "summary": json.loads(exp["summary"]) if exp["summary"] else None,
        "registry_run_id": str(exp["registry_run_id"]) if exp["registry_run_id"] else None,
        "items": [_row_json(r) for r in rows],
    }


async def list_experiments(pool: asyncpg.Pool, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's experiments, newest first, with how many results each has."""
    async with tenant_transaction(pool, tenant_id) as conn:
        rows = await conn.fetch(
            "select e.experiment_id, e.name, e.status, e.total, e.created_at,"
            " e.workflow_id, (select count(*) from experiment_results r"
            " where r.tenant_id = e.tenant_id and r.experiment_id = e.experiment_id)"
            " as results from experiments e where e.tenant_id = $1"
            " order by e.created_at desc",
            tenant_id,
        )
    return [dict(r) for r in rows]
