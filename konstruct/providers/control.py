"""Decisions about a provider's rate and health, as pure functions of its state.

Two pieces, both shared by every worker through PostgreSQL
(`konstruct/providers/store.py` reads and writes them):

- the adaptive rate (AIMD): a 429 cuts the rate (at most once per
  `decrease_window_s`, so a burst of 429s counts once). When calls came at
  about the rate since the last change, the provider's ceiling is what it
  accepted and the rate goes just under it; when the window was too short or
  far fewer calls came (a burst after a pause, a late retry), the rate goes
  back under the known ceiling, which stays; with no ceiling known it is
  halved (`decrease_factor`). Successes raise it additively, at most once per
  `increase_interval_s`, first straight back to just under the learned
  ceiling, then in growing steps that probe above it.
  The rate is what the Temporal server dispatches from the provider's task
  queue per second.
- the circuit breaker: `closed` until `threshold` consecutive failures, then
  `open` for `cooldown_s`, then `half_open`: one probe call is let through,
  whose outcome closes or re-opens it.

Times are seconds on the database's clock, so workers on different machines agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

if TYPE_CHECKING:
    from konstruct.providers.router import RateLimits

BreakerStatus = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class AimdConfig:
    """The adaptive rate's knobs. `ExperimentSettings` inherits these fields, so each
    is also a flat `experiments.<name>` setting; the bounds are checked there."""

    # Used when the router config has no `model_info.min_rps` / `max_rps`.
    min_rps: Annotated[float, Field(gt=0)] = 0.5
    max_rps: Annotated[float, Field(gt=0)] = 1000.0
    # Multiplicative decrease on a 429, at most once per `decrease_window_s`.
    decrease_factor: Annotated[float, Field(gt=0, lt=1)] = 0.5
    decrease_window_s: Annotated[float, Field(gt=0)] = 0.5
    # After a 429 the rate is never set below the provider's measured accepted
    # rate times `headroom` (set false for plain halving).
    decrease_to_measured: bool = True
    headroom: Annotated[float, Field(gt=0, le=1)] = 0.97
    # Additive increase, at most once per `increase_interval_s`: the first step
    # is `increase_step_fraction` of the rate (at least `increase_step_min_rps`),
    # each further step without a 429 is `increase_step_growth` times the last.
    increase_interval_s: Annotated[float, Field(gt=0)] = 1.0
    increase_step_fraction: Annotated[float, Field(gt=0)] = 0.05
    increase_step_min_rps: Annotated[float, Field(gt=0)] = 0.5
    increase_step_growth: Annotated[float, Field(ge=1)] = 2.0
    # Seconds at the learned ceiling before probing above it again. Each probe that
    # finds no ceiling more than `probe_same_ceiling` above the old doubles the wait,
    # up to `probe_after_max_s`; a ceiling found higher starts it again: a steady limit
    # costs a probe's few 429s every 16 s instead of every 5 (the pure model of
    # tests/test_rate_limit.py, two minutes at a steady 20 req/s: 86 refusals -> 54).
    probe_after_s: Annotated[float, Field(ge=0)] = 2.0
    probe_after_max_s: Annotated[float, Field(ge=0)] = 16.0
    probe_same_ceiling: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # The accepted rate is only measured over at least this long, and a 429 only
    # moves the ceiling when at least `min_measure_ok` successes were counted.
    min_measure_s: Annotated[float, Field(gt=0)] = 0.5
    min_measure_ok: Annotated[int, Field(ge=1)] = 10
    # ... and only when calls were answered at this share of the rate or more
    # (fewer, and the queue ran short: the provider was not what held them back).
    min_offered: Annotated[float, Field(gt=0, le=1)] = 0.9
    # ... or when at least this share of the calls answered was refused: refused
    # calls wait out their Retry-After, so the queue runs short because of the
    # provider itself, and what it accepted is its limit.
    min_refused_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # ... or when at least this many calls were refused since the last change: one
    # burst at the edge refuses a few, a limit that fell keeps refusing (a loaded
    # worker answers fewer calls, so the share alone can stay under its bound).
    min_refused_calls: Annotated[int, Field(ge=1)] = 10
    # A rate already under the learned ceiling refused this many times in one
    # window, while calls came at about the rate and the provider took less than
    # it: the ceiling is too high (a probe that met a full bucket measured its burst
    # too), and it goes to what the provider took. Before, a ceiling 6 % above a
    # steady limit of 20 req/s leaked a 429 every 1.6 s until `min_refused_calls`.
    refusals_under_ceiling: Annotated[int, Field(ge=1)] = 2
    # Successes raise the rate only while they use at least this share of it,
    # and a probing step goes at most this factor above the measured rate.
    min_utilisation: Annotated[float, Field(gt=0, le=1)] = 0.75
    probe_cap: Annotated[float, Field(ge=1)] = 1.5
    # Above a learned ceiling a step goes at most this factor above the measured
    # rate; successes beyond `ceiling_rise` x the ceiling mean the limit rose.
    probe_cap_above_ceiling: Annotated[float, Field(ge=1)] = 1.2
    ceiling_rise: Annotated[float, Field(gt=1)] = 1.3
    # Slow start: until the first 429 (and again once the limit is seen to rise), the
    # rate may grow `slow_start_factor` times what flows every `slow_start_interval_s`,
    # as TCP's window doubles per round trip: from 10 req/s a provider's 200 is
    # reached in about three seconds instead of ten.
    slow_start_factor: Annotated[float, Field(ge=1)] = 2.0
    slow_start_interval_s: Annotated[float, Field(gt=0)] = 0.5
    # What was learned ages: once no answer came for `idle_reset_s` (and at least
    # `idle_reset_intervals` intervals of the rate), whatever kept the calls away (an
    # empty queue, a pause, a stop, a restart, an open breaker), the provider's limit
    # may have moved (a tier upgrade, a key shared with others). The next answer
    # starts a new window and the rate climbs from where it was as at the start (slow
    # start, learned ceiling forgotten): a raised limit is found in a few doublings,
    # a lowered one is cut at its first 429s as a first climb's is.
    idle_reset_s: Annotated[float, Field(gt=0)] = 2.0
    idle_reset_intervals: Annotated[float, Field(gt=0)] = 4.0
    # After such a gap the rate restarts at this fraction of where it was (or of
    # what flowed in its last window, when that was less: a rate slow start raised
    # past what the provider ever took is no starting point), and slow start doubles
    # it from there: the first second after a gap went out at the old rate, so a
    # limit lowered while idle met it whole (bench idle-drop: 6.8 % 429s, about 23
    # refusals on the way down; the pure model in tests/test_rate_limit.py counts 23
    # at 1.0 and 6 at 0.5). A raised limit is found one doubling later.
    idle_restart_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    # A climb that restarts after an idle spell (its state aged, or its calls
    # stopped for a while before any 429) takes no step for this long: the
    # provider's bucket filled while idle, and its burst takes every call of the
    # first moments whatever the limit. Doubled on that, the rate met a limit
    # lowered to 20 at 101 req/s (bench idle-drop: 27 of 27 taken in the first
    # 0.5 s at 51 req/s). A provider's first climb, from its initial rate, does not
    # hold (see `_restarted`).
    restart_hold_s: Annotated[float, Field(ge=0)] = 1.0


@dataclass(frozen=True)
class AimdState:
    rate: float
    # The provider's accepted rate measured at the last 429 (None: never throttled).
    ceiling: float | None = None
    # When the rate last changed, and the successes counted since then.
    changed_at: float = 0.0
    ok_since_change: int = 0
    throttled_since_change: int = 0
    last_decrease_at: float | None = None
    # No increase before this (the provider's Retry-After, or the probe pause).
    hold_until: float = 0.0
    # The next additive step; grows while increases meet no 429, reset by one.
    step: float = 0.0
    # Slow start: no 429 since the start (or since the limit was seen to rise).
    # Ends at the first 429, learned or not, as TCP's does at the first loss:
    # doubling again after every 429 would make a sawtooth of refusals.
    slow_start: bool = True
    # When the provider last answered (a success or a 429); None: not known, or
    # what was learned already aged since.
    last_answer_at: float | None = None
    # Seconds at the learned ceiling before the next probe above it (0: not yet
    # doubled, `probe_after_s`).
    probe_wait_s: float = 0.0


def _clamp(rate: float, config: AimdConfig) -> float:
    return min(config.max_rps, max(config.min_rps, rate))


def _first_step(rate: float, config: AimdConfig) -> float:
    return max(config.increase_step_min_rps, rate * config.increase_step_fraction)


def _new_window(
    rate: float,
    ceiling: float | None,
    now: float,
    *,
    last_decrease_at: float | None,
    hold_until: float,
    step: float,
    slow_start: bool,
    probe_wait_s: float = 0.0,
) -> AimdState:
    """A changed rate: the counts start again from `now`."""
    window = AimdState(rate, ceiling, changed_at=now)
    return replace(
        window,
        last_decrease_at=last_decrease_at,
        hold_until=hold_until,
        step=step,
        slow_start=slow_start,
        probe_wait_s=probe_wait_s,
    )


def probe_wait(state: AimdState, config: AimdConfig) -> float:
    """Seconds at the learned ceiling before probing above it."""
    return state.probe_wait_s or config.probe_after_s


def _next_probe_wait(state: AimdState, ceiling: float | None, config: AimdConfig) -> float:
    """The wait before the next probe once a 429 set `ceiling`: the first again when
    no ceiling is known or the new one is well above the old (the probe found room);
    doubled when a probe above the old ceiling found no more; else as it was (a
    second cut on the same way down)."""
    if ceiling is None or state.ceiling is None:
        return 0.0
    if ceiling > state.ceiling * (1.0 + config.probe_same_ceiling):
        return 0.0
    if state.rate > state.ceiling:
        return min(config.probe_after_max_s, 2.0 * probe_wait(state, config))
    return state.probe_wait_s


def measured_rate(state: AimdState, now: float, config: AimdConfig) -> float | None:
    """Successes per second since the last change, if measured over long enough."""
    elapsed = now - state.changed_at
    if elapsed < config.min_measure_s or state.ok_since_change <= 0:
        return None
    return state.ok_since_change / elapsed


def offered_rate(state: AimdState, now: float) -> float:
    """Calls per second answered, accepted or refused, since the last change."""
    elapsed = max(1e-9, now - state.changed_at)
    return (state.ok_since_change + state.throttled_since_change) / elapsed


def on_throttled(
    state: AimdState,
    now: float,
    retry_after_s: float | None,
    config: AimdConfig,
    sent_at: float | None = None,
) -> AimdState:
    """A 429: count it, and decrease unless the last decrease already answered it.

    `sent_at`: when the refused request was sent, if known. One sent before the
    last decrease went out at the old rate, which that decrease already cut.
    """
    counted = replace(state, throttled_since_change=state.throttled_since_change + 1)
    if state.last_decrease_at is not None and (
        now - state.last_decrease_at < config.decrease_window_s
        or (sent_at is not None and sent_at < state.last_decrease_at)
    ):
        return counted
    measured = measured_rate(counted, now, config)
    if state.ceiling is not None and counted.ok_since_change < config.min_measure_ok:
        measured = None  # a handful of calls measures noise, not a move of the ceiling
    answered = counted.ok_since_change + counted.throttled_since_change
    offered = offered_rate(counted, now) >= config.min_offered * state.rate
    starved = (
        counted.throttled_since_change >= config.min_refused_share * answered
        or counted.throttled_since_change >= config.min_refused_calls
    )
    saturated = measured is not None and (offered or starved)
    ceiling: float | None
    if not config.decrease_to_measured:
        ceiling = measured if measured is not None else state.rate
        rate = state.rate * config.decrease_factor
    elif (
        state.slow_start and state.ceiling is None and state.throttled_since_change == 0 and offered
    ):
        # Slow start's first 429, every call before it taken at the rate: what the
        # provider took came out of its bucket's burst (full after an idle spell), not
        # its limit (a limit lowered to 20 while idle, met at 52 req/s: 29 of 29
        # taken, then 17 of 28 refused at 51 when that was taken as the ceiling).
        # Halve, as TCP does at slow start's first loss; the next 429 measures the
        # limit, the burst spent. Not when fewer calls came than the rate (something
        # else paced them, say the provider's announced token limit): halving then
        # went under what flowed (a tokens-per-window limit of 100 calls a second,
        # taken at 100 while the rate said 144, cut to 72 for three seconds).
        ceiling = None
        rate = state.rate * config.decrease_factor
    elif (
        saturated
        and measured is not None
        and measured < state.rate * config.headroom
        and (
            offered or retry_after_s is not None or measured >= state.rate * config.decrease_factor
        )
    ):
        # Calls came at about the rate (or the provider's Retry-After kept the
        # refused ones away) and the provider took only `measured` a second of them:
        # that is its ceiling now. Straight under it stops the 429s at once, where
        # halving would lose throughput or take steps.
        ceiling = measured
        rate = measured * config.headroom
    elif saturated and measured is not None and measured < state.rate * config.decrease_factor:
        # Most answers refused while calls came at well under the rate, and no
        # Retry-After: a young window that met what the last rate left in the
        # provider's bucket measures too little (a leaky bucket of 100 req/s read as
        # 16.6 at 98.9 req/s: 10 taken and 11 refused in its first 0.6 s). Halve, as
        # with nothing known; the next window measures the limit.
        ceiling = None
        rate = state.rate * config.decrease_factor
    elif state.ceiling is not None:
        # No news about the limit: too soon after a change or too few calls to
        # measure, the queue ran short, or the provider took about all that was
        # sent (a burst at the edge). Back under the known ceiling, which stays.
        ceiling = state.ceiling
        rate = min(state.rate, state.ceiling * config.headroom)
        if (
            rate == state.rate
            and saturated
            and measured is not None
            and measured < state.rate
            and counted.throttled_since_change >= config.refusals_under_ceiling
        ):
            # Refused again under the ceiling while the provider took less than the
            # rate: the ceiling was set too high. What it took is the ceiling now.
            ceiling = measured
            rate = measured * config.headroom
        elif rate == state.rate:
            # Already under it: keep measuring (a real drop shows once enough calls
            # are counted); only hold increases for the provider's Retry-After.
            return replace(
                counted,
                hold_until=max(state.hold_until, now + (retry_after_s or 0.0)),
                slow_start=False,
            )
    elif saturated:
        # The first climb met the limit right at the rate: that is the ceiling.
        ceiling = state.rate
        rate = state.rate * config.headroom
    elif (
        measured is not None
        and counted.ok_since_change >= config.min_measure_ok
        and measured * config.headroom >= state.rate * config.decrease_factor
    ):
        # Nothing known yet, and the rate ran ahead of the calls (fewer came: the
        # experiment's slots held them back): the provider refused one while taking
        # `measured` a second, about its limit. That is its ceiling now, so that the
        # next lone 429 under it cuts nothing. Halving instead, with nothing learned,
        # made a sawtooth on a leaky bucket of 100 req/s: each lone 429 halved a rate
        # that had drifted to 130-190 while 88-98 flowed, to 67-96 for 2.5 s.
        ceiling = measured
        rate = measured * config.headroom
    else:
        # Nothing known yet and too little measured to learn from (under 10
        # successes, or the provider took under half the rate): halve, but not below
        # what the provider was seen to take.
        ceiling = None
        rate = max(state.rate * config.decrease_factor, (measured or 0.0) * config.headroom)
    rate = _clamp(rate, config)
    return _new_window(
        rate,
        ceiling,
        now,
        last_decrease_at=now,
        hold_until=now + max(retry_after_s or 0.0, config.decrease_window_s),
        step=_first_step(rate, config),
        slow_start=False,
        probe_wait_s=_next_probe_wait(state, ceiling, config),
    )


def _idle_window(state: AimdState, now: float, config: AimdConfig) -> bool:
    return (
        state.ok_since_change == 0
        and state.throttled_since_change == 0
        and now - state.changed_at > config.min_measure_s
    )


def _never_answered(state: AimdState) -> bool:
    """A provider's first climb: no answer seen, and not aged (`aged` sets a hold)."""
    return state.last_answer_at is None and state.hold_until == 0.0


