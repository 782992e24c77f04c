"""Comparing two experiments and summarising one: pure functions, no I/O.

`konstruct experiments compare` and `konstruct experiments report` read an
experiment with `konstruct.experiments.store.analysis.load_experiment` and hand it here.

- An item *passes* an eval when its stored score entry says `"passed": true`
  (every eval of `konstruct.experiments.evals` stores it: the binary evals pass at 1.0, an
  `llm_judge` at its `pass_threshold`). An entry without the flag passes at a
  score of 0.5 or more (`DEFAULT_PASS_AT`).
- An item is *scored* for an eval when its result is `ok` and the entry has a
  numeric score; a failed or pending item has no score (it is not a 0).
- Two experiments are paired by item id; an eval is compared over the items
  that both have scored (`paired`).
- The difference of means B - A has a paired bootstrap confidence interval:
  the paired differences are resampled with replacement, the percentile
  interval of the resampled means is reported. It uses `random.Random(seed)`
  only, so a seed gives the same interval on every machine and Python version.

Percentiles interpolate linearly between order statistics, as PostgreSQL's
`percentile_cont` (the experiment summary's latency) and numpy's default do.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

DEFAULT_PASS_AT = 0.5
DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
# Multinomial resampling (see `bootstrap_mean_ci`) when the distinct values are
# at most this share of the sample: one binomial draw costs about as much as
# drawing this many items one by one.
_MULTINOMIAL_FACTOR = 25


# --- what the store reads ------------------------------------------------------------


@dataclass(frozen=True)
class EvalInfo:
    """One eval of an experiment's spec."""

    name: str
    kind: str
    # llm_judge only: the score at or above which an item passes.
    pass_threshold: float | None = None


@dataclass(frozen=True)
class ItemResult:
    """One dataset item with its result (status `pending`: no result yet)."""

    item_id: str
    seq: int
    status: str
    input: str = ""
    expected: Any = None
    output: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The Temporal attempt of the call that stored the result (1: first try).
    attempt: int | None = None
    error_kind: str | None = None
    error: str | None = None
    model: str | None = None
    provider: str | None = None
    # When the result was stored, in seconds after the experiment was created.
    finished_s: float | None = None
    # The task call's cost plus its judges' (None: unknown, or not stored at all).
    cost_usd: float | None = None
    # The output came from the output cache (None: not stored).
    cached: bool | None = None
    # The dataset's id of the item and which run of it this is (epochs, from 1).
    dataset_id: str = ""
    epoch: int = 1


@dataclass(frozen=True)
class RetrySecond:
    """The 429s and failed provider calls counted in one second of the experiment."""

    # Seconds after the experiment was created.
    at_s: float
    throttled: int = 0
    call_failures: int = 0


@dataclass(frozen=True)
class ExperimentData:
    experiment_id: str
    tenant_id: str
    name: str
    status: str
    total: int
    evals: list[EvalInfo]
    items: list[ItemResult]
    created_at: str = ""
    completed_at: str | None = None
    # From creation to completion (or to the last stored result).
    duration_s: float | None = None
    # 429s and failed provider calls counted by the calls (experiment totals).
    throttled: int = 0
    call_failures: int = 0
    # The results carry a `cost_usd` column.
    has_cost: bool = False
    # 429s and failed provider calls per second, as they happened (None: stored
    # before migration 011, when only the totals were kept).
    retry_seconds: list[RetrySecond] | None = None

    def eval_names(self) -> list[str]:
        """The spec's evals, then any other eval found in the stored scores."""
        names = [e.name for e in self.evals]
        extra = sorted({n for i in self.items for n in i.scores if n not in names})
        return names + extra

    def eval_kind(self, name: str) -> str:
        return next((e.kind for e in self.evals if e.name == name), "unknown")


# --- scores, pass/fail -----------------------------------------------------------------


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


# --- statistics ------------------------------------------------------------------------


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


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


# --- compare ---------------------------------------------------------------------------


class Side(BaseModel):
    experiment_id: str
    name: str
    status: str
    total: int
    ok: int
    failed: int
    pending: int


class Flips(BaseModel):
    # Item ids in dataset order (of experiment A).
    pass_to_fail: list[str]
    fail_to_pass: list[str]


class EvalComparison(BaseModel):
    name: str
    kind: str
    # Shared items scored in both; shared items without a score in A, in B.
    paired: int
    unscored_a: int
    unscored_b: int
    mean_a: float | None
    mean_b: float | None
    # mean_b - mean_a over the paired items, with its bootstrap interval.
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    # The interval lies entirely above or below 0.
    excludes_zero: bool
    pass_rate_a: float | None
    pass_rate_b: float | None
    flips: Flips


