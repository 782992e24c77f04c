"""Scoring an output: the deterministic evals, and the LLM judge's prompt and parser.

Every eval returns a score in [0, 1] and whether it passed; the summary reports
the mean score and the pass rate of each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from konstruct.experiments.models import (
    ContainsEval,
    ExactMatchEval,
    JsonSchemaEval,
    JsonValidEval,
    LlmJudgeEval,
    NumericCloseEval,
    RegexEval,
)
from konstruct.providers.structured import as_json, schema_problem

_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Score:
    score: float
    passed: bool
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"score": self.score, "passed": self.passed, "detail": self.detail}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _norm(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.strip().split())
    return text if case_sensitive else text.casefold()


def _binary(ok: bool, detail: str = "") -> Score:
    return Score(1.0 if ok else 0.0, ok, detail)


def first_number(text: str) -> float | None:
    match = _NUMBER.search(text.replace("\u2212", "-"))
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def exact_match(spec: ExactMatchEval, output: str, expected: Any) -> Score:
    want = _norm(_text(expected), spec.case_sensitive)
    got = _norm(output, spec.case_sensitive)
    return _binary(got == want or got.rstrip(".") == want)


def contains(spec: ContainsEval, output: str, expected: Any) -> Score:
    needle = _norm(spec.value if spec.value is not None else _text(expected), spec.case_sensitive)
    return _binary(needle in _norm(output, spec.case_sensitive))


def regex(spec: RegexEval, output: str, expected: Any) -> Score:
    return _binary(re.search(spec.pattern, output) is not None)


def numeric_close(spec: NumericCloseEval, output: str, expected: Any) -> Score:
    want = expected if isinstance(expected, int | float) else first_number(_text(expected))
    got = first_number(output)
    if want is None or got is None:
        return _binary(False, "no number" if got is None else "expected is not a number")
    limit = spec.tolerance * abs(float(want)) if spec.relative else spec.tolerance
    return _binary(abs(got - float(want)) <= limit, f"got {got:g}, expected {float(want):g}")


def json_valid(spec: JsonValidEval, output: str, expected: Any) -> Score:
    _, problem = as_json(output)
    return _binary(problem is None, problem or "")


def json_schema(spec: JsonSchemaEval, output: str, expected: Any) -> Score:
    document, problem = as_json(output)
    if problem is not None:
        return _binary(False, f"not JSON: {problem}")
    problem = schema_problem(spec.schema_, document)
    return _binary(problem is None, (problem or "")[:200])


_SCORERS = {
    "exact_match": exact_match,
    "contains": contains,
    "regex": regex,
    "numeric_close": numeric_close,
    "json_valid": json_valid,
    "json_schema": json_schema,
}


def score_local(spec: Any, output: str, expected: Any) -> Score:
    """Score every eval that needs no model call."""
    return _SCORERS[spec.kind](spec, output, expected)  # type: ignore[no-any-return, operator]


# --- LLM judge ---------------------------------------------------------------------

JUDGE_SYSTEM = (
    "You are a strict evaluator. Grade the answer against the rubric. Reply with a line "
    "`SCORE: <number between 0 and 1>` and then one sentence of reasoning."
)


def judge_messages(
    spec: LlmJudgeEval, item_input: str, output: str, expected: Any
) -> list[dict[str, str]]:
    parts = [
        f"Rubric: {spec.rubric}",
        f"Question: {item_input}",
        f"Answer: {output}",
    ]
    if expected is not None:
        parts.append(f"Reference answer: {_text(expected)}")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n".join(parts)},
    ]


_SCORE_LINE = re.compile(
    r"score[\"']?\s*[:=]\s*([-+]?\d+(?:\.\d+)?)(\s*/\s*(\d+(?:\.\d+)?))?", re.I
)


def parse_judge(spec: LlmJudgeEval, reply: str) -> Score | None:
    """The judge's score in [0, 1], from `SCORE: x`, `{"score": x}`, `x/10` or PASS / FAIL."""
    match = _SCORE_LINE.search(reply)
    value: float | None = None
    if match:
        value = float(match.group(1))
        if match.group(3):
            value = value / float(match.group(3))
        elif value > 1:
            value = value / 10 if value <= 10 else value / 100
    else:
        upper = reply.upper()
        if re.search(r"\bPASS(ED)?\b|\bCORRECT\b", upper) and not re.search(
            r"\bFAIL(ED)?\b|\bINCORRECT\b", upper
        ):
            value = 1.0
        elif re.search(r"\bFAIL(ED)?\b|\bINCORRECT\b", upper):
            value = 0.0
    if value is None:
        return None
    value = min(1.0, max(0.0, value))
    return Score(value, value >= spec.pass_threshold, reply.strip()[:300])
