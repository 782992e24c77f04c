"""The experiments' SQL: experiments, their items and results, summaries.

Read by the experiment activities and the CLI alike; every statement runs
inside `db.tenant_transaction`, so row-level security scopes it to a tenant.
An item read for a provider call also joins the provider's breaker row, so a
call with a closed breaker needs no second round trip.
"""

from __future__ import annotations

import json
import math
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
from pydantic import TypeAdapter

from konstruct.experiments.models import (
    DatasetItem,
    EvalSpec,
    EvalSummary,
    ExperimentSummary,
    LatencyStats,
    PendingItem,
    TaskSpec,
    eval_name,
)
from konstruct.experiments.store.budgets import SPEND_COLUMNS, SpendFlags
from konstruct.experiments.store.budgets import status as budget_status
from konstruct.experiments.store.cache import EPOCH_COLUMN, CacheEntry, item_epoch
from konstruct.experiments.store.cache import store as store_cache_entries
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import NotFound
from konstruct.platform.rows import from_row
from konstruct.providers.control import BreakerState

_EVALS = TypeAdapter(list[EvalSpec])
_INSERT_BATCH = 2000
_BREAKER_COLUMNS = (
    "b.status as breaker_status, b.consecutive_failures, b.opened_at, b.probe_started_at, b.trips"
)
# What a provider call reads besides its item: the breaker, the experiment's cache
# switch and budgets, the item's epoch (for the cache key).
_CALL_COLUMNS = f"{_BREAKER_COLUMNS}, {SPEND_COLUMNS}, {EPOCH_COLUMN}"


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
    column: Literal["spec", "spec_digest", "workflow_id", "status"],
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


