"""`konstruct experiments gate`: the rules on built data, then two real experiments on
the real stack gated from a subprocess (exit 0, 1, 2) with its Markdown summary."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio.client import Client

from konstruct.experiments.compare import compare, eval_stats
from konstruct.experiments.gate import judge, parse_rule
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import konstruct
from tests.test_analysis import _experiment, _item, _items, _run, _score

EM = "exact_match"


def _runs(failing_in_candidate: int, n: int = 10) -> tuple[object, object]:
    base = _experiment(
        "base", [_item(i, f"q{i}", scores={EM: _score(1.0, True)}) for i in range(n)]
    )
    cand = _experiment(
        "cand",
        [
            _item(i, f"q{i}", scores={EM: _score(0.0 if i < failing_in_candidate else 1.0)})
            for i in range(n)
        ],
    )
    return base, cand


def test_a_drop_fails_only_when_its_interval_lies_below_zero_unless_strict() -> None:
    rule = parse_rule("max_drop", f"{EM}=0.05")
    # One flip in ten: -0.1, but the interval reaches zero, so it may be noise.
    base, cand = _runs(1)
    comparison = compare(base, cand, resamples=2000)  # type: ignore[arg-type]
    lenient = judge(comparison, eval_stats(cand), [rule], strict=False)  # type: ignore[arg-type]
    assert lenient.passed, lenient
    assert "includes zero" in lenient.rules[0].measured
    strict = judge(comparison, eval_stats(cand), [rule], strict=True)  # type: ignore[arg-type]
    assert not strict.passed
    # Six flips in ten: the interval lies below zero, a real drop.
    base, cand = _runs(6)
    comparison = compare(base, cand, resamples=2000)  # type: ignore[arg-type]
    real = judge(comparison, eval_stats(cand), [rule], strict=False)  # type: ignore[arg-type]
    assert not real.passed and "lies below zero" in real.rules[0].measured


def test_min_and_cost_rules() -> None:
    base, cand = _runs(2)
    comparison = compare(base, cand, resamples=200)  # type: ignore[arg-type]
    stats = eval_stats(cand)  # type: ignore[arg-type]
    assert judge(comparison, stats, [parse_rule("min", f"{EM}=0.8")], False).passed
    assert not judge(comparison, stats, [parse_rule("min", f"{EM}=0.81")], False).passed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("exact_match", "EVAL=NUMBER"),
        ("=0.1", "EVAL=NUMBER"),
        ("exact_match=x", "not a number"),
        ("exact_match=-1", ">= 0"),
        ("exact_match=nan", "finite"),
    ],
)
def test_a_malformed_rule_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_rule("max_drop", text)


async def test_the_gate_from_a_subprocess_exits_0_1_or_2_and_writes_markdown(
    client: Client, worker: str, sim: SimulatorAdmin, environ: dict[str, str], tmp_path: Path
) -> None:
    items = _items(40)
    await sim.set_profile("sim-arith", accuracy=1.0)
    baseline = await _run(client, worker, items, "gate-base")
    await sim.set_profile("sim-arith", accuracy=0.7)
    candidate = await _run(client, worker, items, "gate-cand")

    async def gate(*args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(konstruct, environ, "experiments", "gate", *args)
        return done.returncode, done.stdout, done.stderr

    summary = tmp_path / "summary.md"
    code, out, err = await gate(
        candidate, "--baseline", baseline, "--max-drop", f"{EM}=0.02", "--markdown", str(summary)
    )
    assert code == 1, err
    print(out, summary.read_text(), sep="\n")  # (docs/reports.md quotes them)
    assert "gate FAILED" in out and f"FAIL  max-drop {EM}=0.02" in out and "interval" in out
    text = summary.read_text()
    assert "Gate **failed**" in text and "| `max-drop exact_match=0.02` | **FAIL** |" in text

    code, out, err = await gate(baseline, "--baseline", baseline, "--max-drop", f"{EM}=0.02",
                                "--min", f"{EM}=0.9")  # fmt: skip
    assert code == 0, out + err
    assert "gate passed" in out

    code, out, _ = await gate(
        candidate, "--baseline", baseline, "--max-drop", f"{EM}=0.5", "--json"
    )
    assert code == 0 and json.loads(out)["passed"] is True

    for args, named in [
        ((), "at least one rule"),
        (("--max-drop", "bogus=0.1"), "no such eval"),
        (("--min", f"{EM}=2"), "between 0 and 1"),
        (("--max-drop", EM), "EVAL=NUMBER"),
    ]:
        code, out, err = await gate(candidate, "--baseline", baseline, *args)
        assert code == 2 and named in err and err.count("\n") == 1, (args, err)