class Operations(BaseModel):
    """What an experiment's calls cost: over all of its results, not only shared ones."""

    latency_p50_ms: float | None
    latency_p95_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # None: the results carry no cost. Results whose price is unknown count 0
    # and are counted in `cost_unknown`.
    cost_usd: float | None
    cost_unknown: int
    duration_s: float | None
    throttled: int
    call_failures: int


class Method(BaseModel):
    resamples: int
    seed: int
    confidence: float
    passed: str = (
        "the stored `passed` flag of the eval's score; an entry without one passes at score >= 0.5"
    )
    # `item_id`, or `dataset_item` when either experiment ran epochs (each dataset
    # item's mean over its epochs, passed when at least half of them passed).
    paired_by: str = "item_id"


class ItemCounts(BaseModel):
    shared: int
    only_a: int
    only_b: int


class Comparison(BaseModel):
    """`konstruct experiments compare A B --json` (shape in docs/reports.md)."""

    a: Side
    b: Side
    items: ItemCounts
    method: Method
    evals: list[EvalComparison]
    evals_only_a: list[str]
    evals_only_b: list[str]
    operations: dict[str, Operations]


def side(exp: ExperimentData) -> Side:
    by_status = Counter(i.status for i in exp.items)
    return Side(
        experiment_id=exp.experiment_id,
        name=exp.name,
        status=exp.status,
        total=exp.total,
        ok=by_status["ok"],
        failed=by_status["failed"],
        pending=by_status["pending"],
    )


def operations(exp: ExperimentData) -> Operations:
    latencies = [i.latency_ms for i in exp.items if i.latency_ms is not None]
    prompt = sum(i.prompt_tokens for i in exp.items)
    completion = sum(i.completion_tokens for i in exp.items)
    cost = (
        _r(math.fsum(i.cost_usd for i in exp.items if i.cost_usd is not None), 8)
        if exp.has_cost
        else None
    )
    unknown = (
        sum(1 for i in exp.items if i.status == "ok" and i.cost_usd is None) if exp.has_cost else 0
    )
    return Operations(
        latency_p50_ms=_r(percentile(latencies, 50), 1),
        latency_p95_ms=_r(percentile(latencies, 95), 1),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost_usd=cost,
        cost_unknown=unknown,
        duration_s=_r(exp.duration_s, 2),
        throttled=exp.throttled,
        call_failures=exp.call_failures,
    )


def _pass_rate(flags: Sequence[bool]) -> float | None:
    return _r(sum(flags) / len(flags)) if flags else None


def compare_eval(
    name: str,
    kind: str,
    shared: Sequence[tuple[ItemResult, ItemResult]],
    *,
    resamples: int,
    seed: int,
    confidence: float,
) -> EvalComparison:
    """One eval over the shared (A item, B item) pairs."""
    pairs: list[tuple[float, float, bool, bool, str]] = []
    unscored_a = unscored_b = 0
    for ia, ib in shared:
        sa, sb = score_of(ia, name), score_of(ib, name)
        unscored_a += sa is None
        unscored_b += sb is None
        if sa is not None and sb is not None:
            pa, pb = passed(ia, name), passed(ib, name)
            pairs.append((sa, sb, bool(pa), bool(pb), ia.item_id))
    interval = (
        paired_bootstrap(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            resamples=resamples,
            seed=seed,
            confidence=confidence,
        )
        if pairs
        else None
    )
    low = _r(interval.low) if interval else None
    high = _r(interval.high) if interval else None
    return EvalComparison(
        name=name,
        kind=kind,
        paired=len(pairs),
        unscored_a=unscored_a,
        unscored_b=unscored_b,
        mean_a=_r(mean([p[0] for p in pairs])),
        mean_b=_r(mean([p[1] for p in pairs])),
        diff=_r(interval.estimate) if interval else None,
        ci_low=low,
        ci_high=high,
        excludes_zero=low is not None and high is not None and (low > 0 or high < 0),
        pass_rate_a=_pass_rate([p[2] for p in pairs]),
        pass_rate_b=_pass_rate([p[3] for p in pairs]),
        flips=Flips(
            pass_to_fail=[p[4] for p in pairs if p[2] and not p[3]],
            fail_to_pass=[p[4] for p in pairs if not p[2] and p[3]],
        ),
    )


def by_dataset_item(items: Sequence[ItemResult]) -> list[ItemResult]:
    """One item per dataset id: per eval the mean score over its epochs, passed when
    at least half of its scored epochs passed; `ok` when any epoch is."""
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
                    "passed": sum(passes) * 2 >= len(passes),
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