def _restarted(state: AimdState, now: float, config: AimdConfig) -> AimdState:
    """An idle window starting again at `now`; a climb that never met a 429 holds
    its first step for `restart_hold_s`, unless it is the provider's first: its
    initial rate is no learned rate that a refilled burst could hide above the
    limit, and at a rate under the limit the bucket stays full whether the climb
    holds or not (a row created well before its first call, at a worker's start
    say, spent its first second at its initial rate)."""
    hold = state.hold_until
    if (
        state.slow_start
        and state.ceiling is None
        and state.last_decrease_at is None
        and not _never_answered(state)
    ):
        hold = max(hold, now + config.restart_hold_s)
    return replace(state, changed_at=now, hold_until=hold)


def on_success(state: AimdState, now: float, config: AimdConfig) -> AimdState:
    """A success: count it, and raise the rate if an increase is due."""
    if _idle_window(state, now, config):
        # Nothing answered since the last change: the time before this answer says
        # nothing about the provider (the queue was empty), so the window starts now.
        return replace(_restarted(state, now, config), ok_since_change=1)
    counted = replace(state, ok_since_change=state.ok_since_change + 1)
    interval = config.slow_start_interval_s if state.slow_start else config.increase_interval_s
    if now < state.hold_until or now - state.changed_at < interval:
        return counted
    step = state.step or _first_step(state.rate, config)
    # Climbing with no ceiling known: as fast as the cap allows.
    unknown_cap = config.slow_start_factor if state.slow_start else config.probe_cap
    if state.ceiling is None:
        step = max(step, state.rate * (unknown_cap - 1))
    measured = measured_rate(counted, now, config)
    if measured is None or measured < config.min_utilisation * state.rate:
        # The rate is not what holds the calls back (too few of them): raising it
        # would only let a later burst hit the provider unchecked.
        return counted
    ceiling = state.ceiling
    slow_start = state.slow_start
    target = ceiling * config.headroom if ceiling is not None else None
    if target is not None and state.rate < target:
        # Fast recovery to just under the learned ceiling, then a pause before probing.
        rate = target
        hold_until = now + probe_wait(state, config)
        next_step = _first_step(target, config)
    else:
        since_decrease = now - (state.last_decrease_at or -1e18)
        if since_decrease < probe_wait(state, config) + config.decrease_window_s:
            # Just cut at the learned ceiling: stay there a while before probing again.
            return counted
        if (
            ceiling is not None
            and state.throttled_since_change == 0
            and measured > ceiling * config.ceiling_rise
        ):
            # The provider took well above its learned ceiling without a 429: its
            # limit rose. Forget the old one (a 429 now must not send the rate back
            # under it) and climb as at the start.
            ceiling = None
            slow_start = True
        # Never far above what actually flows: the excess would reach the provider
        # as a burst the moment demand catches up.
        cap = unknown_cap if ceiling is None else config.probe_cap_above_ceiling
        rate = min(state.rate + step, max(state.rate, measured * cap))
        hold_until = state.hold_until
        next_step = step * config.increase_step_growth
    rate = _clamp(rate, config)
    if rate == state.rate:
        return counted
    return _new_window(
        rate,
        ceiling,
        now,
        last_decrease_at=state.last_decrease_at,
        hold_until=hold_until,
        step=next_step,
        slow_start=slow_start,
        probe_wait_s=state.probe_wait_s if ceiling is not None else 0.0,
    )


