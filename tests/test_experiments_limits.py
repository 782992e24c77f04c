"""Declared and announced limits, and token metering.

A deployment may declare its provider's limits (`model_info.rpm` / `tpm`), and a
provider may announce them in its answers' headers (`x-ratelimit-limit-*`). The
runner paces requests and tokens by them instead of learning them from 429s.
Real PostgreSQL, dev server and simulator (over HTTP through litellm); the pure
parts directly. Nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from temporalio.client import Client

from konstruct.config import ExperimentSettings, Settings
from konstruct.experiments.models import ExperimentResult
from konstruct.platform.errors import ConfigError
from konstruct.providers.adapter import AnnouncedLimits, announced_limits
from konstruct.providers.control import (
    AimdConfig,
    AimdState,
    BreakerConfig,
    LimitsSeen,
    ProviderBounds,
    declared_bounds,
    learn_from_counts,
    on_announced_limit,
)
from konstruct.providers.queue_limits import push_rate, pushes_settled, queue_rate
from konstruct.providers.router import RateLimits, load_router_config
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.store import OutcomeCounts, ensure_provider, record_outcomes
from konstruct.providers.store import reserve_calls as book
from tests.test_experiments import FAST, experiment, start, throttled
from tests.test_experiments_batches import BATCHED, assert_one_result_each
from workers.main import build_worker

ROOT = Path(__file__).resolve().parent.parent
CONFIG = AimdConfig()

# --- the pure parts -----------------------------------------------------------------


def test_a_declared_rpm_caps_the_rate_and_starts_just_under_it() -> None:
    bounds = declared_bounds(RateLimits(rpm=6000, tpm=120_000), CONFIG, 5)
    assert bounds.max_rps == 100 and bounds.initial_rps == pytest.approx(97)
    assert bounds.token_rate == 2000 and bounds.declared_rps == 100
    # Without declared limits: the settings' defaults, nothing metered.
    plain = declared_bounds(RateLimits(), CONFIG, 5)
    assert (plain.initial_rps, plain.max_rps, plain.token_rate) == (5, CONFIG.max_rps, None)


def test_successes_under_an_announced_limit_keep_the_rate_under_it_by_the_headroom() -> None:
    # Bench, sliding window of 100 req/s announced: slow start went on from 97 to
    # 100.0, and at 100.0 three calls met a full window (halved to 50 for 1.6 s).
    seen = LimitsSeen(1.0, 1000.0, declared=False, header_rps=100.0, announced=False)
    state = AimdState(rate=97.0, changed_at=0.0)
    t = 0.0
    for _ in range(40):  # four seconds of calls at 100 a second, counted every 0.1 s
        t += 0.1
        counted = replace(state, ok_since_change=state.ok_since_change + 10)
        learned = learn_from_counts(counted, 10, 0, t, CONFIG, seen)
        state = learned.decided if learned is not None else counted
    assert state.rate == pytest.approx(100.0 * CONFIG.headroom)


def test_an_announced_limit_ends_the_climb_and_caps_a_rate_above_it() -> None:
    climbing = AimdState(rate=10.0, changed_at=0.0)
    jumped = on_announced_limit(climbing, 100.0, 1.0, CONFIG)
    assert jumped.rate == pytest.approx(97) and jumped.changed_at == 1.0
    above = AimdState(rate=150.0, changed_at=0.0, slow_start=False)
    assert on_announced_limit(above, 100.0, 1.0, CONFIG).rate == pytest.approx(97)
    # After a 429 (slow start over) a rate under the limit is the AIMD's to move.
    learned = AimdState(rate=40.0, ceiling=41.0, changed_at=0.0, slow_start=False)
    assert on_announced_limit(learned, 100.0, 1.0, CONFIG) == learned


def test_limits_are_read_from_openai_and_anthropic_headers_as_litellm_forwards_them() -> None:
    openai = {"x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "800000"}
    assert announced_limits(openai) == AnnouncedLimits(requests=5000, tokens=800000)
    anthropic = {"llm_provider-anthropic-ratelimit-requests-limit": "4000"}
    assert announced_limits(anthropic) == AnnouncedLimits(requests=4000)
    assert announced_limits({"x-ratelimit-limit-requests": "n/a"}) is None
    assert announced_limits(None) is None


def test_a_bad_declared_limit_names_its_field(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "llm-router.yaml").read_text())
    config["model_list"][0]["model_info"]["tpm"] = -5
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"model_list\.0\.model_info\.tpm"):
        load_router_config(path)


# --- the token clock in PostgreSQL ----------------------------------------------------


async def test_metered_calls_are_spaced_by_their_tokens_and_settled_by_their_usage(
    app_pool: asyncpg.Pool,
) -> None:
    async with app_pool.acquire() as conn:
        queue = f"tokens-{uuid.uuid4().hex[:8]}"
        # 1,000 requests a second allowed, but only 100 tokens a second.
        await ensure_provider(conn, queue, "p", ProviderBounds(1000, 1, 1000, token_rate=100))
        grant = await book(conn, queue, "p", 10, 1.0, tokens_each=25)
        assert grant.metered and grant.interval_s == pytest.approx(0.25)
        assert grant.granted == 4  # slots at 0, 0.25, 0.5, 0.75 s: the horizon's second
        # The calls used 5 tokens each, not 25: 80 tokens (0.8 s) go back, so the next
        # call goes right after the last one booked (0.75 s, the request clock) instead
        # of when its 25 tokens would have been free (1 s).
        await record_outcomes(
            conn,
            queue,
            "p",
            OutcomeCounts(ok=4, token_excess=4 * (5 - 25)),
            breaker_seen=None,
            aimd=CONFIG,
            breaker=BreakerConfig(),
        )
        again = await book(conn, queue, "p", 1, 1.0, tokens_each=25)
        assert again.first_in_s < 0.9, again
        # Not metered: spaced by requests only, and nothing to settle.
        other = f"plain-{uuid.uuid4().hex[:8]}"
        await ensure_provider(conn, other, "p", ProviderBounds(100, 1, 1000))
        plain = await book(conn, other, "p", 10, 0.05, tokens_each=25)
        assert not plain.metered and plain.interval_s == pytest.approx(0.01)


async def test_an_announced_limit_caps_the_shared_rate_unless_one_is_declared(
    app_pool: asyncpg.Pool,
) -> None:
    async with app_pool.acquire() as conn:
        queue = f"announced-{uuid.uuid4().hex[:8]}"
        await ensure_provider(conn, queue, "p", ProviderBounds(10, 1, 1000))
        effect = await record_outcomes(
            conn,
            queue,
            "p",
            OutcomeCounts(ok=1, limits=AnnouncedLimits(requests=3000, tokens=600_000)),
            breaker_seen=None,
            aimd=CONFIG,
            breaker=BreakerConfig(),
        )
        # 3,000 a minute: straight to just under 50 a second, and tokens metered at 10,000/s.
        assert effect.rate_changed_to == pytest.approx(48.5)
        row = await conn.fetchrow(
            "select header_rate, header_token_rate from provider_limits where task_queue = $1",
            queue,
        )
        assert (row["header_rate"], row["header_token_rate"]) == (50, 10_000)
        assert (await book(conn, queue, "p", 1, 0.1, tokens_each=1)).metered
        # A declared rpm wins: the header moves nothing.
        declared = f"declared-{uuid.uuid4().hex[:8]}"
        await ensure_provider(
            conn, declared, "p", ProviderBounds(9.7, 1, 10, declared_rps=10, token_rate=None)
        )
        effect = await record_outcomes(
            conn,
            declared,
            "p",
            OutcomeCounts(ok=1, limits=AnnouncedLimits(requests=3000)),
            breaker_seen=None,
            aimd=CONFIG,
            breaker=BreakerConfig(),
        )
        assert effect.rate_changed_to is None


# --- experiments against the simulator -------------------------------------------------


@pytest.fixture
def limited_worker(
    client: Client, settings: Settings, task_queue: str, tmp_path: Path
) -> Callable[..., AbstractAsyncContextManager[str]]:
    """A worker whose router config gives the simulator's fast deployment these
    `model_info` entries (the limits a user would declare for their provider)."""

    @asynccontextmanager
    async def start_worker(**model_info: Any) -> AsyncIterator[str]:
        config = yaml.safe_load((ROOT / "deploy" / "llm-router.yaml").read_text())
        for deployment in config["model_list"]:
            if deployment["model_info"].get("id") == FAST:
                deployment["model_info"].update(model_info)
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump(config))
        llm = settings.llm.model_copy(update={"router_config": path})
        limited = settings.model_copy(update={"llm": llm})
        async with build_worker(client, limited, task_queue) as w, w:
            yield task_queue

    return start_worker


async def test_a_declared_tpm_meets_a_tokens_limit_without_learning_it_from_429s(
    client: Client,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    limited_worker: Callable[..., AbstractAsyncContextManager[str]],
) -> None:
    # 900 tokens per 2 s, about 50 calls' worth: 27,000 a minute, declared as such.
    await sim.set_profile(
        FAST,
        latency_ms=20,
        rate_limit_shape="tokens_per_minute",
        rate_limit_tokens=900,
        rate_limit_window_s=2.0,
    )
    body = experiment(150, max_concurrency=20, options=BATCHED)
    async with limited_worker(tpm=27_000) as queue:
        result: ExperimentResult = await (await start(client, queue, body)).result()
    assert result.summary.completed == 150 and result.summary.failed == 0
    stats = await sim.model_stats(FAST)
    # Paced by tokens, at most the first window's refusals (with the token clock
    # switched off, the same run was refused 11 times).
    assert stats["ok"] == 150 and throttled(stats) <= 3, stats
    await assert_one_result_each(app_pool, body)


WINDOW_LIMITS: dict[str, dict[str, Any]] = {
    # Each near 15 calls a second, under the 50/s the provider starts at, per 2 s.
    "sliding_window": {"rate_limit_requests": 30},
    "tokens_per_minute": {"rate_limit_tokens": 900},
}


@pytest.mark.parametrize("shape", list(WINDOW_LIMITS))
async def test_an_announced_limit_is_followed_from_the_first_answers(
    shape: str,
    client: Client,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    limited_worker: Callable[..., AbstractAsyncContextManager[str]],
) -> None:
    # The limit comes in x-ratelimit-limit-requests or -tokens on every answer;
    # the config says only how long the provider's window is (2 s, not a minute).
    await sim.set_profile(
        FAST, latency_ms=20, rate_limit_shape=shape, rate_limit_window_s=2.0, **WINDOW_LIMITS[shape]
    )
    # 60 items: the limit is announced on the first answers; more items only wait it out.
    body = experiment(60, max_concurrency=20, options=BATCHED)
    async with limited_worker(limit_window_s=2.0) as queue:
        result: ExperimentResult = await (await start(client, queue, body)).result()
        async with app_pool.acquire() as conn:
            row = await conn.fetchrow(
                "select rate, header_rate, header_token_rate from provider_limits"
                " where task_queue = $1 and provider = 'simulator'",
                queue,
            )
    assert result.summary.completed == 60 and result.summary.failed == 0
    if shape == "sliding_window":
        assert row["header_rate"] == 15 and row["rate"] <= 15, dict(row)
    else:
        assert row["header_token_rate"] == 450, dict(row)
    stats = await sim.model_stats(FAST)
    # Every refusal counted (the first burst at 50/s may meet the limit), each item once.
    assert stats["ok"] == 60, stats
    assert result.summary.providers["calls"]["throttled"] == throttled(stats)
    await assert_one_result_each(app_pool, body)


async def test_a_rate_push_whose_caller_was_cancelled_still_lands(client: Client) -> None:
    """A push is never cancelled once sent: the server notes an update whose caller went
    away after its write one version behind, and refuses every later update of the
    queue's config for minutes (ci58 and a local run: an experiment's prepare failed
    for 280 s with "Expected exactly one row to be updated")."""
    queue = f"push-{uuid.uuid4().hex[:8]}"
    await push_rate(client, queue, 5.0)
    assert await queue_rate(client, queue) == 5.0
    waiting = asyncio.ensure_future(push_rate(client, queue, 7.0, "cancelled caller"))
    await asyncio.sleep(0)  # the push is on its way
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await pushes_settled()
    assert await queue_rate(client, queue) == 7.0
    await push_rate(client, queue, 9.0)
    assert await queue_rate(client, queue) == 9.0


async def test_a_slot_booked_before_this_worker_lowered_the_rate_is_booked_again(
    app_pool: asyncpg.Pool,
) -> None:
    """The schedule runs `schedule_horizon_s` ahead: calls booked at 40 req/s just
    before a 429 cut the rate would still go at 40. A call booked before this process
    lowered the rate books again at the new rate; one booked after the cut keeps its
    slot."""
    from activities.provider_calls import ProviderCallActivities

    settings = ExperimentSettings(schedule_horizon_s=1.0)
    queue = f"rebook-{uuid.uuid4().hex[:8]}"
    calls = ProviderCallActivities(
        app_pool, load_router_config(ROOT / "deploy" / "llm-router.yaml"), settings, queue
    )
    loop = asyncio.get_running_loop()

    async def next_slot() -> float:
        async with app_pool.acquire() as conn:
            return float(
                await conn.fetchval(
                    "select next_slot_at from provider_schedule where task_queue = $1", queue
                )
            )

    async with app_pool.acquire() as conn:
        await ensure_provider(conn, queue, "p", ProviderBounds(40, 1, 1000))
    booked_at = loop.time()
    grant = await calls.book("p", 5)
    assert grant.granted == 5 and grant.interval_s == pytest.approx(0.025)
    # Refusals, counted as a worker counts a batch's: the rate halves (slow start's
    # first 429) and this process notes it lowered it.
    async with app_pool.acquire() as conn:
        effect = await record_outcomes(
            conn,
            queue,
            "p",
            OutcomeCounts(ok=0, throttled=3),
            breaker_seen=None,
            aimd=settings.aimd_config(),
            breaker=settings.breaker_config(),
        )
    assert effect.rate_lowered and effect.rate_changed_to is not None
    await calls.apply_effect("p", effect, "test")
    before = await next_slot()
    last_slot = booked_at + grant.first_in_s + 4 * grant.interval_s
    await calls.until_slot("p", last_slot, booked_at)
    rebooked = await next_slot()
    assert rebooked > before  # booked once more, behind the five, at the new rate
    # A slot booked after the cut is kept as it was.
    after_cut = loop.time()
    grant = await calls.book("p", 1)
    kept = await next_slot()
    await calls.until_slot("p", after_cut + grant.first_in_s, after_cut)
    assert await next_slot() == kept