def compare(
    a: ExperimentData,
    b: ExperimentData,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """Experiment B against experiment A, item by item (see the module doc).

    When either ran its items more than once (epochs), the pairs are dataset
    items, each scored by its mean over its epochs and passing when at least
    half of its scored epochs passed. The sides' counts and the operations
    still cover every result (each epoch's calls, latency and cost).
    """
    whole_a, whole_b = a, b
    epochs = any(i.epoch > 1 for i in (*a.items, *b.items))
    if epochs:
        a = dataclasses.replace(a, items=by_dataset_item(a.items))
        b = dataclasses.replace(b, items=by_dataset_item(b.items))
    by_id_b = {i.item_id: i for i in b.items}
    ids_a = {i.item_id for i in a.items}
    shared = [
        (i, by_id_b[i.item_id])
        for i in sorted(a.items, key=lambda i: i.seq)
        if i.item_id in by_id_b
    ]
    names_a, names_b = a.eval_names(), b.eval_names()
    return Comparison(
        a=side(whole_a),
        b=side(whole_b),
        items=ItemCounts(
            shared=len(shared),
            only_a=len(ids_a) - len(shared),
            only_b=len(by_id_b) - len(shared),
        ),
        method=Method(
            resamples=resamples,
            seed=seed,
            confidence=confidence,
            paired_by="dataset_item" if epochs else "item_id",
        ),
        evals=[
            compare_eval(
                name,
                a.eval_kind(name),
                shared,
                resamples=resamples,
                seed=seed,
                confidence=confidence,
            )
            for name in names_a
            if name in names_b
        ],
        evals_only_a=[n for n in names_a if n not in names_b],
        evals_only_b=[n for n in names_b if n not in names_a],
        operations={"a": operations(whole_a), "b": operations(whole_b)},
    )


# --- one experiment (the report) ---------------------------------------------------------


class EvalStats(BaseModel):
    name: str
    kind: str
    scored: int
    mean: float | None
    standard_error: float | None
    pass_rate: float | None


def eval_stats(exp: ExperimentData) -> list[EvalStats]:
    stats = []
    for name in exp.eval_names():
        scores = [s for i in exp.items if (s := score_of(i, name)) is not None]
        flags = [bool(passed(i, name)) for i in exp.items if score_of(i, name) is not None]
        stats.append(
            EvalStats(
                name=name,
                kind=exp.eval_kind(name),
                scored=len(scores),
                mean=_r(mean(scores), 4),
                standard_error=_r(standard_error(scores), 4),
                pass_rate=_r(_pass_rate(flags), 4),
            )
        )
    return stats


_NICE_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


def bucket_width(span_s: float, target: int = 60) -> float:
    """A round bucket width that cuts `span_s` into at most about `target` buckets."""
    need = span_s / max(target, 1)
    for step in _NICE_STEPS:
        if step >= need:
            return float(step)
    return float(math.ceil(need / 3600) * 3600)


@dataclass(frozen=True)
class Bucket:
    start_s: float
    ok: int = 0
    failed: int = 0
    # Results stored after more than one attempt, and their extra attempts.
    retried_items: int = 0
    retries: int = 0
    cost_usd: float = 0.0
    # 429s and failed provider calls that happened in the bucket (when recorded).
    throttled: int = 0
    call_failures: int = 0


def timeline(
    items: Iterable[ItemResult],
    width_s: float,
    retry_seconds: Sequence[RetrySecond] = (),
) -> list[Bucket]:
    """Results by the time they were stored, and 429s and call failures by the
    time they happened, in buckets of `width_s` from 0."""
    timed = [i for i in items if i.finished_s is not None and i.status != "pending"]
    if not timed and not retry_seconds:
        return []
    last = max([0.0, *(i.finished_s or 0.0 for i in timed), *(r.at_s for r in retry_seconds)])
    count = int(last // width_s) + 1
    throttled = [0] * count
    call_failures = [0] * count
    for r in retry_seconds:
        index = min(max(int(r.at_s // width_s), 0), count - 1)
        throttled[index] += r.throttled
        call_failures[index] += r.call_failures
    ok = [0] * count
    failed = [0] * count
    retried = [0] * count
    retries = [0] * count
    cost = [0.0] * count
    for i in timed:
        index = min(max(int((i.finished_s or 0.0) // width_s), 0), count - 1)
        if i.status == "ok":
            ok[index] += 1
        else:
            failed[index] += 1
        extra = max((i.attempt or 1) - 1, 0)
        retried[index] += extra > 0
        retries[index] += extra
        cost[index] += i.cost_usd or 0.0
    return [
        Bucket(
            round(n * width_s, 6),
            ok[n],
            failed[n],
            retried[n],
            retries[n],
            cost[n],
            throttled[n],
            call_failures[n],
        )
        for n in range(count)
    ]