def idle_gap_s(state: AimdState, config: AimdConfig) -> float:
    """How long without an answer ages what was learned, at this rate."""
    return max(config.idle_reset_s, config.idle_reset_intervals / state.rate)


def last_flow(state: AimdState, config: AimdConfig) -> float | None:
    """Successes per second over the window that ended with the last answer, if it
    was long enough and counted enough of them to say."""
    if state.last_answer_at is None or state.ok_since_change < config.min_measure_ok:
        return None
    elapsed = state.last_answer_at - state.changed_at
    return state.ok_since_change / elapsed if elapsed >= config.min_measure_s else None


def aged(state: AimdState, now: float, config: AimdConfig) -> AimdState | None:
    """The state an answer after an idle gap starts from (see `idle_reset_s`): the
    rate at `idle_restart_fraction` of where it was (or of the last window's flow,
    when less), a new window, slow start, no ceiling, no hold; None when the provider
    answered recently (or when is not known: never, or already aged)."""
    last = state.last_answer_at
    if last is None or now - last < idle_gap_s(state, config):
        return None
    flow = last_flow(state, config)
    start = state.rate if flow is None else min(state.rate, flow)
    return AimdState(
        _clamp(start * config.idle_restart_fraction, config),
        None,
        changed_at=now,
        hold_until=now + config.restart_hold_s,
        last_answer_at=last,
    )


