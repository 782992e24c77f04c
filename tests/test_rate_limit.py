"""The adaptive rate and the circuit breaker, as the pure decisions they are."""

from __future__ import annotations

from dataclasses import replace

import pytest

from konstruct.providers.control import (
    AimdConfig,
    AimdState,
    BreakerConfig,
    BreakerState,
    admit,
    aged,
    claim_probe,
    decide_counts,
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
    window = HALVING.decrease_window_s
    burst = on_throttled(first, 10.0 + window / 2, None, HALVING)
    assert (burst.rate, burst.changed_at) == (first.rate, first.changed_at)
    assert burst.throttled_since_change == 1
    later = on_throttled(first, 10.0 + window * 1.5, None, HALVING)
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
    # No ceiling known yet (slow start): one increase per half second at most, each
    # a step added (growing while no 429 comes).
    assert len(changes) <= 5 / HALVING.slow_start_interval_s
    steps = [b - a for a, b in zip([10.0, *changes], changes, strict=False)]
    assert all(s > 0 for s in steps)
    # Never far above the 20 calls a second that actually flow.
    assert max(rates) <= 20 * HALVING.slow_start_factor


def test_an_unused_rate_is_not_raised() -> None:
    # 10 calls a second against a rate of 40: the rate is not the bottleneck.
    state, rates = succeed(AimdState(rate=40.0, changed_at=0.0), 0.0, 10.0, 10, HALVING)
    assert set(rates) == {40.0}


def test_the_rate_stays_within_its_bounds() -> None:
    config = AimdConfig(max_rps=12.0)
    state, rates = succeed(AimdState(rate=10.0, changed_at=0.0), 0.0, 20.0, 20, config)
    assert max(rates) == 12.0


def test_measured_decrease_goes_just_under_what_the_provider_accepted() -> None:
    # At 60/s the provider accepted 50/s for two seconds (refusing 10/s), then a 429.
    state = AimdState(rate=60.0, changed_at=0.0, ok_since_change=100, throttled_since_change=19)
    cut = on_throttled(state, 2.0, 1.0, MEASURED)
    assert cut.ceiling == 50.0
    assert cut.rate == 50.0 * MEASURED.headroom
    # Plain halving would have gone to 30.
    assert on_throttled(state, 2.0, 1.0, HALVING).rate == 30.0


def test_measured_decrease_goes_straight_under_a_ceiling_that_fell_far() -> None:
    # The ceiling dropped to 10/s while we sent 50/s (40 of them a second refused,
    # and retried): no halving in steps, straight under it.
    state = AimdState(rate=50.0, changed_at=0.0, ok_since_change=20, throttled_since_change=79)
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
    # 60 successes a second against a rate of 10: it climbs, never past
    # `slow_start_factor` x the flow.
    state, rates = succeed(AimdState(rate=10.0, changed_at=0.0), 0.0, 6.0, 60, MEASURED)
    assert rates[-1] > 25.0
    assert max(rates) <= 60 * MEASURED.slow_start_factor


def test_slow_start_reaches_a_high_limit_within_seconds() -> None:
    # Calls flow at whatever the rate allows, up to 200 a second: from 10 req/s
    # the rate passes 150 within 3.5 s, where +50 % a second took ten.
    state, t, rate_at = AimdState(rate=10.0, changed_at=0.0), 0.0, {}
    while t < 6.0:
        state = on_success(state, t, MEASURED)
        t += 1.0 / min(200.0, state.rate)
        rate_at[round(t, 1)] = state.rate
    assert max(r for at, r in rate_at.items() if at <= 3.5) > 150.0


def test_a_429_after_a_lull_keeps_the_known_ceiling() -> None:
    # 57 calls in 5.7 s against a rate of 28 (the workflow paused), then a 429: the
    # provider did not fall to 10/s; the rate goes back under the ceiling it knows.
    state = AimdState(rate=28.0, ceiling=25.0, changed_at=0.0, ok_since_change=57)
    cut = on_throttled(state, 5.7, 0.1, MEASURED)
    assert cut.ceiling == 25.0
    assert cut.rate == 25.0 * MEASURED.headroom


def test_a_429_right_after_a_raise_does_not_make_that_rate_the_ceiling() -> None:
    # The first climb just went to 58/s and a 429 came 30 ms later: nothing measured.
    state = AimdState(rate=58.0, changed_at=10.0, ok_since_change=1)
    cut = on_throttled(state, 10.03, None, MEASURED)
    assert cut.rate == 29.0 and cut.ceiling is None
    # Successes do not send it straight back to 58: it climbs again near what flows.
    after, rates = succeed(cut, 10.1, 1.5, 25, MEASURED)
    assert max(rates) <= 25 * MEASURED.probe_cap


def test_a_limit_that_rose_is_forgotten_so_a_429_does_not_fall_back_under_it() -> None:
    # Learned 5/s; the provider now allows 25/s and the probe climbs with no 429.
    state = AimdState(rate=4.85, ceiling=5.0, changed_at=0.0, step=0.5)
    state, rates = succeed(state, 0.0, 8.0, 30, MEASURED)
    assert state.rate > 20.0 and state.ceiling is None
    # A 429 right after the next step (nothing measured yet) halves: not back to 5.
    cut = on_throttled(replace(state, changed_at=8.0, ok_since_change=1), 8.05, None, MEASURED)
    assert cut.rate == state.rate * MEASURED.decrease_factor


def test_probing_above_a_learned_ceiling_stays_near_what_flows() -> None:
    # Ceiling 25, successes at 25.5/s: each step at most 1.2 x that, no runaway doubling.
    state = AimdState(rate=24.25, ceiling=25.0, changed_at=0.0, step=1.25)
    state, rates = succeed(state, 0.0, 6.0, 25.5, MEASURED)
    assert max(rates) > 24.25
    assert max(rates) <= 25.5 * MEASURED.probe_cap_above_ceiling + 1e-6
    assert state.ceiling == 25.0


def test_a_429_under_the_ceiling_keeps_measuring_until_a_drop_is_clear() -> None:
    # At 24.25/s under a ceiling of 25, a 429 after 3 successes: no news, nothing
    # moves and the measurement window is not restarted.
    state = AimdState(rate=24.25, ceiling=25.0, changed_at=0.0, ok_since_change=3)
    early = on_throttled(state, 0.6, 0.2, MEASURED)
    assert (early.rate, early.ceiling, early.changed_at) == (24.25, 25.0, 0.0)
    assert early.hold_until == 0.8
    # The provider really fell to 5/s: once ten successes are counted, the rate
    # goes straight under it.
    later = replace(early, ok_since_change=10, throttled_since_change=38)
    cut = on_throttled(later, 2.0, 0.2, MEASURED)
    assert cut.ceiling == 5.0 and cut.rate == 5.0 * MEASURED.headroom


def test_a_ceiling_found_too_high_is_lowered_at_its_second_refusal_under_it() -> None:
    # A probe measured 21.25/s (the bucket's burst with it) against a steady limit
    # of 20: the rate, 20.61 under that ceiling, is refused about every 1.6 s.
    state = AimdState(rate=20.61, ceiling=21.25, changed_at=0.0, ok_since_change=32)
    # The first refusal, 20 a second taken: a burst at the edge looks the same;
    # nothing moves yet.
    first = on_throttled(state, 1.6, None, MEASURED)
    assert (first.rate, first.ceiling, first.changed_at) == (20.61, 21.25, 0.0)
    # The second, 1.6 s later, with 20 a second taken: the ceiling is what was taken
    # (before: unchanged until ten refusals, `min_refused_calls`).
    second = on_throttled(replace(first, ok_since_change=64), 3.2, None, MEASURED)
    assert second.ceiling == 20.0 and second.rate == 20.0 * MEASURED.headroom
    # Taking all that was sent (a burst at the edge, twice) lowers nothing.
    edge = on_throttled(replace(first, ok_since_change=66), 3.2, None, MEASURED)
    assert (edge.rate, edge.ceiling) == (20.61, 21.25)


def test_a_429_for_a_request_sent_before_the_last_decrease_changes_nothing() -> None:
    state = on_throttled(
        AimdState(rate=40.0, changed_at=0.0, ok_since_change=60, throttled_since_change=20),
        2.0,
        0.1,
        MEASURED,
    )
    # 1.5 s later (past the window) a 429 arrives for a request sent at 1.9 s.
    window = replace(state, ok_since_change=30, throttled_since_change=10)
    late = on_throttled(window, 3.5, 0.1, MEASURED, sent_at=1.9)
    assert (late.rate, late.changed_at) == (state.rate, state.changed_at)
    assert late.throttled_since_change == 11
    # The same 429 for a request sent after the decrease is news: the rate goes down.
    assert on_throttled(window, 3.5, 0.1, MEASURED, sent_at=2.1).rate < state.rate


def test_a_429_while_the_queue_ran_short_does_not_lower_the_ceiling() -> None:
    # Calls answered at 20/s against a rate of 24 (items waiting on retries, not
    # in the queue): 16 of them a second accepted says little about the provider.
    state = AimdState(
        rate=24.0, ceiling=25.0, changed_at=0.0, ok_since_change=15, throttled_since_change=4
    )
    cut = on_throttled(state, 0.95, 0.1, MEASURED)
    assert cut.ceiling == 25.0 and cut.rate == 24.0


def test_a_low_limit_met_before_any_ceiling_is_measured_not_halved_away() -> None:
    # The provider holds 10/s; the first climb is cut to 20/s and a 429 comes
    # after 5 successes and 7 refusals in 0.54 s: a short count, but the best
    # news there is. Going under it beats halving again and again.
    state = AimdState(rate=20.0, changed_at=0.0, ok_since_change=5, throttled_since_change=7)
    cut = on_throttled(state, 0.54, 0.1, MEASURED)
    assert cut.ceiling is not None and 9.0 < cut.ceiling < 10.0
    assert cut.rate == cut.ceiling * MEASURED.headroom


def test_a_429_while_the_provider_took_all_that_was_sent_does_not_ratchet_down() -> None:
    # Known ceiling 50, sending 36.7/s, 45 a second accepted (calls finishing from
    # before): a burst at the edge, not a lower limit. The rate stays.
    state = AimdState(rate=36.67, ceiling=50.0, changed_at=0.0, ok_since_change=27)
    held = on_throttled(state, 0.59, 0.1, MEASURED)
    assert (held.rate, held.ceiling, held.changed_at) == (36.67, 50.0, 0.0)


def test_a_429_storm_that_starves_the_queue_still_lowers_the_ceiling() -> None:
    # The limit fell from 50/s to 12/s. Refused calls wait out their Retry-After,
    # so only 28.7 calls a second are answered against a rate of 48.5: fewer than
    # `min_offered` of it, yet most were refused. What was accepted is the limit.
    state = AimdState(
        rate=48.5, ceiling=50.0, changed_at=0.0, ok_since_change=18, throttled_since_change=24
    )
    cut = on_throttled(state, 1.5, 0.5, MEASURED)
    assert cut.ceiling == 12.0 and cut.rate == 12.0 * MEASURED.headroom


def test_a_429_storm_on_a_loaded_worker_still_lowers_the_ceiling() -> None:
    # The same drop, but the worker is loaded and answers only 20 calls a second:
    # 12 accepted, 8 refused, so neither the share nor the offered rate says
    # "saturated". Sixteen refusals in one window do: the limit fell.
    state = AimdState(
        rate=48.5, ceiling=50.0, changed_at=0.0, ok_since_change=24, throttled_since_change=15
    )
    cut = on_throttled(state, 2.0, 0.5, MEASURED)
    assert cut.ceiling == 12.0 and cut.rate == 12.0 * MEASURED.headroom


def test_a_young_window_that_met_a_full_bucket_halves_and_does_not_measure_it() -> None:
    # A leaky bucket of 100 req/s (no Retry-After), the rate just cut from 137 to
    # 98.9: in the window's first 0.6 s 10 calls were taken and 11 refused (the
    # bucket the old rate filled). 16.6 a second is no measure of the limit; it was
    # taken as one (98.9 -> 16.1 req/s for 2.5 s of a bench run). Halve instead.
    state = AimdState(
        rate=98.93,
        changed_at=0.0,
        ok_since_change=10,
        throttled_since_change=10,
        slow_start=False,
        last_decrease_at=0.0,
    )
    cut = on_throttled(state, 0.6, None, MEASURED)
    assert cut.ceiling is None and cut.rate == 98.93 * MEASURED.decrease_factor
    # With the provider's Retry-After, refused calls wait it out: a short queue is
    # the provider's doing, and what it took is its limit (as before).
    told = on_throttled(state, 0.6, 0.5, MEASURED)
    assert told.ceiling is not None and told.rate < 20.0


def test_a_lone_429_while_fewer_calls_came_than_the_rate_learns_what_flowed() -> None:
    # Nothing learned yet; the rate drifted to 149 while the experiment's slots let
    # 94 a second through; the provider (a leaky bucket of 100) refused one. What
    # flowed is about its limit: it becomes the ceiling, and the next lone 429
    # under it cuts nothing (before: each such 429 halved the rate, with nothing
    # learned, into a sawtooth between ~67 and ~150).
    state = AimdState(rate=148.93, changed_at=0.0, ok_since_change=172, slow_start=False)
    cut = on_throttled(state, 1.84, None, MEASURED)
    assert cut.ceiling is not None and 93.0 < cut.ceiling < 94.0
    assert cut.rate == cut.ceiling * MEASURED.headroom
    later = replace(cut, ok_since_change=180, changed_at=cut.changed_at)
    again = on_throttled(later, cut.changed_at + 2.0, None, MEASURED)
    assert (again.rate, again.ceiling) == (cut.rate, cut.ceiling)
    # Too few calls to measure: halved as before, nothing learned.
    few = on_throttled(replace(state, ok_since_change=5), 0.6, None, MEASURED)
    assert few.ceiling is None and few.rate == 148.93 * MEASURED.decrease_factor


def test_the_first_429_ends_slow_start_so_refusals_do_not_come_in_a_sawtooth() -> None:
    # A 429 with nothing measured halves the rate and learns no ceiling; the
    # climb after it is additive (probe_cap), not doubling per half second again.
    state = AimdState(rate=40.0, changed_at=0.0, ok_since_change=2)
    cut = on_throttled(state, 0.1, None, MEASURED)
    assert cut.ceiling is None and not cut.slow_start
    after, rates = succeed(cut, 1.0, 2.0, 20, MEASURED)
    assert max(rates) <= 20 * MEASURED.probe_cap
    assert not after.slow_start


def test_an_idle_start_does_not_delay_the_first_increase() -> None:
    # The rate was set at 0 s; calls flow at 10/s from 3 s. Counted from 0 s they
    # would measure 5/s at 6 s and never look like they use the rate.
    state, rates = succeed(AimdState(rate=10.0, changed_at=0.0), 3.0, 1.5, 10, MEASURED)
    assert max(rates) > 10.0


# --- what was learned ages after an idle gap -----------------------------------


def follow(state: AimdState, start: float, seconds: float, limit: float, config: AimdConfig):
    """A provider that accepts `limit` calls a second (a token bucket of one second's
    burst) offered at the state's rate, answers counted together every 0.1 s as the
    store counts a batch: returns the state, the rate each second, and ok/429 totals."""
    tick = 0.1
    bucket, owed = limit, 0.0
    ok_total = refused_total = 0
    rates: list[float] = []
    t = start
    for i in range(round(seconds / tick)):
        t = start + (i + 1) * tick
        bucket = min(limit, bucket + limit * tick)
        owed += state.rate * tick
        sent = int(owed)
        owed -= sent
        ok = min(sent, int(bucket))
        bucket -= ok
        refused = sent - ok
        ok_total += ok
        refused_total += refused
        before = state
        state = decide_counts(replace(before), ok, refused, t, config)
        state = replace(state, last_answer_at=t if ok or refused else before.last_answer_at)
        if (i + 1) % round(1 / tick) == 0:
            rates.append(state.rate)
    return state, rates, ok_total, refused_total


def learned_at(limit: float, now: float) -> AimdState:
    """The state a run at `limit` req/s left behind: its ceiling learned, its rate just under it."""
    return AimdState(
        rate=limit * MEASURED.headroom,
        ceiling=limit,
        changed_at=now - 30,
        ok_since_change=int(limit * 30),
        slow_start=False,
        last_answer_at=now,
    )


def test_a_limit_raised_while_idle_is_found_within_seconds() -> None:
    for gap in (5.0, 60.0, 270.0):
        state, rates, _, _ = follow(learned_at(20.0, 0.0), gap, 10.0, 100.0, MEASURED)
        assert rates[-1] >= 90.0, (gap, rates)


def test_a_limit_lowered_while_idle_is_met_within_two_seconds_with_few_429s() -> None:
    for gap in (5.0, 60.0, 270.0):
        state, rates, ok, refused = follow(learned_at(100.0, 0.0), gap, 2.0, 20.0, MEASURED)
        assert state.rate <= 20.0, (gap, rates)  # under the new limit within 2 s
        # The way down: a few refusals (23 when the rate restarted where it was; 6
        # at half of it, `idle_restart_fraction`).
        assert refused <= 10, (ok, refused)


def test_an_answer_within_the_idle_gap_keeps_what_was_learned() -> None:
    state = learned_at(20.0, 0.0)
    assert aged(state, MEASURED.idle_reset_s - 0.1, MEASURED) is None
    again = aged(state, MEASURED.idle_reset_s + 0.1, MEASURED)
    assert again is not None
    restart = state.rate * MEASURED.idle_restart_fraction
    assert (again.rate, again.ceiling, again.slow_start) == (restart, None, True)
    # At a low rate the gap is a few of its intervals, not two seconds of them.
    slow = replace(state, rate=0.5)
    assert aged(slow, 7.9, MEASURED) is None and aged(slow, 8.1, MEASURED) is not None


def test_without_aging_a_window_that_spans_the_gap_keeps_the_old_limit() -> None:
    """Why it ages: the run that found 20 req/s left a window open; counted over the
    idle gap, the next run's successes measure a tiny rate, so nothing rises."""
    old = replace(learned_at(20.0, 0.0), last_answer_at=None)
    _, rates, _, refused = follow(old, 270.0, 10.0, 100.0, MEASURED)
    assert max(rates) < 21.0 and refused == 0, rates


# --- probing above a learned ceiling backs off while the limit stays -----------


def test_probes_that_find_the_same_limit_come_ever_less_often() -> None:
    # A steady limit of 20 req/s for two minutes, learned at the start. Probing every
    # few seconds (the wait never doubled) costs a few refusals each time: 86 in the
    # model, 54 with the wait doubled up to 16 s, 36 since a ceiling a probe's burst
    # left a little above the limit is lowered at its second refusal under it (not
    # its tenth). (What is left: after a long wait the provider's bucket is full, and
    # a probe it lets through can look like a raised limit.)
    every_time = replace(MEASURED, probe_after_max_s=MEASURED.probe_after_s)
    _, _, ok_fixed, refused_fixed = follow(learned_at(20.0, 0.0), 0.5, 120.0, 20.0, every_time)
    _, rates, ok, refused = follow(learned_at(20.0, 0.0), 0.5, 120.0, 20.0, MEASURED)
    assert refused < 0.75 * refused_fixed, (refused, refused_fixed)
    assert ok >= 0.95 * ok_fixed and min(rates[10:]) >= 0.8 * 20.0, rates


def test_a_probe_that_finds_room_probes_again_soon() -> None:
    probing = AimdState(
        rate=30.0, ceiling=20.0, changed_at=0.0, ok_since_change=30, probe_wait_s=8.0
    )
    # Refused at 30 after 1.2 s at about 21.7 a second: no more room than before.
    same = on_throttled(replace(probing, ok_since_change=26), 1.2, None, MEASURED)
    assert same.ceiling is not None and same.ceiling < 22.0 and same.probe_wait_s == 16.0
    # Doubled up to its cap.
    capped = replace(probing, ok_since_change=26, probe_wait_s=16.0)
    assert on_throttled(capped, 1.2, None, MEASURED).probe_wait_s == 16.0
    # At 27.5 a second: the limit rose, the next probe comes after the first wait.
    higher = on_throttled(replace(probing, ok_since_change=33), 1.2, None, MEASURED)
    assert higher.ceiling == 27.5 and higher.probe_wait_s == 0.0
    # A 429 while not above the ceiling (a second cut on the way down) keeps the wait.
    under = replace(probing, rate=19.0, ceiling=20.0)
    assert on_throttled(under, 1.2, None, MEASURED).probe_wait_s == 8.0


def test_after_a_gap_the_rate_restarts_from_what_last_flowed_if_that_was_less() -> None:
    # Slow start had raised the rate to 171 while the run's calls flowed at 100 a
    # second (no 429: the limit was never met). Half of 171 would meet a lower limit
    # at 85 a second; half of what flowed is 50.
    state = AimdState(rate=171.0, changed_at=0.0, ok_since_change=500, last_answer_at=5.0)
    restarted = aged(state, 30.0, MEASURED)
    assert restarted is not None and restarted.rate == 50.0
    # A window too short to say restarts from the rate.
    short = aged(replace(state, ok_since_change=5, changed_at=4.9), 30.0, MEASURED)
    assert short is not None and short.rate == 171.0 * MEASURED.idle_restart_fraction


# --- a provider's burst hides its limit from slow start --------------------------


def test_slow_starts_first_429_after_every_call_was_taken_halves_the_rate() -> None:
    # Bench idle-drop: slow start doubled to 101.66 req/s on 27 calls taken in 0.51 s
    # (the provider's bucket had filled while idle), and the limit was 20. Everything
    # sent was taken until this 429: its burst paid, and 101.66 says nothing of it.
    state = AimdState(rate=101.66, changed_at=0.0, ok_since_change=52)
    cut = on_throttled(state, 0.51, None, MEASURED)
    assert cut.rate == 101.66 * MEASURED.decrease_factor and cut.ceiling is None
    # Past slow start (a probe at 1.5 x the flow), meeting it right at the rate is
    # still where the limit is.
    probing = replace(state, slow_start=False)
    held = on_throttled(probing, 0.51, None, MEASURED)
    assert held.ceiling == 101.66 and held.rate == 101.66 * MEASURED.headroom


def test_a_climb_that_restarts_after_an_idle_spell_takes_no_step_in_its_first_second() -> None:
    # Aged after a gap (the answer at 40 s finds the state of 10 s), the rate restarts
    # at half and holds it for `restart_hold_s` while the provider's refilled bucket
    # takes everything: every call taken in that time is no reason to double.
    state = learned_at(100.0, 10.0)
    aged_at_40 = decide_counts(state, 5, 0, 40.0, MEASURED)
    assert aged_at_40.rate == state.rate * MEASURED.idle_restart_fraction
    held, rates = succeed(aged_at_40, 40.05, MEASURED.restart_hold_s - 0.1, 48.5, MEASURED)
    assert max(rates) == aged_at_40.rate
    # Then slow start doubles as before.
    after, rates = succeed(held, 40.0 + MEASURED.restart_hold_s, 1.0, 48.5, MEASURED)
    assert max(rates) > 1.5 * aged_at_40.rate
    # A state aged by the workers' loop before any call (its window empty; the row
    # then forgets its last answer) holds from its first answer, not from when it aged.
    by_loop = aged(state, 12.0, MEASURED)
    assert by_loop is not None
    by_loop = replace(by_loop, last_answer_at=None)
    first = on_success(by_loop, 40.0, MEASURED)
    assert first.hold_until == 40.0 + MEASURED.restart_hold_s
    # So does a first climb whose calls stopped for a while and came back.
    lull = AimdState(rate=48.5, changed_at=12.0, last_answer_at=11.5)
    assert on_success(lull, 40.0, MEASURED).hold_until == 40.0 + MEASURED.restart_hold_s
    # Once a 429 was met, a window restarting after a lull does not hold.
    cut = replace(lull, last_decrease_at=5.0, slow_start=False, ceiling=50.0)
    assert on_success(cut, 40.0, MEASURED).hold_until == 0.0


def test_a_providers_first_climb_does_not_hold_its_initial_rate() -> None:
    # Never answered, never aged: its initial rate is no learned rate a refilled
    # burst could hide above the limit, so slow start doubles after its first
    # interval, as it does from a rate it already climbed to.
    fresh = AimdState(rate=10.0, changed_at=0.0)
    state, rates = succeed(fresh, 1.0, 1.0, 10, MEASURED)
    assert state.hold_until == 0.0
    assert max(rates) == 10.0 * MEASURED.slow_start_factor


def test_slow_starts_first_429_while_fewer_calls_came_than_the_rate_does_not_halve() -> None:
    # Bench, tokens per window of 100 calls a second: the token clock paced the calls
    # at 100 while slow start had the request rate at 144; the first 429 halved it to
    # 72, under what the provider took, for three seconds. Fewer calls than the rate
    # came: no burst paid at the rate, and what flowed is about the limit.
    state = AimdState(rate=144.0, changed_at=0.0, ok_since_change=100)
    cut = on_throttled(state, 1.0, None, MEASURED)
    assert cut.rate == pytest.approx(100 * MEASURED.headroom) and cut.ceiling == 100.0
