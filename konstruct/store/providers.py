"""The SQL of `provider_limits` and `provider_breakers`, and the push of a rate to Temporal.

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
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import RateLimit, TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    UpdateTaskQueueConfigRequest,
)
from temporalio.client import Client

from konstruct.config import ExperimentSettings
from konstruct.provider_control import (
    Admission,
    AimdConfig,
    AimdState,
    BreakerConfig,
    BreakerState,
    admit,
    claim_probe,
    on_success,
    on_throttled,
    record_failure,
    record_success,
)

log = logging.getLogger("konstruct.providers")

Outcome = Literal["ok", "throttled", "failure", "neutral"]
_NOW = "extract(epoch from clock_timestamp())::float8"


def provider_queue(task_queue: str, provider: str) -> str:
    """The activity task queue of one provider: the server rate-limits it."""
    return f"{task_queue}-llm-{provider}"


def aimd_config(settings: ExperimentSettings) -> AimdConfig:
    return AimdConfig(
        min_rps=settings.min_rps,
        max_rps=settings.max_rps,
        decrease_factor=settings.decrease_factor,
        decrease_window_s=settings.decrease_window_s,
        decrease_to_measured=settings.decrease_to_measured,
        headroom=settings.headroom,
        increase_interval_s=settings.increase_interval_s,
        increase_step_fraction=settings.increase_step_fraction,
        increase_step_min_rps=settings.increase_step_min_rps,
        increase_step_growth=settings.increase_step_growth,
        probe_after_s=settings.probe_after_s,
        min_utilisation=settings.min_utilisation,
        probe_cap=settings.probe_cap,
        probe_cap_above_ceiling=settings.probe_cap_above_ceiling,
        ceiling_rise=settings.ceiling_rise,
        min_measure_s=settings.min_measure_s,
        min_measure_ok=settings.min_measure_ok,
        min_offered=settings.min_offered,
    )


def breaker_config(settings: ExperimentSettings) -> BreakerConfig:
    return BreakerConfig(
        threshold=settings.breaker_threshold,
        cooldown_s=settings.breaker_cooldown_s,
        probe_timeout_s=settings.call_timeout_s + 10,
    )


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
        await conn.execute(
            "insert into provider_breakers (task_queue, provider) values ($1, $2)"
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
            " throttled_since_change = 0,"
            f" changed_at = {_NOW}, last_decrease_at = null, hold_until = 0, step = 0,"
            " version = version + 1 where task_queue = $1 and provider = $2",
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
    return BreakerState(
        status=row[status_column],
        consecutive_failures=row["consecutive_failures"],
        opened_at=row["opened_at"],
        probe_started_at=row["probe_started_at"],
        trips=row["trips"],
    )


def _aimd(row: Any) -> AimdState:
    return AimdState(
        rate=row["rate"],
        ceiling=row["ceiling"],
        changed_at=row["changed_at"],
        ok_since_change=row["ok_since_change"],
        throttled_since_change=row["throttled_since_change"],
        last_decrease_at=row["last_decrease_at"],
        hold_until=row["hold_until"],
        step=row["step"],
    )


def _decision(state: AimdState) -> tuple[Any, ...]:
    """What a decision writes (the counters are bumped in SQL)."""
    return (
        state.rate,
        state.ceiling,
        state.changed_at,
        state.last_decrease_at,
        state.hold_until,
        state.step,
    )


async def admit_call(
    pool: asyncpg.Pool, task_queue: str, provider: str, config: BreakerConfig
) -> tuple[Admission, BreakerState]:
    """May a call go to the provider now? A half-open probe is claimed atomically."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"select *, {_NOW} as now from provider_breakers"
            " where task_queue = $1 and provider = $2",
            task_queue,
            provider,
        )
        if row is None:
            return Admission(allowed=True), BreakerState()
        state = breaker_from_row(row)
        if state.status == "closed":
            return Admission(allowed=True), state
        async with conn.transaction():
            row = await conn.fetchrow(
                f"select *, {_NOW} as now from provider_breakers"
                " where task_queue = $1 and provider = $2 for update",
                task_queue,
                provider,
            )
            state = breaker_from_row(row)
            admission = admit(state, row["now"], config)
            if admission.probe:
                claimed = claim_probe(state, row["now"])
                await _write_breaker(conn, task_queue, provider, claimed)
                state = claimed
            return admission, state


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


