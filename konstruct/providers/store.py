"""The SQL of `provider_limits` and `provider_breakers`.

Provider rows are global, not tenant data: every experiment of every tenant on
one task queue shares a provider's rate and breaker. They are keyed by the
task queue (so two deployments, or two tests, never share state) and provider.
Each function takes a connection (`pool.acquire()`, no tenant scope) and opens
`conn.transaction()` itself where its statements must be atomic.

Decisions come from `konstruct.providers.control`; this module only loads a
state, asks the pure function, and writes the answer back. Counters are bumped
in one statement; a decision is written only if nobody else decided since
(`version` check), so two workers seeing the same 429 burst decrease once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import asyncpg

from konstruct.platform.rows import from_row, row_count
from konstruct.providers.adapter import AnnouncedLimits
from konstruct.providers.control import (
    Admission,
    AimdConfig,
    AimdState,
    BreakerConfig,
    BreakerState,
    Grant,
    LimitsSeen,
    ProviderBounds,
    admit,
    aged,
    claim_probe,
    learn_from_counts,
    record_failure,
    record_success,
)

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
    conn: asyncpg.Connection, task_queue: str, provider: str, bounds: ProviderBounds
) -> float:
    """Create the provider's rows if new, else take the config's bounds and token
    rate (a changed router config counts at the next experiment); returns its rate."""
    async with conn.transaction():
        rate = await conn.fetchval(
            "insert into provider_limits as l (task_queue, provider, rate, initial_rate,"
            " min_rate, max_rate, token_rate, limit_window_s, declared_rate, changed_at)"
            f" values ($1, $2, $3, $3, $4, $5, $6, $7, $8, {_NOW})"
            " on conflict (task_queue, provider) do update set initial_rate = $3,"
            " min_rate = $4, max_rate = $5, token_rate = $6, limit_window_s = $7,"
            " declared_rate = $8,"
            " header_rate = case when l.limit_window_s = $7 then l.header_rate end,"
            " header_token_rate = case when l.limit_window_s = $7"
            " then l.header_token_rate end,"
            " rate = least($5, greatest($4, l.rate)) returning rate",
            task_queue,
            provider,
            bounds.initial_rps,
            bounds.min_rps,
            bounds.max_rps,
            bounds.token_rate,
            bounds.limit_window_s,
            bounds.declared_rps,
        )
        for table in ("provider_breakers", "provider_schedule"):
            await conn.execute(
                f"insert into {table} (task_queue, provider) values ($1, $2)"
                " on conflict do nothing",
                task_queue,
                provider,
            )
        return float(rate)


async def reset_provider(conn: asyncpg.Connection, task_queue: str, provider: str) -> None:
    """Forget what was learned: back to the initial rate, breaker closed (tests, bench)."""
    async with conn.transaction():
        await conn.execute(
            "update provider_limits set rate = initial_rate, ceiling = null, ok_since_change = 0,"
            " throttled_since_change = 0, slow_start = true, header_rate = null,"
            " header_token_rate = null, last_answer_at = null, probe_wait_s = 0,"
            f" changed_at = {_NOW}, last_decrease_at = null, hold_until = 0, step = 0,"
            " version = version + 1 where task_queue = $1 and provider = $2",
            task_queue,
            provider,
        )
        await conn.execute(
            "update provider_schedule set next_slot_at = 0, next_token_at = 0"
            " where task_queue = $1 and provider = $2",
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
    conn: asyncpg.Connection, task_queue: str, provider: str, config: BreakerConfig
) -> Admitted:
    """May a call go to the provider now? A half-open probe is claimed atomically."""
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
# (GCRA: one virtual clock per provider): slots start, start + interval ... that
# begin within the horizon, one at least when the schedule is idle however slow
# the rate. With tokens metered (a token rate from `model_info.tpm` or the
# provider's headers), a second clock paces the tokens: each call books $5
# (its estimate), and the slots are spaced by the slower of the two clocks.
# One statement, so the row is locked only while PostgreSQL runs it; locked
# across a worker's round trips, it serialised every worker at high rates.
_BOOK = f"""
with cur as (
    select greatest(s.next_slot_at, t.now) as req_start,
        greatest(s.next_token_at, t.now) as tok_start, t.now, l.rate,
        coalesce(l.token_rate, l.header_token_rate) as token_rate
    from provider_schedule s join provider_limits l using (task_queue, provider),
        (select {_NOW} as now) t
    where s.task_queue = $1 and s.provider = $2
    for update of s
), paced as (
    select now, rate, token_rate,
        case when token_rate is null then req_start
        else greatest(req_start, tok_start) end as start,
        case when token_rate is null then 1.0 / rate
        else greatest(1.0 / rate, $5 / token_rate) end as interval_s
    from cur
), counted as (
    select *,
        case when start >= now + $4 and start > now then 0
        else least($3, greatest(case when start <= now then 1 else 0 end,
                                ceil((now + $4 - start) / interval_s - 1e-9)::int))
        end as granted
    from paced
)
update provider_schedule s set
    next_slot_at = case when c.granted = 0 then s.next_slot_at
        else c.start + (c.granted - 1) * c.interval_s + 1.0 / c.rate end,
    next_token_at = case when c.granted = 0 or c.token_rate is null then s.next_token_at
        else c.start + (c.granted - 1) * c.interval_s + $5 / c.token_rate end
