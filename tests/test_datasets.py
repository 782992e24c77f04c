"""Experiment datasets: JSONL, CSV and Parquet files, the column mapping, extra
fields in the template, and errors that name the file, the row and the column.

Unit tests read files only; the end-to-end tests run `Experiment` on the
session's real stack (the simulator's `fast` model answers arithmetic exactly
and echoes the first 80 characters of any other prompt).
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from temporalio.client import Client

from konstruct.app.cli import main as cli_main
from konstruct.experiments.datasets import as_text, items_digest, load_items, render_prompt
from konstruct.experiments.models import DatasetItem, DatasetSpec, ExperimentResult, TaskSpec
from konstruct.platform.errors import InvalidInput
from tests.support import ROOT, konstruct
from tests.test_experiments import experiment, invalid_input, results, start

DATASETS = ROOT / "deploy" / "datasets"
QA_MAPPING = {"input_field": "question", "expected_field": "answer"}
QA_TEMPLATE = "Context: {context} Question: {input}"


def load(path: Path, template: str | None = None, **spec: Any) -> list[DatasetItem]:
    return load_items(DatasetSpec(path=str(path), **spec), path.parent, template)


def fails(path: Path, *words: str, template: str | None = None, **spec: Any) -> InvalidInput:
    """Loading fails with an InvalidInput whose message holds every word."""
    with pytest.raises(InvalidInput) as info:
        load(path, template, **spec)
    for word in words:
        assert word in str(info.value), str(info.value)
    return info.value


def write_csv(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# --- formats and mapping ---------------------------------------------------------------


def test_the_arithmetic_examples_are_the_same_items_in_all_three_formats() -> None:
    jsonl, csv_items, parquet = (
        load(DATASETS / name)
        for name in ("arithmetic.jsonl", "arithmetic.csv", "arithmetic.parquet")
    )
    assert len(jsonl) == 200 and jsonl[0].id == "arith-001" and jsonl[0].expected == "5"
    assert csv_items == jsonl and parquet == jsonl
    assert items_digest(csv_items) == items_digest(parquet) == items_digest(jsonl)


def test_qa_context_maps_question_and_answer_and_keeps_context_as_an_extra_field() -> None:
    items = load(DATASETS / "qa_context.csv", QA_TEMPLATE, **QA_MAPPING)
    # No id column: the id is the row, the header being row 1.
    assert [i.id for i in items] == [f"row-{n}" for n in range(2, 2 + len(items))]
    first = items[0]
    assert first.input == "What is the capital of Australia?" and first.expected == "Canberra"
    assert first.metadata == {"context": "Canberra is the capital of Australia, not Sydney."}
    # Quoted cells: a comma and doubled quotes.
    assert '"Atlantic"' in items[4].metadata["context"]
    assert all(i.expected.lower() in i.metadata["context"].lower() for i in items)


def test_format_comes_from_the_extension_unless_the_spec_says(tmp_path: Path) -> None:
    lines = tmp_path / "data.json"
    lines.write_text('{"id": "a", "input": "x"}\n')
    assert [i.id for i in load(lines)] == ["a"]
    text = write_csv(tmp_path / "data.txt", "id,input", "b,y")
    fails(text, "data.txt", "'.txt'", "dataset.format")
    assert [i.id for i in load(text, format="csv")] == ["b"]
    upper = write_csv(tmp_path / "DATA.CSV", "id,input", "c,z")
    assert [i.id for i in load(upper)] == ["c"]


def test_csv_id_field_and_default_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", "qid,prompt,gold,topic", "7,hi,,greeting", "8,yo,Y,")
    items = load(path, input_field="prompt", expected_field="gold", id_field="qid")
    assert [(i.id, i.input, i.expected) for i in items] == [("7", "hi", None), ("8", "yo", "Y")]
    # An empty cell is an empty extra field, still present.
    assert items[1].metadata == {"topic": ""}
    # Without an expected column the items have no expected answer.
    bare = write_csv(tmp_path / "bare.csv", "input", "one", "two")
    assert [(i.id, i.expected) for i in load(bare)] == [("row-2", None), ("row-3", None)]


def test_parquet_values_become_text_as_the_template_shows_them(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "typed.parquet",
        {
            "q": ["What is 2 + 3?", "What is 1 + 1?"],
            "a": [5, 2],
            "score": [3.0, 2.5],
            "flag": [True, None],
            "tags": [["x", "y"], []],
        },
    )
    items = load(path, input_field="q", expected_field="a")
    assert [i.id for i in items] == ["row-1", "row-2"]
    assert [i.expected for i in items] == ["5", "2"]
    assert items[0].metadata == {"score": "3", "flag": "true", "tags": '["x", "y"]'}
    assert items[1].metadata == {"score": "2.5", "flag": "", "tags": "[]"}


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, ""), (3.0, "3"), (-0.0, "0"), (2.5, "2.5"), (7, "7"), (False, "false"), ("a", "a")],
)
def test_as_text(value: Any, text: str) -> None:
    assert as_text(value) == text


def test_jsonl_other_keys_are_extra_fields_and_a_metadata_object_joins_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.jsonl"
    rows = [
        {"id": 1, "input": "a", "expected": 3, "context": "c1", "metadata": {"topic": "t"}},
        {"input": "b", "n": 2.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load(path)
    # JSONL keeps `expected` as its JSON value, as before.
    assert (first.id, first.expected, first.metadata) == ("1", 3, {"topic": "t", "context": "c1"})
    # No id: `row-<n>`, n its line.
    assert (second.id, second.expected, second.metadata) == ("row-2", None, {"n": "2"})
    path.write_text(json.dumps({"input": "a", "topic": "u", "metadata": {"topic": "t"}}) + "\n")
    fails(path, "line 1 of x.jsonl", "column 'topic'", "metadata")


def test_inline_items_work_as_before_and_take_no_mapping() -> None:
    spec = DatasetSpec(items=[DatasetItem(id="a", input="x", metadata={"topic": "t"})])
    assert [i.id for i in load_items(spec, ROOT, "{topic}: {input}")] == ["a"]
    with pytest.raises(ValidationError, match="input_field: only for a dataset file"):
        DatasetSpec.model_validate({"items": [{"id": "a", "input": "x"}], "input_field": "q"})
    with pytest.raises(ValidationError, match="format"):
        DatasetSpec.model_validate({"path": "x.csv", "format": "xlsx"})


# --- the template ------------------------------------------------------------------------


def test_template_renders_extra_fields_in_one_pass() -> None:
    fields = {"context": "ctx {id}", "n": "3"}
    rendered = render_prompt("{context} | {input} | {id} | {{n}} | {n} | {nope}", "i1", "q", fields)
    # A value is not rendered again; `{{n}}` is literal; an unknown name stays.
    assert rendered == "ctx {id} | q | i1 | {n} | 3 | {nope}"
    assert render_prompt("Answer: {input}", "i", "What is 1 + 1?", {}) == "Answer: What is 1 + 1?"


def test_a_template_naming_no_column_is_refused_naming_it_and_the_columns() -> None:
    error = fails(
        DATASETS / "qa_context.csv",
        "task.prompt_template",
        "{contxt}",
        "available: {input}, {id}, {context}",
        template="{contxt} {input}",
        **QA_MAPPING,
    )
    assert error.fields == ["task.prompt_template"]
    fails(
        DATASETS / "qa_context.csv",
        "{question}",
        "'question' is the input column: write {input}",
        template="{question} {input}",
        **QA_MAPPING,
    )
    # The literal form passes.
    assert load(DATASETS / "qa_context.csv", "{{contxt}} {input}", **QA_MAPPING)


def test_a_template_needs_a_real_input_placeholder() -> None:
    with pytest.raises(ValidationError, match="must contain"):
        TaskSpec(model_group="fast", prompt_template="literal {{input}} only")
    assert TaskSpec(model_group="fast", prompt_template="{context}: {input}")


# --- errors: file, row, column -----------------------------------------------------------


def test_missing_input_column_lists_the_columns(tmp_path: Path) -> None:
    error = fails(
        DATASETS / "qa_context.csv",
        "qa_context.csv",
        "row 1 (the header)",
        "no column 'input'",
        "'question', 'answer', 'context'",
    )
    assert error.fields == ["dataset.input_field"]
    parquet = write_parquet(tmp_path / "p.parquet", {"q": ["x"]})
    fails(parquet, "p.parquet", "no column 'prompt'", "'q'", input_field="prompt")
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text('{"input": "a"}\n\n{"text": "b"}\n')
    fails(jsonl, "line 3 of j.jsonl", "no column 'input'", "'text'")


def test_a_renamed_expected_or_id_column_must_exist(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", "input,answer", "a,b")
    error = fails(path, "row 1", "no column 'gold'", "'input', 'answer'", expected_field="gold")
    assert error.fields == ["dataset.expected_field"]
    error = fails(path, "no column 'qid'", id_field="qid")
    assert error.fields == ["dataset.id_field"]


def test_an_empty_input_names_its_row_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", "id,question", "a,x", "b,  ")
    error = fails(
        path, "row 3 of e.csv", "column 'question'", "empty input", input_field="question"
    )
    assert error.fields == ["dataset.path"]
    parquet = write_parquet(tmp_path / "e.parquet", {"input": ["x", None]})
    fails(parquet, "row 2 of e.parquet", "column 'input'", "empty input")


def test_duplicate_ids_name_both_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "id,input", "a,x", "b,y", "a,z")
    fails(path, "row 4 of d.csv", "repeats id 'a'", "column 'id'", "first on row 2")
    parquet = write_parquet(tmp_path / "d.parquet", {"k": [1, 2, 1], "input": ["x", "y", "z"]})
    fails(
        parquet,
        "row 3 of d.parquet",
        "repeats id '1'",
        "column 'k'",
        "first on row 1",
        id_field="k",
    )


def test_a_csv_row_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "w.csv", "id,input,expected", "a,x,1", "b,y,2,extra")
    fails(path, "row 3 of w.csv", "4 fields", "header (row 1) has 3", "id, input, expected")


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path: Path) -> None:
    # A quoted cell spanning two lines, then a blank line.
    path = write_csv(tmp_path / "m.csv", "id,input", 'a,"two', 'lines"', "", "b,")
    fails(path, "row 5 of m.csv", "column 'input'")
    path = write_csv(tmp_path / "ok.csv", "input", '"two', 'lines"', "", "next")
    assert [i.id for i in load(path)] == ["row-2", "row-5"]


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "input": "a"}\n{"id": 2, "input": oops}\n')
    error = fails(path, "line 2 of bad.jsonl", "not valid JSON", "column 20")
    assert error.fields == ["dataset.path"]
    array = tmp_path / "array.json"
    array.write_text('[{"id": 1, "input": "a"}]\n')
    fails(array, "line 1 of array.json", "JSON array")


def test_a_parquet_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("id,input\na,x\n")
    fails(path, "dataset.path", "fake.parquet is not a Parquet file")


def test_missing_file_directory_empty_file_and_no_rows(tmp_path: Path) -> None:
    fails(tmp_path / "nope.csv", "dataset.path", "nope.csv", "does not exist")
    (tmp_path / "dir.csv").mkdir()
    fails(tmp_path / "dir.csv", "is a directory")
    fails(write_csv(tmp_path / "empty.csv"), "empty.csv is empty", "header row")
    fails(write_csv(tmp_path / "header.csv", "id,input"), "header.csv has no items")


def test_bytes_that_are_not_utf8_name_their_row(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"id,input\na,caf\xc3\xa9\nb,caf\xe9\n")
    fails(path, "line 3 of latin.csv", "not UTF-8")
    # A BOM (Excel's UTF-8) is not part of the first column's name.
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,input\na,x\n")
    assert [i.id for i in load(bom)] == ["a"]


def test_an_id_too_long_names_its_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "long.csv", "id,input", f"{'x' * 201},q")
    fails(path, "row 2 of long.csv", "id:", "200 characters")


# --- large files ---------------------------------------------------------------------------


def test_a_100k_row_csv_and_parquet_load_in_one_pass(tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "context"])
        writer.writerows([f"What is {i} + 1?", i + 1, "ctx"] for i in range(n))
    parquet = write_parquet(
        tmp_path / "big.parquet",
        {
            "question": [f"What is {i} + 1?" for i in range(n)],
            "answer": list(range(1, n + 1)),
            "context": ["ctx"] * n,
        },
    )
    for file in (path, parquet):
        began = time.perf_counter()
        items = load(file, QA_TEMPLATE, **QA_MAPPING)
        took = time.perf_counter() - began
        assert len(items) == n and items[-1].expected == str(n)
        # About a second on a laptop; a quadratic read would take minutes.
        assert took < 30, (file.name, took)


# --- end to end ------------------------------------------------------------------------------


async def test_an_experiment_on_a_csv_with_a_mapping_gets_its_context_in_the_prompt(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    body = experiment(
        dataset={"path": "deploy/datasets/qa_context.csv", **QA_MAPPING},
        task={"model_group": "fast", "prompt_template": QA_TEMPLATE},
        evals=[{"kind": "contains"}],
    )
    result: ExperimentResult = await (await start(client, worker, body)).result()
    summary = result.summary
    assert summary.total == 6 and summary.completed == 6 and summary.failed == 0
    assert summary.evals[0].pass_rate == 1.0
    rows = await results(app_pool, body["experiment_id"])
    assert [r["item_id"] for r in rows] == [f"row-{n}" for n in range(2, 8)]
    # The echo of the rendered prompt: the context is in it.
    assert "Context: Canberra is the capital of Australia" in rows[0]["output"]


async def test_an_experiment_on_a_parquet_with_a_mapping_scores_its_expected_column(
    client: Client, worker: str, tmp_path: Path, app_pool: asyncpg.Pool
) -> None:
    n = 30
    path = write_parquet(
        tmp_path / "sums.parquet",
        {
            "qid": list(range(100, 100 + n)),
            "question": [f"What is {i} + {i + 2}?" for i in range(n)],
            "answer": [2 * i + 2 for i in range(n)],
            "topic": ["sums"] * n,
        },
    )
    body = experiment(
        dataset={"path": str(path), "id_field": "qid", **QA_MAPPING},
        task={"model_group": "fast", "prompt_template": "({topic}) A number only: {input}"},
        evals=[{"kind": "exact_match"}, {"kind": "numeric_close"}],
    )
    result: ExperimentResult = await (await start(client, worker, body)).result()
    summary = result.summary
    assert summary.total == n and summary.completed == n
    assert [e.pass_rate for e in summary.evals] == [1.0, 1.0]
    rows = await results(app_pool, body["experiment_id"])
    assert [r["item_id"] for r in rows] == [str(100 + i) for i in range(n)]


def _bad_files(tmp_path: Path) -> list[tuple[dict[str, Any], str, list[str]]]:
    wrong = write_csv(tmp_path / "wrong.csv", "id,input", "a,x", "b,y,z")
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR0 not really")
    return [
        ({"dataset": {"path": str(wrong)}}, "dataset.path", ["row 3 of wrong.csv", "3 fields"]),
        ({"dataset": {"path": str(fake)}}, "dataset.path", ["not a Parquet file"]),
        (
            {"dataset": {"path": str(DATASETS / "qa_context.csv")}},
            "dataset.input_field",
            ["no column 'input'", "'question'"],
        ),
        (
            {
                "dataset": {"path": str(DATASETS / "qa_context.csv"), **QA_MAPPING},
                "task": {"model_group": "fast", "prompt_template": "{ctx} {input}"},
            },
            "task.prompt_template",
            ["{ctx}", "{context}"],
        ),
    ]


async def test_a_bad_dataset_fails_the_experiment_at_once_naming_row_and_column(
    client: Client, worker: str, tmp_path: Path
) -> None:
    for change, field, words in _bad_files(tmp_path):
        message = await invalid_input(client, worker, change)
        assert message.startswith(field), message
        for word in words:
            assert word in message, message


def test_experiments_start_refuses_a_bad_dataset_before_starting(
    environ: dict[str, str], tmp_path: Path
) -> None:
    wrong = write_csv(tmp_path / "wrong.csv", "id,question", "a,x", "b,y,z")
    cases = [
        (["--dataset", str(wrong), "--input-field", "question"], ["row 3 of wrong.csv"]),
        (["--dataset", "deploy/datasets/qa_context.csv"], ["no column 'input'", "'question'"]),
        (
            ["--dataset", "deploy/datasets/qa_context.csv", "--input-field", "question"]
            + ["--template", "{input} {ctx}"],
            ["task.prompt_template", "{ctx}", "{context}"],
        ),
    ]
    for args, words in cases:
        experiment_id = f"exp-bad-{uuid.uuid4().hex[:6]}"
        done = konstruct(environ, "experiments", "start", "--id", experiment_id, *args)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Experiment: "), done.stderr
        for word in words:
            assert word in lines[0], lines[0]
        assert "started" not in done.stdout


async def test_experiments_start_with_the_mapping_flags_runs_the_csv(
    cli_worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command of docs/datasets.md, on this test's worker.
    experiment_id = f"exp-qa-{uuid.uuid4().hex[:6]}"
    argv = ["experiments", "start", "--id", experiment_id]
    argv += ["--dataset", "deploy/datasets/qa_context.csv"]
    argv += ["--input-field", "question", "--expected-field", "answer"]
    argv += ["--template", QA_TEMPLATE, "--eval", "contains", "--watch"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "6/6" in out
