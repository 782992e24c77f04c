"""Several experiments of one dataset side by side (a sweep's, say): pure functions.

- The items compared are those every run has (by item id; by dataset item when any
  run ran epochs, each scored by its mean over its epochs, as `compare` does).
- Per eval that every run has, each run's mean over those items it scored, with
  its percentile bootstrap interval (`statistics.bootstrap_mean_ci`); the highest
  mean is marked best (every run that ties it).
- On request, each pair's paired difference, by `compare.compare` over the items
  the two share.
"""

from __future__ import annotations

from itertools import combinations

from pydantic import BaseModel

from konstruct.experiments.compare import (
    Method,
    Operations,
    Side,
    compare,
    operations,
    paired_units,
    side,
)
from konstruct.experiments.records import ExperimentData
from konstruct.experiments.statistics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    bootstrap_mean_ci,
    score_of,
)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class Cell(BaseModel):
    """One run's figures for one eval, over the items every run has."""

    scored: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    best: bool


class MatrixEval(BaseModel):
    name: str
    kind: str
    # One cell per run, in the runs' order.
    cells: list[Cell]


class PairDifference(BaseModel):
    """Run `b`'s mean minus run `a`'s for one eval, paired over the items both have."""

    a: str
    b: str
    eval: str
    paired: int
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    excludes_zero: bool


class Matrix(BaseModel):
    """`konstruct experiments compare A B C … --json` (shape in docs/reports.md)."""

    runs: list[Side]
    # Items (dataset items when any run ran epochs) that every run has.
    shared_items: int
    method: Method
    evals: list[MatrixEval]
    # Evals that some run lacks: not in the matrix.
    evals_not_in_every_run: list[str]
    operations: dict[str, Operations]
    # Every pair (in the runs' order), when asked for; else empty.
    pairs: list[PairDifference]


def matrix(
    runs: list[ExperimentData],
    *,
    pairs: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Matrix:
    """The runs side by side (see the module doc); at least two runs."""
    if len(runs) < 2:
        raise ValueError("a matrix needs at least two experiments")
    scored_runs, epochs = paired_units(runs)
    shared = set.intersection(*({i.item_id for i in r.items} for r in scored_runs))
    names = [n for n in scored_runs[0].eval_names() if all(n in r.eval_names() for r in runs)]
    every = {n for r in runs for n in r.eval_names()}
    evals = []
    for name in names:
        cells = []
        for r in scored_runs:
            values = [
                s for i in r.items if i.item_id in shared and (s := score_of(i, name)) is not None
            ]
            interval = (
                bootstrap_mean_ci(values, resamples=resamples, seed=seed, confidence=confidence)
                if values
                else None
            )
            cells.append(
                Cell(
                    scored=len(values),
                    mean=_r(interval.estimate) if interval else None,
                    ci_low=_r(interval.low) if interval else None,
                    ci_high=_r(interval.high) if interval else None,
                    best=False,
                )
            )
        top = max((c.mean for c in cells if c.mean is not None), default=None)
        for c in cells:
            c.best = top is not None and c.mean == top
        evals.append(MatrixEval(name=name, kind=scored_runs[0].eval_kind(name), cells=cells))
    return Matrix(
        runs=[side(r) for r in runs],
        shared_items=len(shared),
        method=Method(
            resamples=resamples,
            seed=seed,
            confidence=confidence,
            paired_by="dataset_item" if epochs else "item_id",
        ),
        evals=evals,
        evals_not_in_every_run=sorted(every - set(names)),
        operations={r.experiment_id: operations(r) for r in runs},
        pairs=_pairs(runs, resamples, seed, confidence) if pairs else [],
    )


# What a pair's difference takes from `compare`'s figures for an eval.
_PAIR_FIGURES = {"paired", "diff", "ci_low", "ci_high", "excludes_zero"}


def _pairs(
    runs: list[ExperimentData], resamples: int, seed: int, confidence: float
) -> list[PairDifference]:
    found = []
    for a, b in combinations(runs, 2):
        c = compare(a, b, resamples=resamples, seed=seed, confidence=confidence)
        found += [
            PairDifference(
                a=a.experiment_id,
                b=b.experiment_id,
                eval=e.name,
                **e.model_dump(include=_PAIR_FIGURES),
            )
            for e in c.evals
        ]
    return found
