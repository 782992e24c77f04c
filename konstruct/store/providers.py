"""The SQL of `provider_limits` and `provider_breakers`.

Provider rows are global, not tenant data: every experiment of every tenant on
one task queue shares a provider's rate and breaker. They are keyed by the
task queue (so two deployments, or two tests, never share state) and provider.

Decisions come from `konstruct.provider_control`; this module only loads a
state, asks the pure function, and writes the answer back. Counters are bumped
in one statement; a decision is written only if nobody else decided since
(`version` check), so two workers seeing the same 429 burst decrease once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from konstruct.provider_control import (
    Admission,
    AimdConfig,
    AimdState,
    BreakerConfig,
    BreakerState,
    Grant,
    admit,
    claim_probe,
    decide_counts,
    rate_decided,
    record_failure,
    record_success,
)
from konstruct.store._rows import from_row

log = logging.getLogger("konstruct.providers")

Outcome = Literal["ok", "throttled", "failure", "neutral"]
_NOW = "extract(epoch from clock_timestamp())::float8"


@dataclass(frozen=True)
class ProviderStatus:
    provider: str
    rate: float
    initial_rate: float
    ceiling: float | None
    ok_total: int
    throttled_total: int
    failure_total: int
    breaker: str
    consecutive_failures: int
    trips: int
    opened_at: float | None
    cooldown_left_s: float
    now: float


async def ensure_provider(
    pool: asyncpg.Pool,
    task_queue: str,
    provider: str,
    initial_rps: float,
    min_rps: float,
    max_rps: float,
) -> float:
    """Create the provider's rows if new; returns its current rate."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "insert into provider_limits (task_queue, provider, rate, initial_rate, min_rate,"
            f" max_rate, changed_at) values ($1, $2, $3, $3, $4, $5, {_NOW})"
            " on conflict do nothing",
            task_queue,
            provider,
            min(max_rps, max(min_rps, initial_rps)),
            min_rps,
            max_rps,
        )
        for table in ("provider_breakers", "provider_schedule"):
            await conn.execute(
                f"insert into {table} (task_queue, provider) values ($1, $2)"
                " on conflict do nothing",
                task_queue,
                provider,
            )
        return float(
            await conn.fetchval(
                "select rate from provider_limits where task_queue = $1 and provider = $2",
                task_queue,
                provider,
            )
        )


async def reset_provider(pool: asyncpg.Pool, task_queue: str, provider: str) -> None:
    """Forget what was learned: back to the initial rate, breaker closed (tests, bench)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "update provider_limits set rate = initial_rate, ceiling = null, ok_since_change = 0,"
            " throttled_since_change = 0, slow_start = true,"
            f" changed_at = {_NOW}, last_decrease_at = null, hold_until = 0, step = 0,"
            " version = version + 1 where task_queue = $1 and provider = $2",
            task_queue,
            provider,
        )
        await conn.execute(
            "update provider_schedule set next_slot_at = 0 where task_queue = $1 and provider = $2",
            task_queue,
            provider,
        )
        await conn.execute(
            "update provider_breakers set status = 'closed', consecutive_failures = 0,"
            " opened_at = null, probe_started_at = null, version = version + 1"
            " where task_queue = $1 and provider = $2",
            task_queue,
            provider,
        )


def breaker_from_row(row: Any, status_column: str = "status") -> BreakerState:
    """A `provider_breakers` row (its status under another name when joined)."""
    return from_row(BreakerState, row, columns={"status": status_column})


def _aimd(row: Any) -> AimdState:
    return from_row(AimdState, row)


@dataclass(frozen=True)
class Admitted:
    """What `admit_call` decided, and the breaker as it saw (or claimed) it."""

    admission: Admission
    breaker: BreakerState


async def admit_call(
    pool: asyncpg.Pool, task_queue: str, provider: str, config: BreakerConfig
) -> Admitted:
    """May a call go to the provider now? A half-open probe is claimed atomically."""
    async with pool.acquire() as conn:
        row = await _breaker_row(conn, task_queue, provider)
        if row is None:
            return Admitted(Admission(allowed=True), BreakerState())
        state = breaker_from_row(row)
        if state.status == "closed":
            return Admitted(Admission(allowed=True), state)
        async with conn.transaction():
            row = await _breaker_row(conn, task_queue, provider, lock=True)
            state = breaker_from_row(row)
            admission = admit(state, row["now"], config)
            if admission.probe:
                claimed = claim_probe(state, row["now"])
                await _write_breaker(conn, task_queue, provider, claimed)
                state = claimed
            return Admitted(admission, state)


async def _breaker_row(
    conn: asyncpg.Connection, task_queue: str, provider: str, lock: bool = False
) -> Any:
    """The breaker row with the database's clock (`now`); `lock`: for update."""
    return await conn.fetchrow(
        f"select *, {_NOW} as now from provider_breakers"
        " where task_queue = $1 and provider = $2" + (" for update" if lock else ""),
        task_queue,
        provider,
    )


