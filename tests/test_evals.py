"""The deterministic evals, the judge parser, the dataset reader and input validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from konstruct.experiments.datasets import load_items
from konstruct.experiments.evals import parse_judge, score_local
from konstruct.experiments.models import (
    ContainsEval,
    DatasetSpec,
    ExactMatchEval,
    ExperimentInput,
    JsonSchemaEval,
    JsonValidEval,
    LlmJudgeEval,
    NumericCloseEval,
    RegexEval,
)
from konstruct.platform.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name"],
}


SCHEMA_EVAL = JsonSchemaEval.model_validate({"kind": "json_schema", "schema": PERSON})


@pytest.mark.parametrize(
    ("spec", "output", "expected", "passed"),
    [
        (ExactMatchEval(kind="exact_match"), " 42 ", "42", True),
        (ExactMatchEval(kind="exact_match"), "42.", "42", True),
        (ExactMatchEval(kind="exact_match"), "The answer is 42", "42", False),
        (ExactMatchEval(kind="exact_match", case_sensitive=True), "Paris", "paris", False),
        (ContainsEval(kind="contains"), "The answer is 42.", "42", True),
        (ContainsEval(kind="contains", value="paris"), "PARIS it is", None, True),
        (RegexEval(kind="regex", pattern=r"^\d+$"), "123", None, True),
        (RegexEval(kind="regex", pattern=r"^\d+$"), "12a", None, False),
        (NumericCloseEval(kind="numeric_close", tolerance=0.01), "It is 3.141", 3.14, True),
        (NumericCloseEval(kind="numeric_close", tolerance=0.5), "about 1,002", "1000", False),
        (NumericCloseEval(kind="numeric_close"), "no number here", "3", False),
        (NumericCloseEval(kind="numeric_close", tolerance=0.1, relative=True), "105", 100, True),
        (JsonValidEval(kind="json_valid"), '{"a": 1}', None, True),
        (JsonValidEval(kind="json_valid"), '```json\n{"a": 1}\n```', None, True),
        (JsonValidEval(kind="json_valid"), "{a: 1}", None, False),
        (SCHEMA_EVAL, '{"name": "Ada", "age": 36}', None, True),
        (SCHEMA_EVAL, '```json\n{"name": "Ada"}\n```', None, True),
        (SCHEMA_EVAL, '{"name": "Ada", "age": "36"}', None, False),
        (SCHEMA_EVAL, '{"age": 36}', None, False),
        (SCHEMA_EVAL, "Ada, 36", None, False),
    ],
)  # fmt: skip
def test_deterministic_evals(spec: Any, output: str, expected: Any, passed: bool) -> None:
    score = score_local(spec, output, expected)
    assert score.passed is passed
    assert score.score == (1.0 if passed else 0.0)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("SCORE: 0.8\nMostly right.", 0.8),
        ('{"score": 0.87, "reason": "judged against the rubric"}', 0.87),
        ("Score = 7/10", 0.7),
        ("score: 9", 0.9),
        ("PASS - the answer is correct", 1.0),
        ("FAIL: wrong number", 0.0),
        ("I cannot tell.", None),
    ],
)
def test_judge_replies_are_parsed(reply: str, score: float | None) -> None:
    judge = LlmJudgeEval(kind="llm_judge", model_group="judge", rubric="correct?")
    parsed = parse_judge(judge, reply)
    assert (parsed.score if parsed else None) == score


def base_input(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "experiment_id": "exp-1",
        "tenant_id": "demo",
        "dataset": {"path": "deploy/datasets/arithmetic.jsonl"},
        "task": {"model_group": "fast", "prompt_template": "Answer: {input}"},
        "evals": [{"kind": "exact_match"}],
    }
    body.update(overrides)
    return body


def test_the_contract_example_validates() -> None:
    parsed = ExperimentInput.model_validate(base_input(name="arith-fast", max_concurrency=20))
    assert parsed.max_concurrency == 20 and parsed.options.toggle_cooldown_s == 5.0


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"evals": [{"kind": "bleu"}]}, "evals", "unknown eval kind 'bleu'"),
        (
            {"task": {"model_group": "fast", "prompt_template": "no slot"}},
            "task.prompt_template",
            "{input}",
        ),
        ({"dataset": {}}, "dataset", "exactly one"),
        ({"max_concurrency": 0}, "max_concurrency", "greater than or equal"),
        ({"colour": "blue"}, "colour", "extra"),
        (
            {"evals": [{"kind": "regex", "pattern": "("}]},
            "evals.0.regex.pattern",
            "regular expression",
        ),
        (
            {"evals": [{"kind": "json_schema", "schema": {"type": "objekt"}}]},
            "evals.0.json_schema.schema",
            "not a valid JSON schema",
        ),
        ({"evals": [{"kind": "json_schema"}]}, "evals.0.json_schema.schema", "Field required"),
    ],
)
def test_bad_inputs_name_the_field(change: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        ExperimentInput.model_validate(base_input(**change))
    error = InvalidInput.from_validation_error("Experiment", info.value)
    assert field in error.fields
    assert words in str(info.value)


def test_arithmetic_dataset_loads() -> None:
    items = load_items(DatasetSpec(path="deploy/datasets/arithmetic.jsonl"), ROOT)
    assert len(items) == 200 and len({i.id for i in items}) == 200
    assert all("{input}" not in i.input and i.expected for i in items)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "input": "a"}\n{"id": 2, "input": \n')
    with pytest.raises(InvalidInput) as info:
        load_items(DatasetSpec(path=str(path)), tmp_path)
    assert "line 2" in str(info.value) and info.value.fields == ["dataset.path"]


def test_jsonl_line_without_input_and_repeated_ids_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "input": "a"}\n{"id": 2}\n')
    with pytest.raises(InvalidInput, match="line 2.*input"):
        load_items(DatasetSpec(path=str(path)), tmp_path)
    path.write_text('{"id": 1, "input": "a"}\n\n{"id": "1", "input": "b"}\n')
    with pytest.raises(InvalidInput, match="line 3 .*repeats id '1'"):
        load_items(DatasetSpec(path=str(path)), tmp_path)


def test_missing_dataset_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="dataset.path: file .*nope.jsonl.* does not exist"):
        load_items(DatasetSpec(path="nope.jsonl"), tmp_path)


def test_a_json_schema_failure_says_where() -> None:
    score = score_local(SCHEMA_EVAL, '{"name": 7}', None)
    assert not score.passed and score.detail == "name: 7 is not of type 'string'"


def test_a_json_schema_eval_round_trips_as_the_workflow_hands_it_on() -> None:
    body = base_input(evals=[{"kind": "json_schema", "schema": PERSON}])
    parsed = ExperimentInput.model_validate(body)
    dumped = parsed.model_dump(mode="json", exclude_none=True)
    assert dumped["evals"][0]["schema"] == PERSON
    assert ExperimentInput.model_validate(dumped) == parsed