@dataclass(frozen=True)
class OutcomeEffect:
    rate_changed_to: float | None = None
    breaker_tripped: bool = False


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
    rate_changed: float | None = None
    tripped = False
    async with pool.acquire() as conn:
        if outcome in ("ok", "throttled"):
            column = "ok" if outcome == "ok" else "throttled"
            row = await conn.fetchrow(
                f"update provider_limits set {column}_total = {column}_total + 1,"
                f" {column}_since_change = {column}_since_change + 1"
                " where task_queue = $1 and provider = $2"
                f" returning *, {_NOW} as now",
                task_queue,
                provider,
            )
            if row is not None:
                before = dict(row)
                before[f"{column}_since_change"] -= 1
                if outcome == "ok":
                    decided = on_success(_aimd(before), row["now"], aimd)
                else:
                    sent_at = None if age_s is None else row["now"] - age_s
                    decided = on_throttled(
                        _aimd(before), row["now"], retry_after_s, aimd, sent_at=sent_at
                    )
                if _decision(decided) != _decision(_aimd(row)):
                    written = await conn.execute(
                        # A new window (changed_at) restarts the counts; a decision
                        # that keeps the window (a hold) keeps them.
                        "update provider_limits set rate = $4, ceiling = $5,"
                        " ok_since_change = case when changed_at = $6 then ok_since_change"
                        " else 0 end, throttled_since_change = case when changed_at = $6"
                        " then throttled_since_change else 0 end, changed_at = $6,"
                        " last_decrease_at = $7, hold_until = $8, step = $9,"
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
                    )
                    if written.endswith(" 1") and decided.rate != row["rate"]:
                        rate_changed = decided.rate
                        log.info(
                            "%s %s: rate %.2f -> %.2f after %s (ceiling %s; %d ok, %d 429 in %.2f s)",
                            task_queue,
                            provider,
                            row["rate"],
                            decided.rate,
                            outcome,
                            f"{decided.ceiling:.2f}" if decided.ceiling is not None else "unknown",
                            row["ok_since_change"],
                            row["throttled_since_change"],
                            row["now"] - row["changed_at"],
                        )
        elif outcome == "failure":
            await conn.execute(
                "update provider_limits set failure_total = failure_total + 1"
                " where task_queue = $1 and provider = $2",
                task_queue,
                provider,
            )
        if outcome == "ok" and record_success(breaker_seen) != breaker_seen:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "select * from provider_breakers where task_queue = $1 and provider = $2"
                    " for update",
                    task_queue,
                    provider,
                )
                if row is not None:
                    state = breaker_from_row(row)
                    closed = record_success(state)
                    if closed != state:
                        await _write_breaker(conn, task_queue, provider, closed)
        elif outcome == "failure":
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"select *, {_NOW} as now from provider_breakers"
                    " where task_queue = $1 and provider = $2 for update",
                    task_queue,
                    provider,
                )
                if row is not None:
                    state = breaker_from_row(row)
                    failed = record_failure(state, row["now"], breaker)
                    tripped = failed.trips > state.trips
                    await _write_breaker(conn, task_queue, provider, failed)
                    await conn.execute(
                        "update provider_breakers set last_error = $3"
                        " where task_queue = $1 and provider = $2",
                        task_queue,
                        provider,
                        error[:500],
                    )
    return OutcomeEffect(rate_changed_to=rate_changed, breaker_tripped=tripped)


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
            ProviderStatus(
                provider=r["provider"],
                rate=r["rate"],
                initial_rate=r["initial_rate"],
                ceiling=r["ceiling"],
                ok_total=r["ok_total"],
                throttled_total=r["throttled_total"],
                failure_total=r["failure_total"],
                breaker=r["status"],
                consecutive_failures=r["consecutive_failures"],
                trips=r["trips"],
                opened_at=r["opened_at"],
                cooldown_left_s=left,
                now=r["now"],
            )
        )
    return statuses


async def current_rates(pool: asyncpg.Pool, task_queue: str) -> dict[str, float]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "select provider, rate from provider_limits where task_queue = $1", task_queue
        )
    return {r["provider"]: float(r["rate"]) for r in rows}


# --- the server-side limit ------------------------------------------------------


async def push_rate(client: Client, queue: str, rps: float, reason: str = "") -> None:
    """Set the activity dispatch rate of `queue` on the Temporal server."""
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity=client.identity,
        task_queue=queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    request.update_queue_rate_limit.rate_limit.CopyFrom(RateLimit(requests_per_second=rps))
    request.update_queue_rate_limit.reason = reason or "konstruct adaptive rate"
    await client.workflow_service.update_task_queue_config(request)


async def server_rate(client: Client, queue: str) -> float | None:
    """The queue's rate limit as the server holds it (None: unlimited)."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_config=True,
        )
    )
    config = response.config
    if not config.HasField("queue_rate_limit") or not config.queue_rate_limit.HasField(
        "rate_limit"
    ):
        return None
    return float(config.queue_rate_limit.rate_limit.requests_per_second)