async def _write_breaker(
    conn: asyncpg.Connection, task_queue: str, provider: str, state: BreakerState
) -> None:
    await conn.execute(
        "update provider_breakers set status = $3, consecutive_failures = $4, opened_at = $5,"
        " probe_started_at = $6, trips = $7, version = version + 1, updated_at = now()"
        " where task_queue = $1 and provider = $2",
        task_queue,
        provider,
        state.status,
        state.consecutive_failures,
        state.opened_at,
        state.probe_started_at,
        state.trips,
    )


# Book up to $3 call slots at the provider's rate, no further ahead than $4 seconds
# (GCRA: one virtual clock per provider): slots start, start + 1/rate ... that
# begin within the horizon, one at least when the schedule is idle however slow
# the rate. One statement, so the row is locked only while PostgreSQL runs it;
# locked across a worker's round trips, it serialised every worker at high rates.
_BOOK = f"""
with cur as (
    select greatest(s.next_slot_at, t.now) as start, t.now, l.rate
    from provider_schedule s join provider_limits l using (task_queue, provider),
        (select {_NOW} as now) t
    where s.task_queue = $1 and s.provider = $2
    for update of s
), counted as (
    select start, now, rate,
        case when start >= now + $4 and start > now then 0
        else least($3, greatest(case when start <= now then 1 else 0 end,
                                ceil((now + $4 - start) * rate - 1e-9)::int))
        end as granted
    from cur
)
update provider_schedule s set next_slot_at = c.start + c.granted / c.rate
from counted c
where s.task_queue = $1 and s.provider = $2
returning c.granted, c.start - c.now as first_in_s, 1.0 / c.rate as interval_s,
    greatest(1.0 / c.rate, c.start - c.now - $4) as retry_in_s
"""