from counted c
where s.task_queue = $1 and s.provider = $2
returning c.granted, c.start - c.now as first_in_s, c.interval_s,
    greatest(c.interval_s, c.start - c.now - $4) as retry_in_s,
    c.token_rate is not null as metered
"""


async def reserve_calls(
    conn: asyncpg.Connection,
    task_queue: str,
    provider: str,
    wanted: int,
    horizon_s: float,
    tokens_each: float = 0.0,
) -> Grant:
    """Book up to `wanted` call slots on the provider's shared schedule, so calls
    booked at an old rate are spent soon after it changes; `tokens_each`: each
    call's estimated tokens, booked when tokens are metered. A provider without a
    row yet is not limited here (its queue's server-side limit still is)."""
    row = await conn.fetchrow(_BOOK, task_queue, provider, wanted, horizon_s, tokens_each)
    if row is None:
        return Grant(wanted)
    if not row["granted"]:
        return Grant(0, retry_in_s=row["retry_in_s"], metered=row["metered"])
    return Grant(
        row["granted"], max(0.0, row["first_in_s"]), row["interval_s"], metered=row["metered"]
    )


@dataclass(frozen=True)
class OutcomeEffect:
    rate_changed_to: float | None = None
    # The change was a decrease (a 429's): slots booked before it went at the old rate.
    rate_lowered: bool = False
    breaker_tripped: bool = False


@dataclass(frozen=True)
class OutcomeCounts:
    """Answers of several calls, counted together (a worker's last quarter second).

    `failures_after_ok`: failures since the last success among them (the breaker
    counts consecutive failures); `retry_after_s`: the longest Retry-After of the
    429s; `newest_429_age_s`: how long ago the newest refused request was sent;
    `token_excess`: tokens used minus tokens booked (metered calls; a refused or
    failed call used none); `limits`: the newest limits the provider announced."""

    ok: int = 0
    throttled: int = 0
    failures: int = 0
    failures_after_ok: int = 0
    retry_after_s: float | None = None
    newest_429_age_s: float | None = None
    last_error: str = ""
    token_excess: float = 0.0
    limits: AnnouncedLimits | None = None


def _one(
    outcome: Outcome,
    retry_after_s: float | None,
    error: str,
    age_s: float | None,
    token_excess: float,
    limits: AnnouncedLimits | None,
) -> OutcomeCounts:
    counts = OutcomeCounts(token_excess=token_excess, limits=limits)
    if outcome == "ok":
        return replace(counts, ok=1)
    if outcome == "throttled":
        return replace(counts, throttled=1, retry_after_s=retry_after_s, newest_429_age_s=age_s)
    if outcome == "failure":
        return replace(counts, failures=1, failures_after_ok=1, last_error=error)
    return counts


async def record_outcome(
    conn: asyncpg.Connection,
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
    token_excess: float = 0.0,
    limits: AnnouncedLimits | None = None,
) -> OutcomeEffect:
    """Count one call's outcome, and let the rate and the breaker react to it.

    `age_s`: how long ago the call's request was sent (a duration, so the
    worker's clock need not agree with the database's).
    """
    return await record_outcomes(
        conn,
        task_queue,
        provider,
        _one(outcome, retry_after_s, error, age_s, token_excess, limits),
        breaker_seen=breaker_seen,
        aimd=aimd,
        breaker=breaker,
    )


async def record_outcomes(
    conn: asyncpg.Connection,
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
    if counts.token_excess:
        await _settle_tokens(conn, task_queue, provider, counts.token_excess)
    change = await _learn_rate(conn, task_queue, provider, counts, aimd)
    tripped = await _learn_breaker(conn, task_queue, provider, counts, breaker_seen, breaker)
    if change is None:
        return OutcomeEffect(breaker_tripped=tripped)
    before, after = change
    return OutcomeEffect(
        rate_changed_to=after, rate_lowered=after < before, breaker_tripped=tripped
    )


async def _settle_tokens(
    conn: asyncpg.Connection, task_queue: str, provider: str, excess: float
) -> None:
    """Move the token clock by what the calls used beyond (or short of) their booking."""
    await conn.execute(
        "update provider_schedule s set next_token_at = s.next_token_at + $3 / l.tr"
        " from (select coalesce(token_rate, header_token_rate) as tr from provider_limits"
        "       where task_queue = $1 and provider = $2) l"
        " where s.task_queue = $1 and s.provider = $2 and l.tr is not null",
        task_queue,
        provider,
        excess,
    )


def _announced(row: Any, limits: AnnouncedLimits | None) -> tuple[float | None, float | None, bool]:
    """The request and token rates the provider's headers announce (per second,
    over the row's `limit_window_s`), and whether they differ from the row's."""
    request_rate, token_rate = row["header_rate"], row["header_token_rate"]
    if limits is not None:
        window = row["limit_window_s"]
        if limits.requests is not None:
            request_rate = limits.requests / window
        if limits.tokens is not None:
            token_rate = limits.tokens / window

    def moved(new: float | None, old: float | None) -> bool:
        return new != old and (new is None or old is None or abs(new - old) > 1e-9 * new)

    changed = moved(request_rate, row["header_rate"]) or moved(token_rate, row["header_token_rate"])
    return request_rate, token_rate, changed


async def _count_outcomes(
    conn: asyncpg.Connection, task_queue: str, provider: str, counts: OutcomeCounts
) -> Any:
    """Add the answers to the provider's counters; the row with the database's clock
    (`now`) when successes or 429s may move the rate, else None."""
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
    # `previous_answer_at`: the answer before these (the decision ages what was
    # learned after an idle gap); the row's `last_answer_at` becomes now.
    return await conn.fetchrow(
        "with prev as (select last_answer_at from provider_limits"
        " where task_queue = $1 and provider = $2 for update)"
        " update provider_limits l set ok_total = ok_total + $3,"
        " ok_since_change = ok_since_change + $3, throttled_total = throttled_total + $4,"
        " throttled_since_change = throttled_since_change + $4,"
        f" failure_total = failure_total + $5, last_answer_at = {_NOW}"
        " from prev where l.task_queue = $1 and l.provider = $2"
        f" returning l.*, prev.last_answer_at as previous_answer_at, {_NOW} as now",
        task_queue,
        provider,
        counts.ok,
        counts.throttled,
        counts.failures,
    )


async def _write_rate(
    conn: asyncpg.Connection,
    task_queue: str,
    provider: str,
    version: int,
    decided: AimdState,
    header_rate: float | None,
    header_token_rate: float | None,
    *,
    forget_answer: bool = False,
) -> bool:
    """Write a rate decision unless someone decided since (`version`); whether it was.
    `forget_answer`: clear `last_answer_at` (what was learned aged: it ages once)."""
    written = await conn.execute(
        # A new window (changed_at) restarts the counts from the decision's (0 after
        # a change of rate, this answer's when an idle window restarts); a decision
        # that keeps the window (a hold) keeps them, bumped by others meanwhile.
        "update provider_limits set rate = $4, ceiling = $5,"
        " ok_since_change = case when changed_at = $6 then ok_since_change"
        " else $11 end, throttled_since_change = case when changed_at = $6"
        " then throttled_since_change else $12 end, changed_at = $6,"
        " last_decrease_at = $7, hold_until = $8, step = $9, slow_start = $10,"
        " header_rate = $13, header_token_rate = $14, probe_wait_s = $15,"
        " last_answer_at = case when $16 then null else last_answer_at end,"
        " version = version + 1, updated_at = now()"
        " where task_queue = $1 and provider = $2 and version = $3",
        task_queue,
        provider,
        version,
        decided.rate,
        decided.ceiling,
        decided.changed_at,
        decided.last_decrease_at,
        decided.hold_until,
        decided.step,
        decided.slow_start,
        decided.ok_since_change,
        decided.throttled_since_change,
        header_rate,
        header_token_rate,
        decided.probe_wait_s,
        forget_answer,
    )
    return row_count(written) == 1


async def _learn_rate(
    conn: asyncpg.Connection,
    task_queue: str,
    provider: str,
    counts: OutcomeCounts,
    aimd: AimdConfig,
) -> tuple[float, float] | None:
    """Count the outcomes; after successes or 429s, write the rate decided (if
    nobody decided since), within the provider's bounds and announced limits.
    Returns the rate before and after if this changed it."""
    row = await _count_outcomes(conn, task_queue, provider, counts)
    if row is None:
        return None
    header_rate, header_token_rate, announced = _announced(row, counts.limits)
    current = replace(_aimd(row), last_answer_at=row["previous_answer_at"])
    learned = learn_from_counts(
        current,
        counts.ok,
        counts.throttled,
        row["now"],
        aimd,
        LimitsSeen(
            row["min_rate"],
            row["max_rate"],
            row["declared_rate"] is not None,
            header_rate,
            announced,
        ),
        retry_after_s=counts.retry_after_s,
        newest_429_age_s=counts.newest_429_age_s,
    )
    if learned is None:
        return None
    decided = learned.decided
    written = await _write_rate(
        conn, task_queue, provider, row["version"], decided, header_rate, header_token_rate
    )
    if not written or decided.rate == current.rate:
        return None
    log.info(
        "%s %s: rate %.2f -> %.2f after %s (ceiling %s; %d ok, %d 429 in %.2f s)",
        task_queue,
        provider,
        current.rate,
        decided.rate,
        learned.why,
        f"{decided.ceiling:.2f}" if decided.ceiling is not None else "unknown",
        current.ok_since_change,
        current.throttled_since_change,
        row["now"] - current.changed_at,
    )
    return current.rate, decided.rate


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
    conn: asyncpg.Connection, task_queue: str, providers: list[str], config: BreakerConfig
) -> list[ProviderStatus]:
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


async def age_idle(conn: asyncpg.Connection, task_queue: str, aimd: AimdConfig) -> dict[str, float]:
    """Age what was learned of each provider of the queue that has not answered for
    an idle gap (`control.aged`), before its next call rather than at its first
    answer: the calls booked before that answer went out at the old rate (bench
    idle-drop: 24 calls answered in the first 0.15 s while the row said 171 req/s, a
    rate slow start had raised past anything the provider took). The aged row keeps no `last_answer_at`,
    so nothing ages it twice. Returns the providers whose rate this changed."""
    rows = await conn.fetch(
        f"select *, {_NOW} as now from provider_limits"
        " where task_queue = $1 and last_answer_at is not null",
        task_queue,
    )
    changed: dict[str, float] = {}
    for row in rows:
        bounded = replace(aimd, min_rps=row["min_rate"], max_rps=row["max_rate"])
        fresh = aged(_aimd(row), row["now"], bounded)
        if fresh is None:
            continue
        written = await _write_rate(
            conn,
            task_queue,
            row["provider"],
            row["version"],
            fresh,
            row["header_rate"],
            row["header_token_rate"],
            forget_answer=True,
        )
        if written:
            log.info(
                "%s %s: rate %.2f -> %.2f after %.1f s without an answer (ceiling forgotten)",
                task_queue,
                row["provider"],
                row["rate"],
                fresh.rate,
                row["now"] - row["last_answer_at"],
            )
            changed[row["provider"]] = fresh.rate
    return changed


async def current_rates(conn: asyncpg.Connection, task_queue: str) -> dict[str, float]:
    rows = await conn.fetch(
        "select provider, rate from provider_limits where task_queue = $1", task_queue
    )
    return {r["provider"]: float(r["rate"]) for r in rows}
