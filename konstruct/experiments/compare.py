"""Comparing two experiments item by item, and the per-eval figures and timeline of
one experiment for its report: pure functions, no I/O.

`konstruct experiments compare` and `konstruct experiments report` read an
experiment with `konstruct.experiments.store.analysis.load_experiment` and hand it here;
the rules for scores, passes, epochs and intervals are `konstruct.experiments.statistics`'.

- Two experiments are paired by item id; an eval is compared over the items
  that both have scored (`paired`).
- The difference of means B - A has a paired bootstrap confidence interval:
  the paired differences are resampled with replacement, the percentile
  interval of the resampled means is reported (`statistics.paired_bootstrap`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from konstruct.experiments.records import ExperimentData, ItemResult, RetrySecond
from konstruct.experiments.statistics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    by_dataset_item,
    mean,
    paired_bootstrap,
    pass_rate,
    passed,
    percentile,
    score_of,
    standard_error,
)


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
    # item's mean over its epochs, `statistics.passed_at_least_half_of_epochs`).
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
    return _r(pass_rate(flags))


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


def paired_units(runs: list[ExperimentData]) -> tuple[list[ExperimentData], bool]:
    """The runs as they are paired, and whether any ran epochs: then each run's items
    become its dataset items, scored by their mean over their epochs."""
    epochs = any(i.epoch > 1 for r in runs for i in r.items)
    if not epochs:
        return runs, False
    return [dataclasses.replace(r, items=by_dataset_item(r.items)) for r in runs], True


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
    items, each scored by its mean over its epochs and passing by
    `passed_at_least_half_of_epochs`. The sides' counts and the operations
    still cover every result (each epoch's calls, latency and cost).
    """
    whole_a, whole_b = a, b
    (a, b), epochs = paired_units([a, b])
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
