"""`konstruct experiments gate EXP --baseline BASE …`: whether a candidate experiment
may replace its baseline, by rules a CI job states. Pure: it reads a `Comparison`
(`konstruct.experiments.compare`) and the candidate's own figures.

Rules:
- `max_drop EVAL=X`: the candidate's mean of EVAL may fall below the baseline's by at
  most X over the items both scored (the paired difference). A larger drop fails
  only when its confidence interval lies below zero — the drop is real, not noise —
  unless the gate is `strict`, when the estimate alone decides.
- `min EVAL=V`: the candidate's mean of EVAL over all its scored items is at least V.
- `max_cost_usd N`: the candidate's calls cost at most N (an unknown cost fails).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from konstruct.experiments.compare import Comparison, EvalStats

RuleKind = Literal["max_drop", "min", "max_cost_usd"]


@dataclass(frozen=True)
class Rule:
    kind: RuleKind
    value: float
    eval_name: str | None = None

    def __str__(self) -> str:
        if self.kind == "max_cost_usd":
            return f"max-cost-usd {self.value:g}"
        return f"{self.kind.replace('_', '-')} {self.eval_name}={self.value:g}"


def parse_rule(kind: RuleKind, text: str) -> Rule:
    """`EVAL=NUMBER` as a rule of `kind`; ValueError saying what is wrong."""
    name, sep, number = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{text!r}: give EVAL=NUMBER (e.g. exact_match=0.02)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: {number!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: the number must be finite and >= 0")
    if kind == "min" and value > 1:
        raise ValueError(f"{text!r}: a mean score is between 0 and 1")
    return Rule(kind, value, name.strip())


class RuleOutcome(BaseModel):
    rule: str
    passed: bool
    # What was measured, in words (the paired difference and its interval, a mean, a cost).
    measured: str


class GateResult(BaseModel):
    """`konstruct experiments gate … --json`."""

    candidate: str
    baseline: str
    strict: bool
    passed: bool
    paired_items: int
    confidence: float
    rules: list[RuleOutcome]


def unknown_evals(rules: list[Rule], comparison: Comparison, stats: list[EvalStats]) -> list[str]:
    """The rules' evals the experiments do not both have (max-drop) or the candidate
    lacks (min): bad arguments, not failed rules."""
    shared = {e.name for e in comparison.evals}
    own = {s.name for s in stats}
    return [
        str(rule)
        for rule in rules
        if (rule.kind == "max_drop" and rule.eval_name not in shared)
        or (rule.kind == "min" and rule.eval_name not in own)
    ]


def judge(
    comparison: Comparison, stats: list[EvalStats], rules: list[Rule], strict: bool
) -> GateResult:
    """Each rule held against the candidate (`comparison.b`) and baseline (`.a`)."""
    by_name = {e.name: e for e in comparison.evals}
    own = {s.name: s for s in stats}
    level = f"{comparison.method.confidence:.0%}"
    outcomes = []
    for rule in rules:
        if rule.kind == "max_drop":
            ev = by_name[str(rule.eval_name)]
            if ev.diff is None or ev.ci_low is None or ev.ci_high is None:
                outcomes.append(RuleOutcome(rule=str(rule), passed=False, measured="no pairs"))
                continue
            too_far = ev.diff < -rule.value
            real = strict or ev.ci_high < 0
            measured = (
                f"paired difference {ev.diff:+.4f} ({level} interval {ev.ci_low:+.4f}"
                f" to {ev.ci_high:+.4f}, {ev.paired} items): "
                + (
                    "a drop beyond the limit"
                    + ("" if strict else ", and the interval lies below zero")
                    if too_far and real
                    else "a drop beyond the limit, but the interval includes zero"
                    if too_far
                    else "within the limit"
                )
            )
            outcomes.append(
                RuleOutcome(rule=str(rule), passed=not (too_far and real), measured=measured)
            )
        elif rule.kind == "min":
            stat = own[str(rule.eval_name)]
            ok = stat.mean is not None and stat.mean >= rule.value
            shown = "no score" if stat.mean is None else f"{stat.mean:.4f}"
            outcomes.append(
                RuleOutcome(
                    rule=str(rule), passed=ok, measured=f"mean {shown} over {stat.scored} items"
                )
            )
        else:
            cost = comparison.operations["b"].cost_usd
            unknown = comparison.operations["b"].cost_unknown
            ok = cost is not None and unknown == 0 and cost <= rule.value
            measured = (
                "cost unknown"
                if cost is None
                else f"${cost:.6f}" + (f" ({unknown} results without a price)" if unknown else "")
            )
            outcomes.append(RuleOutcome(rule=str(rule), passed=ok, measured=measured))
    return GateResult(
        candidate=comparison.b.experiment_id,
        baseline=comparison.a.experiment_id,
        strict=strict,
        passed=all(o.passed for o in outcomes),
        paired_items=comparison.items.shared,
        confidence=comparison.method.confidence,
        rules=outcomes,
    )


def markdown(result: GateResult) -> str:
    """The gate as a Markdown summary (a CI job summary)."""
    verdict = "passed" if result.passed else "**failed**"
    lines = [
        f"### Gate {verdict}: `{result.candidate}` against `{result.baseline}`",
        "",
        f"{result.paired_items} paired items; drops judged by their"
        f" {result.confidence:.0%} interval"
        + (" (strict: by the estimate alone)" if result.strict else "")
        + ".",
        "",
        "| rule | result | measured |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{o.rule}` | {'pass' if o.passed else '**FAIL**'} | {o.measured} |"
        for o in result.rules
    ]
    return "\n".join(lines) + "\n"