def decide_rate(
    before: AimdState,
    throttled: bool,
    now: float,
    config: AimdConfig,
    retry_after_s: float | None = None,
    sent_at: float | None = None,
) -> AimdState:
    """The rate after one answer (a success, or a 429 when `throttled`)."""
    if throttled:
        return on_throttled(before, now, retry_after_s, config, sent_at=sent_at)
    return on_success(before, now, config)


def decide_counts(
    before: AimdState,
    ok: int,
    throttled: int,
    now: float,
    config: AimdConfig,
    retry_after_s: float | None = None,
    sent_at: float | None = None,
) -> AimdState:
    """The rate after several answers counted together (a batch's, or a second's):
    one decision, as if the last of them were a 429 when any was, else a success."""
    if throttled <= 0 and ok <= 0:
        return before
    fresh = aged(before, now, config)
    if fresh is not None:
        before = fresh
    elif _idle_window(before, now, config):
        before = _restarted(before, now, config)  # as in `on_success`
    counted = replace(
        before,
        ok_since_change=before.ok_since_change + ok - (0 if throttled > 0 else 1),
        throttled_since_change=before.throttled_since_change + max(0, throttled - 1),
    )
    return decide_rate(counted, throttled > 0, now, config, retry_after_s, sent_at)


def rate_decided(current: AimdState, decided: AimdState) -> bool:
    """Whether `decided` changes more than the counters and the time of the last
    answer (which are bumped on their own)."""

    def uncounted(state: AimdState) -> AimdState:
        return replace(state, ok_since_change=0, throttled_since_change=0, last_answer_at=None)

    return uncounted(decided) != uncounted(current)


