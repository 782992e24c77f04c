"""The results' SQL: an item read for a provider or judge call (with its provider's
breaker, the experiment's cache switch and budgets), a result stored once, a judge's
score merged in, failures recorded and forgotten for a retry.

Each function takes a connection in the caller's `db.tenant_transaction`; an
item read for a call joins the provider's breaker row, so a call with a closed
breaker needs no second round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from konstruct.experiments.store.budgets import SPEND_COLUMNS, SpendFlags
from konstruct.experiments.store.cache import EPOCH_COLUMN, CacheEntry, item_epoch
from konstruct.experiments.store.cache import store as store_cache_entries
from konstruct.experiments.store.experiments import RESULT_OF_ITEM, json_object
from konstruct.experiments.store.lookup import experiment_row
from konstruct.platform.rows import from_row, row_count
from konstruct.providers.control import BreakerState

_BREAKER_COLUMNS = (
    "b.status as breaker_status, b.consecutive_failures, b.opened_at, b.probe_started_at, b.trips"
)
# What a provider call reads besides its item: the breaker, the experiment's cache
# switch and budgets, the item's epoch (for the cache key).
_CALL_COLUMNS = f"{_BREAKER_COLUMNS}, {SPEND_COLUMNS}, {EPOCH_COLUMN}"


def _expected(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


# --- results ------------------------------------------------------------------------


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
            scores=json_object(row["scores"]),
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
    # The item's place in the dataset, when the call says it: its row is looked up by
    # it too, by the (tenant, experiment, seq) key, whatever the planner knows of
    # the table (by `item_id` alone, a table not yet analysed was read whole).
    seq: int | None = None

    @property
    def args(self) -> tuple[str, str, str, str, str]:
        return (self.tenant_id, self.experiment_id, self.item_id, self.task_queue, self.provider)

    def item_lookup(self) -> tuple[str, tuple[Any, ...]]:
        """The condition on the item's row `i` beyond its key, and `args` with it."""
        if self.seq is None:
            return "", self.args
        return " and i.seq = $6", (*self.args, self.seq)


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
    # An agent item's transcript (None: a prompt task's item).
    transcript: dict[str, Any] | None = None


# An item's task call with its result and the provider's breaker ($4, $5); the
# item is chosen by `TASK_CALL_SQL` or `TASK_CALLS_SQL`.
_TASK_CALL_ROWS = (
    "select i.item_id, i.seq, i.input, i.expected, i.metadata, e.stop_requested,"
    " r.status, r.scores,"
    " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
    + _CALL_COLUMNS
    + " from experiment_items i join experiments e using (tenant_id, experiment_id)"
    " left join lateral "
    + RESULT_OF_ITEM.format(
        columns="status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    )
    + " on true"
    " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
    " where i.tenant_id = $1 and i.experiment_id = $2"
)
# One item ($3: its id; with `CallRef.item_lookup`, $6: its place in the dataset).
TASK_CALL_SQL = _TASK_CALL_ROWS + " and i.item_id = $3"
# A batch's items ($3: their ids; with `BY_SEQS`, $6: their places in the dataset).
TASK_CALLS_SQL = _TASK_CALL_ROWS + " and i.item_id = any($3::text[])"
BY_SEQS = " and i.seq = any($6::int[])"


async def task_call(conn: asyncpg.Connection, ref: CallRef) -> TaskCall | None:
    by_seq, args = ref.item_lookup()
    row = await conn.fetchrow(TASK_CALL_SQL + by_seq, *args)
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
    seqs: list[int] | None = None,
) -> dict[str, TaskCall]:
    """`task_call` of several items in one query (a batch's); absent ids are missing.
    `seqs`: the items' places in the dataset, when known: looked up by them, the
    rows are found by the (tenant, experiment, seq) key whatever the planner knows
    of the table (by `item_id` alone, a table not yet analysed was read whole, by
    another index, for every batch)."""
    rows = await conn.fetch(
        TASK_CALLS_SQL + ("" if seqs is None else BY_SEQS),
        tenant_id,
        experiment_id,
        item_ids,
        task_queue,
        provider,
        *([] if seqs is None else [seqs]),
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
        metadata=json_object(row["metadata"]),
        spend=SpendFlags.from_row(row),
        epoch=item_epoch(row),
    )


async def judge_call(conn: asyncpg.Connection, ref: CallRef) -> JudgeCall | None:
    by_seq, args = ref.item_lookup()
    row = await conn.fetchrow(
        "select i.input, i.expected, r.output, r.scores, r.transcript, e.stop_requested, "
        + _CALL_COLUMNS
        + " from experiment_results r join experiment_items i"
        " using (tenant_id, experiment_id, item_id)"
        " join experiments e using (tenant_id, experiment_id)"
        " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
        " where r.tenant_id = $1 and r.experiment_id = $2 and r.item_id = $3" + by_seq,
        *args,
    )
    if row is None:
        return None
    return JudgeCall(
        input=row["input"],
        expected=_expected(row["expected"]),
        output=row["output"] or "",
        scores=json_object(row["scores"]),
        stop_requested=row["stop_requested"],
        breaker=_breaker_seen(row),
        spend=SpendFlags.from_row(row),
        epoch=item_epoch(row),
        transcript=None if row["transcript"] is None else json_object(row["transcript"]),
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
    # An agent item's transcript (`konstruct.experiments.trajectory.Transcript`).
    transcript: dict[str, Any] | None = None
    # A successful call's output, for the cache (stored with the result, once).
    cache_entry: CacheEntry | None = None


async def store_result(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, item_id: str, new: NewResult
) -> StoredResult:
    """Store the item's result unless an earlier attempt did; returns the stored one."""
    returning = "status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    row = await conn.fetchrow(
        "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
        " output, scores, evaluated, latency_ms, model, deployment_id, provider,"
        " prompt_tokens, completion_tokens, error_kind, error, attempt, cost_usd, cached,"
        " cache_hits, saved_usd, transcript) values ($1, $2, $3, $4, $5, $6, $7, $8, $9,"
        " $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
        " on conflict (tenant_id, experiment_id, item_id) do nothing"
        f" returning {returning}",
        tenant_id,
        experiment_id,
        item_id,
        *_result_values(new),
        None if new.transcript is None else json.dumps(new.transcript),
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
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, new: list[tuple[str, NewResult]]
) -> dict[str, tuple[StoredResult, bool]]:
    """`store_result` of several items in one transaction: per item the stored
    result, and whether this call stored it (False: an earlier attempt had)."""
    returning = "item_id, status, scores, latency_ms, prompt_tokens, completion_tokens, error_kind"
    columns = list(zip(*[(item_id, *_result_values(r)) for item_id, r in new], strict=True))
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
    conn: asyncpg.Connection,
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
    merged = json_object(updated["scores"])
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
    if row_count(status) > 0:
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
    return row_count(status) > 0


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


async def forget_failures(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> tuple[int, int]:
    """Delete the experiment's failed results, so their items are pending again and
    the next run makes them; (failed results deleted, ok results kept)."""
    await experiment_row(conn, tenant_id, experiment_id, "status")
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