def epoch_item_id(item_id: str, epoch: int, epochs: int) -> str:
    """The experiment item of one epoch of a dataset item: the id itself with one epoch."""
    return item_id if epochs == 1 else f"{item_id}@{epoch}"


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
    epochs: int = 1,
    on_batch: Callable[[int], None] = lambda _start: None,
) -> ResultCounts:
    """The experiment (running again if it existed) and its items, each stored once
    per epoch; returns the results already stored. `on_batch` is told each batch's
    first index."""
    await conn.execute(
        "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
        " workflow_id, total, epochs) values ($1, $2, $3, $4, $5, $6, $7, $8)"
        " on conflict (tenant_id, experiment_id) do update set workflow_id = $6,"
        " status = 'running', stop_requested = false, updated_at = now()",
        tenant_id,
        experiment_id,
        name,
        json.dumps(spec),
        digest,
        workflow_id,
        len(items) * epochs,
        epochs,
    )
    # Epoch by epoch: every item once before any item twice.
    runs = [
        (epoch, index, item) for epoch in range(1, epochs + 1) for index, item in enumerate(items)
    ]
    for start in range(0, len(runs), _INSERT_BATCH):
        on_batch(start)
        batch = runs[start : start + _INSERT_BATCH]
        await conn.execute(
            "insert into experiment_items (tenant_id, experiment_id, item_id, seq, input,"
            " expected, metadata, base_id, epoch) select $1, $2, * from unnest($3::text[],"
            " $4::int[], $5::text[], $6::jsonb[], $7::jsonb[], $8::text[], $9::int[])"
            " on conflict do nothing",
            tenant_id,
            experiment_id,
            [epoch_item_id(i.id, epoch, epochs) for epoch, _, i in batch],
            list(range(start, start + len(batch))),
            [i.input for _, _, i in batch],
            [None if i.expected is None else json.dumps(i.expected) for _, _, i in batch],
            [json.dumps(i.metadata) for _, _, i in batch],
            [i.id for _, _, i in batch],
            [epoch for epoch, _, _ in batch],
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
    """More calls of the experiment that a 429 or a provider failure sent back.

    The total on the experiment and the same count in this second's row of
    `experiment_retry_seconds` (the report's timeline), in one transaction.
    """
    async with tenant_transaction(pool, tenant_id) as conn:
        await _update_experiment(conn, tenant_id, experiment_id, f"{what} = {what} + $3", calls)
        await conn.execute(
            f"insert into experiment_retry_seconds (tenant_id, experiment_id, at, {what})"
            " values ($1, $2, date_trunc('second', clock_timestamp()), $3)"
            f" on conflict (tenant_id, experiment_id, at) do update"
            f" set {what} = experiment_retry_seconds.{what} + excluded.{what}",
            tenant_id,
            experiment_id,
            calls,
        )


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
    return from_row(BreakerState, row, columns={"status": "breaker_status"})


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
    # The item's extra fields (its dataset file's other columns), for the template.
    metadata: dict[str, Any] = field(default_factory=dict)
    # The experiment's cache switch and budgets; the item's epoch.
    spend: SpendFlags = SpendFlags()
    epoch: int = 0


@dataclass(frozen=True)
class JudgeCall:
    """An item's task output about to be judged, read with the breaker."""

    input: str
    expected: Any
    output: str
    scores: dict[str, Any]
    stop_requested: bool
    breaker: BreakerState | None
    spend: SpendFlags = SpendFlags()
    epoch: int = 0


async def task_call(conn: asyncpg.Connection, ref: CallRef) -> TaskCall | None:
    row = await conn.fetchrow(
        "select i.seq, i.input, i.expected, i.metadata, e.stop_requested, r.status, r.scores,"
        " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
        + _CALL_COLUMNS
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
        "select i.item_id, i.seq, i.input, i.expected, i.metadata, e.stop_requested,"
        " r.status, r.scores,"
        " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
        + _CALL_COLUMNS
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
        metadata=_scores(row["metadata"]),
        spend=SpendFlags.from_row(row),
        epoch=item_epoch(row),
    )


async def judge_call(conn: asyncpg.Connection, ref: CallRef) -> JudgeCall | None:
    row = await conn.fetchrow(
        "select i.input, i.expected, r.output, r.scores, e.stop_requested, "
        + _CALL_COLUMNS
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
        spend=SpendFlags.from_row(row),
        epoch=item_epoch(row),
    )


@dataclass(frozen=True)
class NewResult:
    """A task call's outcome, to store once."""

    seq: int
    status: Literal["ok", "failed"]
    output: str | None
    scores: dict[str, Any]
    evaluated: bool
    # None: answered from the cache, no call made.
    latency_ms: float | None
    model: str | None
    deployment_id: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    error_kind: str | None
    error: str | None
    attempt: int
    # The call's cost (None: its price is unknown; 0: answered from the cache), and
    # for a cache hit what the call had cost when it was made.
    cost_usd: float | None = 0.0
    cached: bool = False
    saved_usd: float = 0.0
    # A successful call's output, for the cache (stored with the result, once).
    cache_entry: CacheEntry | None = None


async def store_result(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str, item_id: str, new: NewResult
) -> StoredResult:
    """Store the item's result unless an earlier attempt did; returns the stored one."""
    returning = "status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    async with tenant_transaction(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
            " output, scores, evaluated, latency_ms, model, deployment_id, provider,"
            " prompt_tokens, completion_tokens, error_kind, error, attempt, cost_usd, cached,"
            " cache_hits, saved_usd) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, $15, $16, $17, $18, $19, $20, $21)"
            " on conflict (tenant_id, experiment_id, item_id) do nothing"
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
        if new.cache_entry is not None:
            await store_cache_entries(conn, tenant_id, [new.cache_entry])
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
            " prompt_tokens, completion_tokens, error_kind, error, attempt, cost_usd, cached,"
            " cache_hits, saved_usd)"
            " select $1, $2, * from unnest($3::text[], $4::int[], $5::text[], $6::text[],"
            " $7::jsonb[], $8::bool[], $9::float8[], $10::text[], $11::text[], $12::text[],"
            " $13::int[], $14::int[], $15::text[], $16::text[], $17::int[], $18::float8[],"
            " $19::bool[], $20::int[], $21::float8[])"
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
        entries = [r.cache_entry for _, r in new if r.cache_entry is not None]
        await store_cache_entries(conn, tenant_id, entries)
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
        new.cost_usd,
        new.cached,
        int(new.cached),
        new.saved_usd,
    )