def on_announced_limit(
    state: AimdState, limit_rps: float, now: float, config: AimdConfig
) -> AimdState:
    """The provider announced its request limit (x-ratelimit-limit-requests): the
    rate never goes above just under it (the caller clamps with `max_rps`, the limit
    x `headroom`), and while still in slow start, no 429 seen, it goes straight
    there instead of doubling its way there."""
    target = _clamp(limit_rps * config.headroom, config)
    if state.rate > limit_rps:
        rate = min(state.rate, target)
    elif state.slow_start and state.rate < target:
        rate = target
    else:
        return state
    return _new_window(
        rate,
        state.ceiling if state.ceiling is None else min(state.ceiling, limit_rps),
        now,
        last_decrease_at=state.last_decrease_at,
        hold_until=state.hold_until,
        step=_first_step(rate, config),
        slow_start=state.slow_start,
    )


@dataclass(frozen=True)
class LimitsSeen:
    """A provider's bounds as its row holds them, and the request limit its
    headers announce (per second; `announced`: the headers just moved it)."""

    min_rps: float
    max_rps: float
    # A request limit declared in the config (`rpm`): the headers then move nothing.
    declared: bool
    header_rps: float | None
    announced: bool


@dataclass(frozen=True)
class LearnedRate:
    """A rate decision to write, and what made it (for the log)."""

    decided: AimdState
    why: str


