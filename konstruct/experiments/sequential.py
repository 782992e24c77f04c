"""Deciding a comparison of two experiments as their results come in: pure functions.

`konstruct experiments compare A B --sequential` reads both experiments again and
again; each time it pairs the items both have scored, in the order the pairs
became complete, and asks whether the mean paired difference B - A is known yet.

The method is an anytime-valid confidence sequence: the two-sided normal-mixture
boundary of Howard, Ramdas, McAuliffe and Sekhon (2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Annals of Statistics) for a
sub-Gaussian sum. A paired difference of two scores in [0, 1] lies in [-1, 1], so it
is sub-Gaussian with variance proxy 1, and with S_t the sum of the first t
differences minus t times their true mean,

    P(some t has |S_t| >= sqrt((t + rho) * log((t + rho) / (rho * alpha**2)))) <= alpha

(Ville's inequality applied to the mixture of exp(l*S_t - l**2*t/2) over
l ~ N(0, 1/rho)). The interval at every t therefore covers the true mean at all
times at once with probability 1 - alpha: looking after every new pair and
stopping at the first decision keeps the error rate at alpha, where a fixed-n
interval checked repeatedly would not. `rho` tunes where the boundary is tightest;
it is set for `T0` pairs.

A decision is either that the difference is not zero (the interval excludes 0) or,
given a margin, that it is smaller than the margin either way (the interval lies
inside (-margin, margin)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from konstruct.experiments.records import ExperimentData
from konstruct.experiments.statistics import DEFAULT_CONFIDENCE, Interval, score_of

# The number of pairs at which the boundary is tightest (the mixture's rho is chosen for it).
T0 = 100

Verdict = Literal["differs", "within_margin"]


def rho_for(t0: int, alpha: float) -> float:
    """The mixture precision that makes the boundary about tightest at `t0` pairs
    (Howard et al. 2021, section 3.5, with the variance proxy 1)."""
    log_term = 2 * math.log(1 / alpha)
    return t0 / (log_term + math.log(1 + log_term))


def confidence_sequence(
    diffs: Sequence[float], confidence: float = DEFAULT_CONFIDENCE, t0: int = T0
) -> Interval:
    """The mean of `diffs` (each in [-1, 1]) with its anytime-valid interval."""
    if not diffs:
        raise ValueError("no differences yet")
    return _interval(math.fsum(diffs), len(diffs), confidence, t0)


def _interval(total: float, t: int, confidence: float, t0: int = T0) -> Interval:
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    alpha = 1 - confidence
    rho = rho_for(t0, alpha)
    radius = math.sqrt((t + rho) * math.log((t + rho) / (rho * alpha**2))) / t
    mean = total / t
    return Interval(mean, max(-1.0, mean - radius), min(1.0, mean + radius))


def verdict_of(interval: Interval, margin: float | None) -> Verdict | None:
    if interval.low > 0 or interval.high < 0:
        return "differs"
    if margin is not None and -margin < interval.low and interval.high < margin:
        return "within_margin"
    return None


@dataclass(frozen=True)
class Decision:
    eval_name: str
    # Pairs read, and the pair at which the verdict was first reached (None: not yet).
    pairs: int
    decided_at: int | None
    verdict: Verdict | None
    # The interval at the decision, else at the last pair.
    interval: Interval | None


def paired_in_order(a: ExperimentData, b: ExperimentData, eval_name: str) -> list[float]:
    """B - A for each item both scored, in the order the pairs became complete."""
    by_id = {i.item_id: i for i in b.items}
    pairs = []
    for ia in a.items:
        ib = by_id.get(ia.item_id)
        if ib is None:
            continue
        sa, sb = score_of(ia, eval_name), score_of(ib, eval_name)
        if sa is None or sb is None:
            continue
        done = max(ia.finished_s or 0.0, ib.finished_s or 0.0)
        pairs.append((done, ia.seq, sb - sa))
    return [d for _, _, d in sorted(pairs)]


def decide(
    a: ExperimentData,
    b: ExperimentData,
    eval_name: str,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    margin: float | None = None,
) -> Decision:
    """Walk the pairs in order and stop at the first verdict (every prefix is a look
    the confidence sequence allows)."""
    diffs = paired_in_order(a, b, eval_name)
    t, verdict, interval = first_verdict(diffs, confidence, margin)
    return Decision(eval_name, len(diffs), t, verdict, interval)


def first_verdict(
    diffs: Sequence[float], confidence: float = DEFAULT_CONFIDENCE, margin: float | None = None
) -> tuple[int | None, Verdict | None, Interval | None]:
    """The first number of pairs with a verdict, the verdict and its interval; else
    None, None and the interval over all of them."""
    total, interval = 0.0, None
    for t, diff in enumerate(diffs, 1):
        total += diff
        interval = _interval(total, t, confidence)
        verdict = verdict_of(interval, margin)
        if verdict is not None:
            return t, verdict, interval
    return None, None, interval