@dataclass(frozen=True)
class JudgeCost:
    """What a judge call cost (None: price unknown), whether the cache answered it
    and what that answer had cost, and a successful call's output for the cache."""

    cost_usd: float | None = 0.0
    cached: bool = False
    saved_usd: float = 0.0
    cache_entry: CacheEntry | None = None


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
    cost: JudgeCost | None = None,
) -> MergedScores:
    """Add a judge's score to the result once (a score stored first stays), with
    what its call cost, and its output to the cache."""
    cost = cost or JudgeCost()
    async with tenant_transaction(pool, tenant_id) as conn:
        updated = await conn.fetchrow(
            "update experiment_results"
            " set scores = case when scores ? $4 then scores else scores || $5::jsonb end,"
            " judge_cost_usd = judge_cost_usd + case when scores ? $4 then 0 else $6::float8 end,"
            " judge_cost_known = judge_cost_known and (scores ? $4 or $7::bool),"
            " cache_hits = cache_hits + case when scores ? $4 or not $8::bool then 0 else 1 end,"
            " saved_usd = saved_usd + case when scores ? $4 then 0 else $9::float8 end,"
            " updated_at = now()"
            " where tenant_id = $1 and experiment_id = $2 and item_id = $3"
            " returning scores",
            tenant_id,
            experiment_id,
            item_id,
            eval_name,
            json.dumps({eval_name: entry}),
            cost.cost_usd or 0.0,
            cost.cost_usd is not None,
            cost.cached,
            cost.saved_usd,
        )
        if cost.cache_entry is not None:
            await store_cache_entries(conn, tenant_id, [cost.cache_entry])
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


def item_spread(means: list[float], passed: list[bool]) -> tuple[float | None, float | None]:
    """The standard error of the mean of per-item scores, and the share of items
    that passed in at least one epoch (pass@k for k epochs)."""
    if not means:
        return None, None
    share = round(sum(passed) / len(passed), 4)
    if len(means) < 2:
        return None, share
    return round(statistics.stdev(means) / math.sqrt(len(means)), 4), share