def learn_from_counts(
    counted: AimdState,
    ok: int,
    throttled: int,
    now: float,
    config: AimdConfig,
    limits: LimitsSeen,
    retry_after_s: float | None = None,
    newest_429_age_s: float | None = None,
) -> LearnedRate | None:
    """The decision of answers counted together (`counted`: the state with them
    already added) within the provider's bounds, under its announced limit unless
    the config declared one; None: it changes nothing but the counters."""
    header = None if limits.declared else limits.header_rps
    # Under an announced limit by `headroom`, not at it: at it, the calls that the
    # network brings a few milliseconds closer meet a full window (a sliding window
    # of 100 req/s, run at 100.0: 3 refused, slow start halved, 1.6 s lost).
    bounded = replace(
        config,
        min_rps=limits.min_rps,
        max_rps=limits.max_rps if header is None else min(limits.max_rps, header * config.headroom),
    )
    before = replace(
        counted,
        ok_since_change=counted.ok_since_change - ok,
        throttled_since_change=counted.throttled_since_change - throttled,
    )
    sent_at = None if newest_429_age_s is None else now - newest_429_age_s
    decided = decide_counts(
        before, ok, throttled, now, bounded, retry_after_s=retry_after_s, sent_at=sent_at
    )
    # The limit the headers just moved (None: they moved none, or a declared one wins).
    announced = header if limits.announced else None
    if announced is not None:
        decided = on_announced_limit(decided, announced, now, bounded)
    if not (limits.announced or rate_decided(counted, decided)):
        return None
    why = (
        "the provider's announced limit"
        if announced is not None
        else "a 429"
        if throttled
        else "successes"
    )
    return LearnedRate(decided, why)