async def reserve_calls(
    pool: asyncpg.Pool, task_queue: str, provider: str, wanted: int, horizon_s: float
) -> Grant:
    """Book up to `wanted` call slots on the provider's shared schedule, so calls
    booked at an old rate are spent soon after it changes. A provider without a
    row yet is not limited here (its queue's server-side limit still is)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_BOOK, task_queue, provider, wanted, horizon_s)
    if row is None:
        return Grant(wanted)
    if not row["granted"]:
        return Grant(0, retry_in_s=row["retry_in_s"])
    return Grant(row["granted"], max(0.0, row["first_in_s"]), row["interval_s"])


@dataclass(frozen=True)
class OutcomeEffect:
    rate_changed_to: float | None = None
    breaker_tripped: bool = False


@dataclass(frozen=True)
class OutcomeCounts:
    """Answers of several calls, counted together (a worker's last quarter second).

    `failures_after_ok`: failures since the last success among them (the breaker
    counts consecutive failures); `retry_after_s`: the longest Retry-After of the
    429s; `newest_429_age_s`: how long ago the newest refused request was sent."""

    ok: int = 0
    throttled: int = 0
    failures: int = 0
    failures_after_ok: int = 0
    retry_after_s: float | None = None
    newest_429_age_s: float | None = None
    last_error: str = ""


def _one(outcome: Outcome, retry_after_s: float | None, error: str, age_s: float | None):
    if outcome == "ok":
        return OutcomeCounts(ok=1)
    if outcome == "throttled":
        return OutcomeCounts(throttled=1, retry_after_s=retry_after_s, newest_429_age_s=age_s)
    if outcome == "failure":
        return OutcomeCounts(failures=1, failures_after_ok=1, last_error=error)
    return OutcomeCounts()


async def record_outcome(
    pool: asyncpg.Pool,
    task_queue: str,
    provider: str,
    outcome: Outcome,
    *,
    breaker_seen: BreakerState,
    aimd: AimdConfig,
    breaker: BreakerConfig,
    retry_after_s: float | None = None,
    error: str = "",
    age_s: float | None = None,
) -> OutcomeEffect:
    """Count one call's outcome, and let the rate and the breaker react to it.

    `age_s`: how long ago the call's request was sent (a duration, so the
    worker's clock need not agree with the database's).
    """
    return await record_outcomes(
        pool,
        task_queue,
        provider,
        _one(outcome, retry_after_s, error, age_s),
        breaker_seen=breaker_seen,
        aimd=aimd,
        breaker=breaker,
    )


async def record_outcomes(
    pool: asyncpg.Pool,
    task_queue: str,
    provider: str,
    counts: OutcomeCounts,
    *,
    breaker_seen: BreakerState | None,
    aimd: AimdConfig,
    breaker: BreakerConfig,
) -> OutcomeEffect:
    """Count several answers at once: one row update and at most one decision.
    `breaker_seen` None: the breaker is read under its lock if anything changes it."""
    async with pool.acquire() as conn:
        rate_changed = await _learn_rate(conn, task_queue, provider, counts, aimd)
        tripped = await _learn_breaker(conn, task_queue, provider, counts, breaker_seen, breaker)
    return OutcomeEffect(rate_changed_to=rate_changed, breaker_tripped=tripped)


async def _learn_rate(
    conn: asyncpg.Connection,
    task_queue: str,
    provider: str,
    counts: OutcomeCounts,
    aimd: AimdConfig,
) -> float | None:
    """Count the outcomes; after successes or 429s, write the rate decided (if
    nobody decided since). Returns the new rate if this changed it."""
    if counts.failures and not (counts.ok or counts.throttled):
        await conn.execute(
            "update provider_limits set failure_total = failure_total + $3"
            " where task_queue = $1 and provider = $2",
            task_queue,
            provider,
            counts.failures,
        )
        return None
    if not (counts.ok or counts.throttled):
        return None
    row = await conn.fetchrow(
        "update provider_limits set ok_total = ok_total + $3,"
        " ok_since_change = ok_since_change + $3, throttled_total = throttled_total + $4,"
        " throttled_since_change = throttled_since_change + $4,"
        " failure_total = failure_total + $5"
        " where task_queue = $1 and provider = $2"
        f" returning *, {_NOW} as now",
        task_queue,
        provider,
        counts.ok,
        counts.throttled,
        counts.failures,
    )
    if row is None:
        return None
    current = _aimd(row)
    before = dict(row)
    before["ok_since_change"] -= counts.ok
    before["throttled_since_change"] -= counts.throttled
    age = counts.newest_429_age_s
    decided = decide_counts(
        _aimd(before),
        counts.ok,
        counts.throttled,
        row["now"],
        aimd,
        retry_after_s=counts.retry_after_s,
        sent_at=None if age is None else row["now"] - age,
    )
    if not rate_decided(current, decided):
        return None
    written = await conn.execute(
        # A new window (changed_at) restarts the counts from the decision's (0 after
        # a change of rate, this answer's when an idle window restarts); a decision
        # that keeps the window (a hold) keeps them, bumped by others meanwhile.
        "update provider_limits set rate = $4, ceiling = $5,"
        " ok_since_change = case when changed_at = $6 then ok_since_change"
        " else $11 end, throttled_since_change = case when changed_at = $6"
        " then throttled_since_change else $12 end, changed_at = $6,"
        " last_decrease_at = $7, hold_until = $8, step = $9, slow_start = $10,"
        " version = version + 1, updated_at = now()"
        " where task_queue = $1 and provider = $2 and version = $3",
        task_queue,
        provider,
        row["version"],
        decided.rate,
        decided.ceiling,
        decided.changed_at,
        decided.last_decrease_at,
        decided.hold_until,
        decided.step,
        decided.slow_start,
        decided.ok_since_change,
        decided.throttled_since_change,
    )
    if not written.endswith(" 1") or decided.rate == current.rate:
        return None
    log.info(
        "%s %s: rate %.2f -> %.2f after %s (ceiling %s; %d ok, %d 429 in %.2f s)",
        task_queue,
        provider,
        current.rate,
        decided.rate,
        "a 429" if counts.throttled else "successes",
        f"{decided.ceiling:.2f}" if decided.ceiling is not None else "unknown",
        current.ok_since_change,
        current.throttled_since_change,
        row["now"] - current.changed_at,
    )
    return decided.rate


async def _learn_breaker(
    conn: asyncpg.Connection,
    task_queue: str,
    provider: str,
    counts: OutcomeCounts,
    seen: BreakerState | None,
    config: BreakerConfig,
) -> bool:
    """Successes close the breaker, failures after the last success count towards
    opening it (under a row lock). Returns whether these failures tripped it."""
    closes = counts.ok > 0 and (seen is None or record_success(seen) != seen)
    if not closes and not counts.failures_after_ok:
        return False
    async with conn.transaction():
        row = await _breaker_row(conn, task_queue, provider, lock=True)
        if row is None:
            return False
        state = before = breaker_from_row(row)
        if counts.ok > 0:
            state = record_success(state)
        for _ in range(counts.failures_after_ok):
            state = record_failure(state, row["now"], config)
        if state != before:
            await _write_breaker(conn, task_queue, provider, state)
        if counts.failures_after_ok:
            await conn.execute(
                "update provider_breakers set last_error = $3"
                " where task_queue = $1 and provider = $2",
                task_queue,
                provider,
                counts.last_error[:500],
            )
    return state.trips > before.trips


async def provider_statuses(
    pool: asyncpg.Pool, task_queue: str, providers: list[str], config: BreakerConfig
) -> list[ProviderStatus]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "select l.provider, l.rate, l.initial_rate, l.ceiling, l.ok_total,"
            " l.throttled_total, l.failure_total, b.status, b.consecutive_failures, b.trips,"
            f" b.opened_at, {_NOW} as now"
            " from provider_limits l join provider_breakers b using (task_queue, provider)"
            " where l.task_queue = $1 and l.provider = any($2::text[]) order by l.provider",
            task_queue,
            providers,
        )
    statuses = []
    for r in rows:
        left = 0.0
        if r["status"] == "open" and r["opened_at"] is not None:
            left = max(0.0, r["opened_at"] + config.cooldown_s - r["now"])
        statuses.append(
            from_row(ProviderStatus, r, columns={"breaker": "status"}, cooldown_left_s=left)
        )
    return statuses


async def current_rates(pool: asyncpg.Pool, task_queue: str) -> dict[str, float]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "select provider, rate from provider_limits where task_queue = $1", task_queue
        )
    return {r["provider"]: float(r["rate"]) for r in rows}
