"""The rules that turn an experiment's results into figures: pass/fail, the two
epoch rules, means, standard error, percentiles and bootstrap intervals, and the
aggregation of each dataset item over its epochs. Pure functions, no I/O.

- An item *passes* an eval when its stored score entry says `"passed": true`
  (every eval of `konstruct.experiments.evals` stores it: the binary evals pass at 1.0, an
  `llm_judge` at its `pass_threshold`). An entry without the flag passes at a
  score of 0.5 or more (`DEFAULT_PASS_AT`).
- An item is *scored* for an eval when its result is `ok` and the entry has a
  numeric score; a failed or pending item has no score (it is not a 0).
- A dataset item run over several epochs passed in two senses, each with its
  own rule: `passed_any_epoch` (pass@k: the experiment's summary and
  `experiments show`) and `passed_at_least_half_of_epochs` (`experiments compare`,
  which pairs dataset items by their typical result, not their best).
- The bootstrap uses `random.Random(seed)` only, so a seed gives the same
  interval on every machine and Python version.

Percentiles interpolate linearly between order statistics, as PostgreSQL's
`percentile_cont` (the experiment summary's latency) and numpy's default do.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from konstruct.experiments.records import ItemResult

DEFAULT_PASS_AT = 0.5
DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
# Multinomial resampling (see `bootstrap_mean_ci`) when the distinct values are
# at most this share of the sample: one binomial draw costs about as much as
# drawing this many items one by one.
_MULTINOMIAL_FACTOR = 25


# --- one result: scored, passed --------------------------------------------------------


def score_of(item: ItemResult, eval_name: str) -> float | None:
    """The item's score for an eval; None unless the item is `ok` and scored."""
    if item.status != "ok":
        return None
    entry = item.scores.get(eval_name)
    if not isinstance(entry, dict):
        return None
    value = entry.get("score")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def passed(item: ItemResult, eval_name: str) -> bool | None:
    """Whether the item passed an eval (None: not scored)."""
    score = score_of(item, eval_name)
    if score is None:
        return None
    flag = item.scores[eval_name].get("passed")
    return flag if isinstance(flag, bool) else score >= DEFAULT_PASS_AT


# --- numbers ------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def pass_rate(flags: Sequence[bool]) -> float | None:
    """The share of true flags (None: no flags)."""
    return sum(flags) / len(flags) if flags else None