@dataclass(frozen=True)
class ProviderBounds:
    """A provider's rate bounds and token rate, from its deployment's declared
    limits (`model_info`) and the settings' defaults."""

    initial_rps: float
    min_rps: float
    max_rps: float
    # Tokens a second (`tpm` / 60); None: tokens are not metered unless the
    # provider's headers announce a limit.
    token_rate: float | None = None
    limit_window_s: float = 60.0
    # Requests a second declared (`rpm` / 60): the provider's headers then move
    # nothing (a header's window is an assumption, the config is what is known).
    declared_rps: float | None = None


def declared_bounds(
    limits: RateLimits, config: AimdConfig, default_initial_rps: float
) -> ProviderBounds:
    """A deployment's declared limits (`model_info`) as its provider's bounds.
    `rpm` caps the rate and, with no `initial_rps`, starts it just under the
    limit (`headroom`): a declared limit needs no climb to find it."""
    rpm, tpm = limits.rpm, limits.tpm
    low = limits.min_rps or config.min_rps
    high = limits.max_rps or config.max_rps
    if rpm is not None:
        high = min(high, rpm / 60)
    start = limits.initial_rps or (
        rpm / 60 * config.headroom if rpm is not None else default_initial_rps
    )
    return ProviderBounds(
        initial_rps=min(high, max(low, start)),
        min_rps=min(low, high),
        max_rps=high,
        token_rate=tpm / 60 if tpm is not None else None,
        limit_window_s=limits.limit_window_s,
        declared_rps=rpm / 60 if rpm is not None else None,
    )


# --- the shared call schedule -------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """Call slots granted from a provider's schedule (`konstruct.providers.store.
    reserve_calls`): `granted` calls, the first `first_in_s` from now and each next
    `interval_s` later; none granted: ask again in `retry_in_s`."""

    granted: int
    first_in_s: float = 0.0
    interval_s: float = 0.0
    retry_in_s: float = 0.0
    # Tokens are metered: each granted call booked the tokens asked for, and its
    # answer settles the difference (`OutcomeCounts.token_excess`).
    metered: bool = False


# --- circuit breaker ----------------------------------------------------------


@dataclass(frozen=True)
class BreakerConfig:
    threshold: int = 5
    cooldown_s: float = 30.0
    # A half-open probe that never reported back (its worker died) is given up
    # after this long, and another call may probe.
    probe_timeout_s: float = 130.0


@dataclass(frozen=True)
class BreakerState:
    status: BreakerStatus = "closed"
    consecutive_failures: int = 0
    opened_at: float | None = None
    probe_started_at: float | None = None
    trips: int = 0


@dataclass(frozen=True)
class Admission:
    """What a call may do now: go ahead, go ahead as the half-open probe, or wait."""

    allowed: bool
    probe: bool = False
    retry_in_s: float = 0.0
    reason: str = ""


def admit(state: BreakerState, now: float, config: BreakerConfig) -> Admission:
    if state.status == "closed":
        return Admission(allowed=True)
    opened_at = state.opened_at or now
    if state.status == "open":
        remaining = opened_at + config.cooldown_s - now
        if remaining > 0:
            return Admission(
                allowed=False,
                retry_in_s=remaining,
                reason=f"circuit open after {state.consecutive_failures} consecutive failures",
            )
        return Admission(allowed=True, probe=True)
    # half_open: one probe at a time.
    started = state.probe_started_at
    if started is None or now - started >= config.probe_timeout_s:
        return Admission(allowed=True, probe=True)
    return Admission(
        allowed=False,
        retry_in_s=min(config.cooldown_s, max(1.0, config.probe_timeout_s - (now - started))),
        reason="circuit half-open: a probe call is testing the provider",
    )


def claim_probe(state: BreakerState, now: float) -> BreakerState:
    return replace(state, status="half_open", probe_started_at=now)


def record_success(state: BreakerState) -> BreakerState:
    if state.status == "closed" and state.consecutive_failures == 0:
        return state
    return replace(
        state, status="closed", consecutive_failures=0, opened_at=None, probe_started_at=None
    )


def record_failure(state: BreakerState, now: float, config: BreakerConfig) -> BreakerState:
    failures = state.consecutive_failures + 1
    if state.status == "half_open" or (state.status == "closed" and failures >= config.threshold):
        return BreakerState(
            status="open",
            consecutive_failures=failures,
            opened_at=now,
            probe_started_at=None,
            trips=state.trips + 1,
        )
    return replace(state, consecutive_failures=failures)
