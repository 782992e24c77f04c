"""`experiments sweep` and `experiments compare` of three or more (issue 24, item 4):
the matrix on built data, then a real sweep of 2 model groups × 2 templates on the
real stack (dev server, PostgreSQL, the simulator over HTTP through litellm)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from konstruct.app.cli import main as cli_main
from konstruct.experiments.matrix import matrix
from konstruct.experiments.records import EvalInfo, ExperimentData
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.profiles import ModelProfile
from konstruct.providers.simulator.responders import simulated_reply
from tests.test_analysis import _experiment, _item, _score

EM = "exact_match"


def _run(experiment_id: str, scores: list[float], **fields: Any) -> ExperimentData:
    """A finished experiment whose item qN scored scores[N] on exact_match."""
    items = [_item(n, f"q{n}", scores={EM: _score(s, s == 1.0)}) for n, s in enumerate(scores)]
    return _experiment(experiment_id, items, **fields)


# --- the matrix on built data ------------------------------------------------------------


def test_each_run_gets_its_mean_and_interval_and_the_best_is_marked() -> None:
    runs = [
        _run("a", [1, 1, 0, 1, 0, 1, 1, 0]),  # 5/8
        _run("b", [1, 1, 1, 1, 1, 1, 1, 0]),  # 7/8
        _run("c", [0, 0, 0, 1, 0, 1, 0, 0]),  # 2/8
    ]
    m = matrix(runs, resamples=500)
    assert m.shared_items == 8 and m.method.paired_by == "item_id"
    [row] = m.evals
    assert [c.mean for c in row.cells] == [0.625, 0.875, 0.25]
    assert [c.best for c in row.cells] == [False, True, False]
    for c in row.cells:
        assert c.scored == 8
        assert c.ci_low is not None and c.ci_high is not None and c.mean is not None
        assert c.ci_low <= c.mean <= c.ci_high
    assert m.pairs == []
    # The same document for the same seed.
    assert matrix(runs, resamples=500).model_dump() == m.model_dump()


def test_only_items_every_run_has_are_counted_and_ties_are_all_best() -> None:
    a = _run("a", [1, 1, 0])
    b = _run("b", [1, 1, 0, 1])  # q3 only in b
    c = _run("c", [1, 0, 1])
    m = matrix([a, b, c], resamples=200)
    assert m.shared_items == 3
    [row] = m.evals
    assert [c.mean for c in row.cells] == pytest.approx([2 / 3] * 3)
    assert all(c.best for c in row.cells)


def test_pairs_give_each_pairs_paired_difference() -> None:
    runs = [_run("a", [1, 0, 0, 0]), _run("b", [1, 1, 1, 1]), _run("c", [1, 1, 0, 0])]
    m = matrix(runs, pairs=True, resamples=300)
    found = {(p.a, p.b): p for p in m.pairs}
    assert list(found) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert found[("a", "b")].diff == 0.75 and found[("a", "b")].paired == 4
    assert found[("b", "c")].diff == -0.5


def test_an_eval_some_run_lacks_is_named_not_shown() -> None:
    judge = EvalInfo("llm_judge", "llm_judge", 0.5)
    runs = [_run("a", [1, 0]), _run("b", [1, 1], evals=[EvalInfo(EM, EM), judge])]
    m = matrix(runs, resamples=100)
    assert [e.name for e in m.evals] == [EM] and m.evals_not_in_every_run == ["llm_judge"]
    with pytest.raises(ValueError, match="at least two"):
        matrix(runs[:1])


# --- the real stack ----------------------------------------------------------------------

TEMPLATE_A = "Answer with a number only: {input}"
TEMPLATE_B = "Work this out and reply with the number alone. {input}"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _dataset(path: Path, n: int) -> list[dict[str, str]]:
    rows = [
        {"id": f"s{i:03d}", "input": f"What is {i} * 3 + {i + 2}?", "expected": str(4 * i + 2)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _expected_mean(model: str, profile: dict[str, Any], template: str, rows: list[Any]) -> float:
    """The share of items the simulator answers right for this model and template."""
    p = ModelProfile.model_validate(profile)
    right = 0
    for row in rows:
        text = template.replace("{input}", row["input"])
        reply = simulated_reply(model, p, [{"role": "user", "content": text}])
        right += reply.strip() == row["expected"]
    return right / len(rows)


async def test_a_sweep_runs_every_combination_and_compare_prints_their_matrix(
    client: Client,
    cli_worker: str,
    sim: SimulatorAdmin,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    rows = _dataset(tmp_path / "items.jsonl", 16)
    (tmp_path / "b.txt").write_text(TEMPLATE_B + "\n")
    profiles = {
        "fast": await sim.set_profile("sim-fast", accuracy=1.0),
        "arith": await sim.set_profile("sim-arith", accuracy=0.6),
    }
    models = {"fast": "sim-fast", "arith": "sim-arith"}
    sweep_id = f"sw-{uuid.uuid4().hex[:8]}"
    argv = [
        "experiments", "sweep", "--id", sweep_id,
        "--model-group", "fast", "--model-group", "arith",
        "--template", TEMPLATE_A, "--template", str(tmp_path / "b.txt"),
        "--dataset", str(tmp_path / "items.jsonl"), "--no-cache", "--watch",
    ]  # fmt: skip
    code, out, err = await asyncio.to_thread(_cli, capsys, *argv)
    assert code == 0, err
    ids = [f"{sweep_id}-{g}-t{n}" for g in ("fast", "arith") for n in (1, 2)]
    for experiment_id in ids:
        assert f"started {experiment_id}" in out
        assert f"{experiment_id}: completed 16/16, 0 failed" in out
    assert f"compare: konstruct experiments compare {' '.join(ids)}" in out
    assert "items: 16 in every run" in out and "* the highest mean" in out
    matrix_lines = out.splitlines()
    [means] = [line for line in matrix_lines if line.strip().startswith("exact_match")]
    assert means.count("[") == 4 and means.count(" *") >= 1

    code, out, err = await asyncio.to_thread(
        _cli, capsys, "experiments", "compare", *ids, "--json", "--pairs", "--resamples", "500"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert [r["experiment_id"] for r in doc["runs"]] == ids
    assert doc["runs"][2]["name"] == f"sweep {sweep_id}: arith x template 1"
    assert doc["shared_items"] == 16
    [row] = doc["evals"]
    expected = [
        _expected_mean(models[g], profiles[g], t, rows)
        for g in ("fast", "arith")
        for t in (TEMPLATE_A, TEMPLATE_B)
    ]
    assert expected[0] == 1.0 and min(expected[2:]) < 1.0  # the premise: arith errs
    assert [c["mean"] for c in row["cells"]] == pytest.approx(expected, abs=1e-6)
    top = max(expected)
    assert [c["best"] for c in row["cells"]] == [e == top for e in expected]
    # Six pairs of four runs, one eval each; B - A of the pair's own means.
    assert len(doc["pairs"]) == 6
    first = doc["pairs"][0]
    assert (first["a"], first["b"]) == (ids[0], ids[1])
    diff = {(p["a"], p["b"]): p["diff"] for p in doc["pairs"]}
    assert diff[(ids[0], ids[2])] == pytest.approx(expected[2] - expected[0], abs=1e-6)
    assert set(doc["operations"]) == set(ids)
    # The printed table's rows carry their own figures (each run's, in order).
    [tokens] = [line for line in matrix_lines if line.strip().startswith("total tokens")]
    assert tokens.split()[2:] == [f"{doc['operations'][i]['total_tokens']:,}" for i in ids]


async def test_bad_sweeps_and_compares_are_refused_naming_the_option_and_start_nothing(
    client: Client, cli_worker: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sweep_id = f"sw-{uuid.uuid4().hex[:8]}"
    base = ["experiments", "sweep", "--id", sweep_id, "--model-group", "fast"]
    cases = [
        (["--template", str(tmp_path / "none.txt")], "--template", "no such file"),
        (["--model-group", "nope", "--template", TEMPLATE_A], "model_group", "'nope'"),
        (["--template", TEMPLATE_A, "--template", TEMPLATE_A], "--template", "given twice"),
    ]
    for extra, field, words in cases:
        code, out, err = await asyncio.to_thread(_cli, capsys, *base, *extra)
        assert code == 2 and field in err and words in err, (extra, err)
        assert "Traceback" not in err and err.count("\n") == 1
    # The good first combination of the refused sweep was not started either.
    with pytest.raises(RPCError) as caught:
        await client.get_workflow_handle(f"{sweep_id}-fast-t1").describe()
    assert caught.value.status == RPCStatusCode.NOT_FOUND

    code, out, err = await asyncio.to_thread(_cli, capsys, "experiments", "compare", "exp-1")
    assert code == 2 and "EXPERIMENTS" in err and "two" in err
    code, out, err = await asyncio.to_thread(
        _cli, capsys, "experiments", "compare", "exp-1", "exp-2", "exp-1"
    )
    assert code == 2 and "named twice" in err
