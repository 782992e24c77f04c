"""`experiments compare A B --sequential` (issue 24, item 6): the confidence sequence's
error rate and power on simulated data, then two real experiments followed and
stopped once their difference is known."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client

from konstruct.experiments.sequential import (
    confidence_sequence,
    decide,
    first_verdict,
    verdict_of,
)
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.test_analysis import _experiment, _item, _score
from tests.test_experiments import experiment, results, start
from tests.test_experiments_cost import experiment_row
from tests.test_sweep import _cli

EM = "exact_match"


def _paired(rng: random.Random, n: int, p_a: float, p_b: float) -> list[float]:
    """n paired differences B - A of two independent pass/fail evals."""
    return [float(rng.random() < p_b) - float(rng.random() < p_a) for _ in range(n)]


def test_with_no_true_difference_it_decides_wrongly_at_most_alpha_of_the_time() -> None:
    # Looking after every one of 300 pairs, in 2,000 runs with no difference at all.
    rng = random.Random(7)
    runs = [_paired(rng, 300, 0.6, 0.6) for _ in range(2000)]
    wrong = sum(first_verdict(r, 0.95)[1] == "differs" for r in runs)
    assert wrong / len(runs) <= 0.05
    # A fixed-n 95 % interval looked at after every pair errs far more often: why the
    # sequence's wider, time-uniform interval is needed.
    naive = 0
    for r in runs:
        total = square = 0.0
        for t, d in enumerate(r, 1):
            total, square = total + d, square + d * d
            mean = total / t
            sd = max(square / t - mean * mean, 1e-12) ** 0.5
            if t >= 10 and abs(mean) > 1.96 * sd / t**0.5:
                naive += 1
                break
    assert naive / len(runs) > 3 * max(wrong / len(runs), 0.05)


def test_a_real_difference_is_found_early_and_a_margin_rules_out_a_large_one() -> None:
    rng = random.Random(11)
    found = [first_verdict(_paired(rng, 400, 0.95, 0.3), 0.95) for _ in range(500)]
    assert all(verdict == "differs" for _, verdict, _ in found)
    at = sorted(t for t, _, _ in found if t is not None)
    assert at[len(at) // 2] <= 40  # half of them within 40 pairs
    # The same evals, so no difference: within ±0.2 is known long before 2,000 pairs.
    t, verdict, interval = first_verdict(_paired(rng, 2000, 0.7, 0.7), 0.95, margin=0.2)
    assert verdict == "within_margin" and t is not None and t < 2000
    assert interval is not None and -0.2 < interval.low <= interval.high < 0.2


def test_the_interval_covers_its_mean_and_narrows() -> None:
    wide = confidence_sequence([1.0, -1.0, 0.0, 0.0], 0.95)
    narrow = confidence_sequence([1.0, -1.0, 0.0, 0.0] * 100, 0.95)
    assert wide.low <= wide.estimate <= wide.high and (wide.low, wide.high) == (-1.0, 1.0)
    assert narrow.high - narrow.low < wide.high - wide.low
    assert verdict_of(narrow, None) is None
    with pytest.raises(ValueError):
        confidence_sequence([], 0.95)


def test_pairs_are_read_in_the_order_they_became_complete() -> None:
    # q1's pair completed first (both at 1 s), so it is the first look.
    a = _experiment(
        "a",
        [
            _item(0, "q0", scores={EM: _score(1, True)}, finished_s=5.0),
            _item(1, "q1", scores={EM: _score(1, True)}, finished_s=1.0),
        ],
    )
    b = _experiment(
        "b",
        [
            _item(0, "q0", scores={EM: _score(1, True)}, finished_s=6.0),
            _item(1, "q1", scores={EM: _score(0, False)}, finished_s=1.0),
        ],
    )
    d = decide(a, b, EM)
    assert (d.pairs, d.decided_at, d.verdict) == (2, None, None)
    assert d.interval is not None and d.interval.estimate == -0.5


# --- the real stack ----------------------------------------------------------------------


async def _row_stored(pool: asyncpg.Pool, experiment_id: str) -> None:
    for _ in range(1200):  # 2 minutes at most
        if await experiment_row(pool, experiment_id) is not None:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"experiment {experiment_id} never stored its row")


async def test_two_experiments_are_followed_and_stopped_once_their_difference_is_known(
    client: Client,
    cli_worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A answers every item right, B none. At 300 ms a call and 2 at a time, 400 items
    # take each about a minute; the difference is known after about 15 pairs.
    await sim.set_profile("sim-arith", accuracy=0.0, latency_ms=300)
    await sim.set_profile("sim-fast", latency_ms=300)
    bodies: list[dict[str, Any]] = [
        experiment(400, task={**experiment(1)["task"], "model_group": group}, max_concurrency=2)
        for group in ("fast", "arith")
    ]
    for body in bodies:
        body["evals"] = [{"kind": EM}]
    for body in bodies:
        await start(client, cli_worker, body)
    for body in bodies:  # the compare reads what the experiments have stored
        await _row_stored(app_pool, body["experiment_id"])
    ids = [b["experiment_id"] for b in bodies]

    code, out, err = await asyncio.to_thread(
        _cli, capsys, "experiments", "compare", *ids, "--sequential"
    )
    assert code == 0, err
    assert "exact_match: B - A -1.0000" in out and "B differs from A" in out, out
    assert out.count("stop accepted") == 2 and "not run: " in out
    for experiment_id in ids:
        row = await experiment_row(app_pool, experiment_id)
        assert row["status"] == "stopped"
        stored = len(await results(app_pool, experiment_id))
        assert 0 < stored < 400 and f"{400 - stored} item(s)" in out

    # Bad uses are refused naming the option.
    code, out, err = await asyncio.to_thread(
        _cli, capsys, "experiments", "compare", *ids, "--sequential", "--eval", "nope"
    )
    assert code == 2 and "--eval 'nope'" in err and "exact_match" in err
    code, out, err = await asyncio.to_thread(
        _cli, capsys, "experiments", "compare", *ids, ids[0] + "x", "--sequential"
    )
    assert code == 2 and "--sequential" in err