def standard_error(values: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    m = math.fsum(values) / n
    variance = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A Binomial(n, p) draw from `rng` in O(1) expected time.

    The algorithms of CPython 3.12's `random.binomialvariate` (which 3.11
    lacks): Devroye's geometric method for n*p < 10, else Hörmann's BTRS.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if n == 1:
        return int(rng.random() < p)
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    if n * p < 10.0:
        x = y = 0
        c = math.log2(1.0 - p)
        if not c:
            return x
        while True:
            y += math.floor(math.log2(rng.random() or 5e-324) / c) + 1
            if y > n:
                return x
            x += 1
    spq = math.sqrt(n * p * (1.0 - p))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c = n * p + 0.5
    vr = 0.92 - 4.2 / b
    alpha = (2.83 + 5.1 / b) * spq
    lpq = math.log(p / (1.0 - p))
    m = math.floor((n + 1) * p)
    h = math.lgamma(m + 1) + math.lgamma(n - m + 1)
    while True:
        u = rng.random() - 0.5
        us = 0.5 - abs(u)
        if us <= 0:
            continue
        k = math.floor((2.0 * a / us + b) * u + c)
        if k < 0 or k > n:
            continue
        v = rng.random()
        if us >= 0.07 and v <= vr:
            return k
        v *= alpha / (a / (us * us) + b)
        if v > 0 and math.log(v) <= h - math.lgamma(k + 1) - math.lgamma(n - k + 1) + (k - m) * lpq:
            return k


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def bootstrap_mean_ci(
    values: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """The mean and its percentile bootstrap interval.

    A resample's mean depends only on how often each distinct value was drawn,
    and those counts are multinomial: with few distinct values (binary evals:
    differences are -1, 0 or 1) each resample is a handful of binomial draws
    instead of n item draws, exactly the same distribution.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to resample")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    estimate = math.fsum(values) / n
    counts = Counter(values)
    if len(counts) == 1:
        return Interval(estimate, estimate, estimate)
    rng = random.Random(seed)
    means: list[float] = []
    if len(counts) * _MULTINOMIAL_FACTOR <= n:
        distinct = sorted(counts)
        weights = [counts[v] for v in distinct]
        for _ in range(resamples):
            left, mass, total = n, n, 0.0
            for value, weight in zip(distinct[:-1], weights[:-1], strict=True):
                drawn = binomial(rng, left, weight / mass) if left else 0
                total += value * drawn
                left -= drawn
                mass -= weight
            total += distinct[-1] * left
            means.append(total / n)
    else:
        pool = list(values)
        for _ in range(resamples):
            means.append(math.fsum(rng.choices(pool, k=n)) / n)
    tail = (1 - confidence) / 2 * 100
    low = percentile(means, tail)
    high = percentile(means, 100 - tail)
    assert low is not None and high is not None
    return Interval(estimate, low, high)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Mean of b - a over paired items, with its bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} and {len(b)})")
    return bootstrap_mean_ci(
        [y - x for x, y in zip(a, b, strict=True)],
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )


def histogram(values: Sequence[float], lo: float, hi: float, bins: int) -> list[int]:
    """Counts in `bins` equal bins over [lo, hi] (the last bin includes hi)."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    counts = [0] * bins
    width = (hi - lo) / bins
    for v in values:
        if v < lo or v > hi:
            continue
        index = bins - 1 if width <= 0 else min(int((v - lo) / width), bins - 1)
        counts[index] += 1
    return counts


# --- a dataset item over its epochs -----------------------------------------------------


def passed_any_epoch(flags: Iterable[bool]) -> bool:
    """pass@k: the dataset item passed when at least one of its epochs passed."""
    return any(flags)


def passed_at_least_half_of_epochs(flags: Sequence[bool]) -> bool:
    """The dataset item passed when at least half of its (scored) epochs passed."""
    return sum(flags) * 2 >= len(flags)


def by_dataset_item(items: Sequence[ItemResult]) -> list[ItemResult]:
    """One item per dataset id, for `compare`: per eval the mean score over its
    epochs, passed by `passed_at_least_half_of_epochs`; `ok` when any epoch is."""
    grouped: dict[str, list[ItemResult]] = {}
    for item in sorted(items, key=lambda i: i.seq):
        grouped.setdefault(item.dataset_id or item.item_id, []).append(item)
    merged = []
    for dataset_id, runs in grouped.items():
        done = [r for r in runs if r.status == "ok"]
        scores: dict[str, Any] = {}
        for name in sorted({n for r in done for n in r.scores}):
            values = [score_of(r, name) for r in done]
            numbers = [v for v in values if v is not None]
            if numbers:
                passes = [bool(passed(r, name)) for r in done if score_of(r, name) is not None]
                scores[name] = {
                    "score": sum(numbers) / len(numbers),
                    "passed": passed_at_least_half_of_epochs(passes),
                }
        first = runs[0]
        merged.append(
            dataclasses.replace(
                first,
                item_id=dataset_id,
                status="ok" if done else first.status,
                scores=scores,
                epoch=1,
            )
        )
    return merged


def per_dataset_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Each dataset item's scores over its epochs (`experiments show`'s item rows):
    per eval the mean and `passed_any_epoch` (pass@k), with the number of epochs
    that have a result."""
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
                "pass_at_k": passed_any_epoch(bool(v.get("passed")) for v in values),
            }
        out[dataset_id] = {"epochs": len(runs), "with_result": len(done), "scores": scores}
    return out


# --- an eval over an experiment's results (its summary) ---------------------------------


@dataclass(frozen=True)
class EvalEntry:
    """One `ok` result's entry for one eval, as the summary reads it."""

    dataset_id: str
    # None: the entry has no score (a judge that gave up).
    score: float | None
    # The stored `passed` flag (false when absent).
    passed: bool


@dataclass(frozen=True)
class EvalFigures:
    """An eval's figures over an experiment (`EvalSummary`'s)."""

    scored: int
    mean: float | None
    pass_rate: float | None
    stderr: float | None
    pass_at_k: float | None


def eval_figures(entries: Sequence[EvalEntry], epochs: int) -> EvalFigures:
    """Over every entry: the scored ones, their mean and the share passed; over the
    dataset items (each its mean over its scored epochs): the standard error of
    that mean, and with more than one epoch the share `passed_any_epoch` (pass@k)."""
    scored = [e for e in entries if e.score is not None]
    grouped: dict[str, list[EvalEntry]] = {}
    for entry in scored:
        grouped.setdefault(entry.dataset_id, []).append(entry)
    means = [
        statistics.fmean(e.score for e in runs if e.score is not None) for runs in grouped.values()
    ]
    passes = [passed_any_epoch(e.passed for e in runs) for runs in grouped.values()]
    overall = mean([e.score for e in scored if e.score is not None])
    share = pass_rate([e.passed for e in entries])
    stderr = standard_error(means)
    at_k = pass_rate(passes)
    return EvalFigures(
        scored=len(scored),
        mean=None if overall is None else round(overall, 4),
        pass_rate=None if share is None else round(share, 4),
        stderr=None if stderr is None else round(stderr, 4),
        pass_at_k=None if at_k is None or epochs == 1 else round(at_k, 4),
    )
