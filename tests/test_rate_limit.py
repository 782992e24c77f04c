"""The adaptive rate and the circuit breaker, as the pure decisions they are."""

from __future__ import annotations

from dataclasses import replace

from konstruct.provider_control import (
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

HALVING = AimdConfig(decrease_to_measured=False)
MEASURED = AimdConfig()


def succeed(state: AimdState, start: float, seconds: float, per_second: float, config: AimdConfig):
    """Successes at `per_second` for `seconds`; returns the state and the rates it took."""
    rates = []
    n = int(seconds * per_second)
    for i in range(n):
        state = on_success(state, start + i / per_second, config)
        rates.append(state.rate)
    return state, rates


def test_a_429_halves_the_rate_once_per_window() -> None:
    state = AimdState(rate=40.0, changed_at=0.0)
    first = on_throttled(state, 10.0, None, HALVING)
    assert first.rate == 20.0
    # The rest of the burst, within the window: no further decrease.
    burst = on_throttled(first, 10.5, None, HALVING)
    assert burst == first
    later = on_throttled(first, 11.5, None, HALVING)
    assert later.rate == 10.0


def test_the_decrease_never_goes_below_the_floor() -> None:
    state = AimdState(rate=0.6, changed_at=0.0)
    assert on_throttled(state, 5.0, None, HALVING).rate == HALVING.min_rps


def test_retry_after_holds_any_increase() -> None:
    state = on_throttled(AimdState(rate=40.0, changed_at=0.0), 10.0, 5.0, HALVING)
    assert state.hold_until == 15.0
    held, rates = succeed(state, 10.1, 4.5, 20, HALVING)
    assert set(rates) == {20.0}
    after, rates = succeed(held, 15.0, 1.2, 20, HALVING)
    assert max(rates) > 20.0


def test_successes_raise_the_rate_additively_at_most_once_per_interval() -> None:
    state = AimdState(rate=10.0, changed_at=0.0)
    state, rates = succeed(state, 0.0, 5.0, 20, HALVING)
    changes = [b for a, b in zip(rates, rates[1:], strict=False) if b != a]
    # One increase per second at most, each a step added (growing while no 429 comes).
    assert len(changes) <= 5
    steps = [b - a for a, b in zip([10.0, *changes], changes, strict=False)]
    assert all(s > 0 for s in steps)
    # Never far above the 20 calls a second that actually flow.
    assert max(rates) <= 20 * HALVING.probe_cap


def test_an_unused_rate_is_not_raised() -> None:
    # 10 calls a second against a rate of 40: the rate is not the bottleneck.
    state, rates = succeed(AimdState(rate=40.0, changed_at=0.0), 0.0, 10.0, 10, HALVING)
    assert set(rates) == {40.0}


def test_the_rate_stays_within_its_bounds() -> None:
    config = AimdConfig(max_rps=12.0)
    state, rates = succeed(AimdState(rate=10.0, changed_at=0.0), 0.0, 20.0, 20, config)
    assert max(rates) == 12.0


def test_measured_decrease_goes_just_under_what_the_provider_accepted() -> None:
    # At 60/s the provider accepted 50/s for two seconds, then a 429.
    state = AimdState(rate=60.0, changed_at=0.0, ok_since_change=100)
    cut = on_throttled(state, 2.0, 1.0, MEASURED)
    assert cut.ceiling == 50.0
    assert cut.rate == 50.0 * MEASURED.headroom
    # Plain halving would have gone to 30.
    assert on_throttled(state, 2.0, 1.0, HALVING).rate == 30.0


def test_measured_decrease_goes_straight_under_a_ceiling_that_fell_far() -> None:
    # The ceiling dropped to 10/s while we sent 50/s: no halving in steps, straight under it.
    state = AimdState(rate=50.0, changed_at=0.0, ok_since_change=20)
    cut = on_throttled(state, 2.0, 1.0, MEASURED)
    assert cut.rate == 10.0 * MEASURED.headroom


def test_after_a_halving_the_rate_recovers_to_just_under_the_learned_ceiling() -> None:
    state = on_throttled(AimdState(rate=40.0, changed_at=0.0), 10.0, 1.0, HALVING)
    assert state.rate == 20.0 and state.ceiling == 40.0
    state, _ = succeed(state, 10.0, 1.5, 20, HALVING)
    assert state.rate == 40.0 * HALVING.headroom
    # Then it holds there before probing above it.
    held, rates = succeed(state, state.changed_at, HALVING.probe_after_s - 0.1, 20, HALVING)
    assert set(rates) == {40.0 * HALVING.headroom}


def test_a_raised_ceiling_is_found_within_seconds() -> None:
    # Learned 10/s; the provider now allows 50/s: the growing steps find it fast.
    state = AimdState(rate=9.7, ceiling=10.0, changed_at=0.0, hold_until=0.0, step=0.5)
    t = 0.0
    while state.rate < 45.0 and t < 30.0:
        state = on_success(state, t, MEASURED)
        t += 0.02
    assert state.rate >= 45.0
    assert t < 10.0


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    config = BreakerConfig(threshold=3, cooldown_s=10.0)
    state = BreakerState()
    for _ in range(2):
        state = record_failure(state, 1.0, config)
        assert state.status == "closed"
    state = record_failure(state, 2.0, config)
    assert state.status == "open" and state.trips == 1 and state.opened_at == 2.0


def test_a_success_resets_the_count() -> None:
    config = BreakerConfig(threshold=3)
    state = record_failure(record_failure(BreakerState(), 0.0, config), 0.0, config)
    state = record_success(state)
    state = record_failure(record_failure(state, 0.0, config), 0.0, config)
    assert state.status == "closed"


def test_open_breaker_refuses_until_the_cooldown_then_lets_one_probe() -> None:
    config = BreakerConfig(threshold=1, cooldown_s=10.0, probe_timeout_s=30.0)
    state = record_failure(BreakerState(), 100.0, config)
    waiting = admit(state, 104.0, config)
    assert not waiting.allowed and waiting.retry_in_s == 6.0 and "open" in waiting.reason
    probe = admit(state, 110.0, config)
    assert probe.allowed and probe.probe
    state = claim_probe(state, 110.0)
    # While the probe runs, every other call waits.
    other = admit(state, 111.0, config)
    assert not other.allowed and "half-open" in other.reason
    # A probe whose worker died is given up after the probe timeout.
    assert admit(state, 141.0, config).probe


def test_probe_outcome_closes_or_reopens() -> None:
    config = BreakerConfig(threshold=1, cooldown_s=10.0)
    half_open = claim_probe(record_failure(BreakerState(), 0.0, config), 10.0)
    assert record_success(half_open).status == "closed"
    reopened = record_failure(half_open, 12.0, config)
    assert reopened.status == "open" and reopened.opened_at == 12.0 and reopened.trips == 2


def test_failures_while_open_do_not_count_as_new_trips() -> None:
    config = BreakerConfig(threshold=1)
    state = record_failure(BreakerState(), 0.0, config)
    later = record_failure(state, 1.0, config)
    assert later.trips == 1 and later.opened_at == 0.0
    assert replace(later, consecutive_failures=0).status == "open"


def test_an_unmeasured_429_falls_back_under_the_known_ceiling_not_to_half() -> None:
    state = AimdState(rate=30.0, ceiling=25.0, changed_at=10.0, ok_since_change=2)
    cut = on_throttled(state, 10.2, None, MEASURED)
    assert cut.rate == 25.0 * MEASURED.headroom
    # Without a known ceiling, plain halving.
    assert on_throttled(replace(state, ceiling=None), 10.2, None, MEASURED).rate == 15.0


def test_before_the_first_429_the_rate_climbs_fast_but_near_what_flows() -> None:
    # 60 successes a second against a rate of 10: it climbs, never past 1.3 x the flow.
    state, rates = succeed(AimdState(rate=10.0, changed_at=0.0), 0.0, 6.0, 60, MEASURED)
    assert rates[-1] > 25.0
    assert max(rates) <= 60 * MEASURED.probe_cap