async def summarise(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentSummary:
    """Per-eval mean and pass rate, latency percentiles, tokens and errors, from the rows."""
    exp = await conn.fetchrow(
        "select name, spec, status, total, throttled, call_failures, epochs,"
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
        per_item = await conn.fetch(
            "select avg((r.scores->$3->>'score')::float8) as mean,"
            " bool_or(coalesce((r.scores->$3->>'passed')::boolean, false)) as passed"
            " from experiment_results r join experiment_items i"
            " using (tenant_id, experiment_id, item_id)"
            " where r.tenant_id = $1 and r.experiment_id = $2 and r.status = 'ok'"
            " and r.scores->$3->>'score' is not null group by i.base_id",
            tenant_id,
            experiment_id,
            name,
        )
        stderr, pass_at_k = item_spread(
            [float(r["mean"]) for r in per_item], [r["passed"] for r in per_item]
        )
        summaries.append(
            EvalSummary(
                name=name,
                kind=spec.kind,
                scored=row["scored"],
                mean=None if row["mean"] is None else round(float(row["mean"]), 4),
                pass_rate=None if row["pass_rate"] is None else round(float(row["pass_rate"]), 4),
                stderr=stderr,
                pass_at_k=pass_at_k if exp["epochs"] > 1 else None,
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
        epochs=exp["epochs"],
        **(await spend_figures(conn, tenant_id, experiment_id)),
    )


async def spend_figures(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> dict[str, Any]:
    """What the experiment's stored results cost (task calls, judges), the calls the
    cache answered and what they had cost, and its budgets (ExperimentSummary fields)."""
    row = await conn.fetchrow(
        "select coalesce(sum(coalesce(cost_usd, 0)), 0) as task_cost,"
        " coalesce(sum(judge_cost_usd), 0) as judge_cost,"
        " coalesce(bool_and(cost_usd is not null and judge_cost_known), true) as known,"
        " coalesce(sum(cache_hits), 0) as hits, coalesce(sum(saved_usd), 0) as saved"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return {
        "cost_usd": round(row["task_cost"] + row["judge_cost"], 9),
        "cost_known": row["known"],
        "task_cost_usd": round(row["task_cost"], 9),
        "judge_cost_usd": round(row["judge_cost"], 9),
        "cache_hits": int(row["hits"]),
        "cost_saved_usd": round(row["saved"], 9),
        "budget": await budget_status(conn, tenant_id, experiment_id),
    }


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
        if e.stderr is not None:
            metrics[f"{e.name}.stderr"] = e.stderr
        if e.pass_at_k is not None:
            metrics[f"{e.name}.pass_at_{summary.epochs}"] = e.pass_at_k
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        value = getattr(summary.latency, key)
        if value is not None:
            metrics[f"latency_{key}"] = value
    calls = summary.providers.get("calls", {})
    metrics["throttled"] = calls.get("throttled", 0.0)
    metrics["throttled_share"] = calls.get("throttled_share", 0.0)
    metrics["cost_usd"] = summary.cost_usd
    metrics["cost_known"] = 1.0 if summary.cost_known else 0.0
    metrics["cache_hits"] = float(summary.cache_hits)
    metrics["cost_saved_usd"] = summary.cost_saved_usd
    if summary.duration_s is not None:
        metrics["duration_s"] = summary.duration_s
    return metrics


_ROWS_QUERY = (
    "select i.seq, i.item_id, i.base_id, i.epoch, i.input, i.expected, r.status, r.output,"
    " r.scores, r.latency_ms, r.model, r.provider, r.prompt_tokens, r.completion_tokens,"
    " r.cost_usd, r.judge_cost_usd, r.cached,"
    " r.error_kind, r.error from experiment_items i left join experiment_results r"
    " using (tenant_id, experiment_id, item_id)"
    " where i.tenant_id = $1 and i.experiment_id = $2 order by i.seq"
)


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "item_id": row["item_id"],
        "dataset_id": row["base_id"],
        "epoch": row["epoch"],
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
        "cost_usd": row["cost_usd"],
        "judge_cost_usd": row["judge_cost_usd"],
        "cached": row["cached"],
        "error_kind": row["error_kind"],
        "error": row["error"],
    }


async def forget_failures(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str
) -> tuple[int, int]:
    """Delete the experiment's failed results, so their items are pending again and
    the next run makes them; (failed results deleted, ok results kept)."""
    async with tenant_transaction(pool, tenant_id) as conn:
        if await _experiment_column(conn, tenant_id, experiment_id, "status") is None:
            raise NotFound(
                f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist;"
                " see `konstruct experiments list`"
            )
        deleted = await conn.fetchval(
            "with gone as (delete from experiment_results where tenant_id = $1"
            " and experiment_id = $2 and status = 'failed' returning 1)"
            " select count(*) from gone",
            tenant_id,
            experiment_id,
        )
        kept = await conn.fetchval(
            "select count(*) from experiment_results where tenant_id = $1"
            " and experiment_id = $2 and status = 'ok'",
            tenant_id,
            experiment_id,
        )
    return int(deleted), int(kept)


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
        spend = await spend_figures(conn, tenant_id, experiment_id)
    items = [_row_json(r) for r in rows]
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
        "epochs": exp["epochs"],
        "paused_reason": exp["paused_reason"],
        "cache": exp["cache"],
        **{k: v.model_dump() if k == "budget" and v is not None else v for k, v in spend.items()},
        "items": items,
        **({"by_dataset_item": per_dataset_item(items)} if exp["epochs"] > 1 else {}),
    }


def per_dataset_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Each dataset item's scores over its epochs: per eval the mean and whether any
    epoch passed (pass@k), with the number of epochs that have a result."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        grouped.setdefault(item["dataset_id"], []).append(item)
    out: dict[str, Any] = {}
    for dataset_id, runs in grouped.items():
        done = [r for r in runs if r["status"] == "ok"]
        names = sorted({name for r in done for name in r["scores"]})
        scores: dict[str, Any] = {}
        for name in names:
            values = [r["scores"][name] for r in done if name in r["scores"]]
            numbers = [v["score"] for v in values if v.get("score") is not None]
            scores[name] = {
                "mean": round(statistics.fmean(numbers), 4) if numbers else None,
                "pass_at_k": any(bool(v.get("passed")) for v in values),
            }
        out[dataset_id] = {"epochs": len(runs), "with_result": len(done), "scores": scores}
    return out


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
