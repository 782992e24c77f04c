"""`experiments compare` and `experiments report`: the statistics by themselves, then
two real experiments on the real stack compared, and the report opened in Chromium."""

from __future__ import annotations

import asyncio
import html
import json
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client

from konstruct.app.cli import main as cli_main
from konstruct.experiments import compare as analysis
from konstruct.experiments import statistics
from konstruct.experiments.compare import bucket_width, compare, timeline
from konstruct.experiments.models import ExperimentInput
from konstruct.experiments.records import EvalInfo, ExperimentData, ItemResult, RetrySecond
from konstruct.experiments.report import render_report
from konstruct.experiments.statistics import (
    binomial,
    bootstrap_mean_ci,
    paired_bootstrap,
    percentile,
    standard_error,
)
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.profiles import ModelProfile
from konstruct.providers.simulator.responders import simulated_reply
from workflows.experiment import Experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEMPLATE = "Answer with a number only: {input}"

# --- statistics -------------------------------------------------------------------------


def test_percentile_interpolates_like_percentile_cont() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile(range(101), 0) == 0 and percentile(range(101), 100) == 100
    assert percentile(range(101), 37) == pytest.approx(37)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_standard_error() -> None:
    assert standard_error([1.0]) is None
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx((1 / 3) ** 0.5 / 2)


@pytest.mark.parametrize(("n", "p"), [(1, 0.3), (7, 0.4), (30, 0.2), (400, 0.35), (5000, 0.8)])
def test_binomial_draws_have_the_binomial_moments(n: int, p: float) -> None:
    rng = random.Random(3)
    draws = [binomial(rng, n, p) for _ in range(20_000)]
    mean = sum(draws) / len(draws)
    variance = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    assert all(0 <= d <= n for d in draws)
    assert mean == pytest.approx(n * p, abs=4 * (n * p * (1 - p) / len(draws)) ** 0.5)
    assert variance == pytest.approx(n * p * (1 - p), rel=0.05)


def test_binomial_edges() -> None:
    rng = random.Random(0)
    assert binomial(rng, 0, 0.5) == 0
    assert binomial(rng, 10, 0.0) == 0 and binomial(rng, 10, 1.0) == 10


def _bernoulli(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    a, b = _bernoulli(300, 0.8, 1), _bernoulli(300, 0.7, 2)
    first = paired_bootstrap(a, b, resamples=2000, seed=0)
    assert paired_bootstrap(a, b, resamples=2000, seed=0) == first
    assert paired_bootstrap(a, b, resamples=2000, seed=1) != first
    assert first.low < first.estimate < first.high


def test_a_known_difference_is_inside_its_interval() -> None:
    # Binary scores: B is A with a fixed 30% of the items turned from pass to fail.
    a = [1.0] * 400
    b = [0.0 if i % 10 < 3 else 1.0 for i in range(400)]
    ci = paired_bootstrap(a, b)
    assert ci.estimate == pytest.approx(-0.3)
    assert ci.low < -0.3 < ci.high and ci.high < 0
    # Continuous scores (the item-by-item path): B = A - 0.1 + noise.
    rng = random.Random(7)
    xs = [rng.random() for _ in range(500)]
    ys = [x - 0.1 + rng.gauss(0, 0.05) for x in xs]
    ci = paired_bootstrap(xs, ys, resamples=3000)
    assert ci.low < -0.1 < ci.high and ci.high < 0
    assert ci.high - ci.low < 0.02


def test_identical_runs_give_zero_and_similar_runs_an_interval_around_zero() -> None:
    a = _bernoulli(200, 0.7, 5)
    assert paired_bootstrap(a, a) == statistics.Interval(0.0, 0.0, 0.0)
    # Two runs of one model: independent draws of the same distribution.
    ci = paired_bootstrap(_bernoulli(500, 0.7, 11), _bernoulli(500, 0.7, 12))
    assert ci.low < 0 < ci.high


def test_multinomial_resampling_matches_item_by_item_resampling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    diffs = [-1.0] * 60 + [0.0] * 300 + [1.0] * 40
    fast = bootstrap_mean_ci(diffs, resamples=20_000, seed=0)
    monkeypatch.setattr(statistics, "_MULTINOMIAL_FACTOR", 10**9)  # item by item
    slow = bootstrap_mean_ci(diffs, resamples=20_000, seed=0)
    assert fast.estimate == slow.estimate == pytest.approx(-0.05)
    assert fast.low == pytest.approx(slow.low, abs=0.006)
    assert fast.high == pytest.approx(slow.high, abs=0.006)


def test_bootstrap_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0], confidence=1.0)


def test_the_two_epoch_rules_differ_on_one_passing_epoch_of_three() -> None:
    flags = [True, False, False]
    assert statistics.passed_any_epoch(flags)
    assert not statistics.passed_at_least_half_of_epochs(flags)
    assert statistics.passed_at_least_half_of_epochs([True, False])
    # `experiments show` counts the dataset item passed (pass@k), compare does not.
    entries = [{"score": float(f), "passed": f} for f in flags]
    rows = [{"dataset_id": "q", "status": "ok", "scores": {"em": entry}} for entry in entries]
    assert statistics.per_dataset_item(rows)["q"]["scores"]["em"]["pass_at_k"] is True
    items = [
        ItemResult(f"q@{n}", n, "ok", scores={"em": entry}, dataset_id="q", epoch=n + 1)
        for n, entry in enumerate(entries)
    ]
    [merged] = statistics.by_dataset_item(items)
    assert merged.scores["em"]["passed"] is False
    summary = statistics.eval_figures(
        [statistics.EvalEntry("q", float(f), f) for f in flags], epochs=3
    )
    assert (summary.pass_at_k, summary.pass_rate) == (1.0, 0.3333)


# --- compare on built data ------------------------------------------------------------------


def _score(value: float, passed: bool | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"score": value, "detail": ""}
    if passed is not None:
        entry["passed"] = passed
    return entry


def _item(seq: int, item_id: str, status: str = "ok", **fields: Any) -> ItemResult:
    defaults: dict[str, Any] = {
        "input": f"What is {seq} + 1?",
        "expected": str(seq + 1),
        "output": str(seq + 1),
        "latency_ms": 100.0 + seq,
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "attempt": 1,
        "finished_s": seq * 0.5,
    }
    if status != "ok":
        defaults.update(output=None, latency_ms=None, prompt_tokens=0, completion_tokens=0)
    return ItemResult(item_id=item_id, seq=seq, status=status, **{**defaults, **fields})


def _experiment(experiment_id: str, items: list[ItemResult], **fields: Any) -> ExperimentData:
    evals = fields.pop("evals", [EvalInfo("exact_match", "exact_match")])
    return ExperimentData(
        experiment_id=experiment_id,
        tenant_id="demo",
        name=experiment_id,
        status="completed",
        total=len(items),
        evals=evals,
        items=items,
        duration_s=12.5,
        **fields,
    )


def test_compare_pairs_by_id_and_lists_flips_in_dataset_order() -> None:
    em = "exact_match"
    a = _experiment(
        "a",
        [
            _item(0, "x0", scores={em: _score(1.0, True)}),
            _item(1, "x1", scores={em: _score(1.0, True)}),
            _item(2, "x2", scores={em: _score(0.0, False)}),
            _item(3, "x3", scores={em: _score(1.0, True)}),
            _item(4, "x4", "failed", error_kind="RateLimited"),
            _item(5, "only-a", scores={em: _score(1.0, True)}),
        ],
    )
    b = _experiment(
        "b",
        [
            # Dataset order of B differs: flips follow A's.
            _item(0, "x3", scores={em: _score(0.0, False)}),
            _item(1, "x2", scores={em: _score(1.0, True)}),
            _item(2, "x1", scores={em: _score(0.0, False)}),
            _item(3, "x0", scores={em: _score(1.0, True)}),
            _item(4, "x4", scores={em: _score(1.0, True)}),
            _item(5, "only-b", scores={em: _score(0.0, False)}),
            _item(6, "only-b2", "pending"),
        ],
    )
    c = compare(a, b, resamples=500)
    assert (c.items.shared, c.items.only_a, c.items.only_b) == (5, 1, 2)
    [e] = c.evals
    assert (e.paired, e.unscored_a, e.unscored_b) == (4, 1, 0)
    assert e.mean_a == 0.75 and e.mean_b == 0.5 and e.diff == -0.25
    assert e.flips.pass_to_fail == ["x1", "x3"] and e.flips.fail_to_pass == ["x2"]
    assert e.pass_rate_a == 0.75 and e.pass_rate_b == 0.5
    assert e.ci_low is not None and e.ci_high is not None and e.ci_low <= -0.25 <= e.ci_high
    assert (c.a.ok, c.a.failed, c.b.pending) == (5, 1, 1)
    # Same input, same document.
    assert compare(a, b, resamples=500).model_dump() == c.model_dump()


def test_pass_is_the_stored_flag_else_half_a_point() -> None:
    judge = "judge"
    evals = [EvalInfo(judge, "llm_judge", 0.8)]
    a = _experiment(
        "a",
        [
            _item(0, "i0", scores={judge: _score(0.7, False)}),  # below its threshold 0.8
            _item(1, "i1", scores={judge: _score(0.6)}),  # no flag: 0.6 >= 0.5 passes
        ],
        evals=evals,
    )
    b = _experiment(
        "b",
        [
            _item(0, "i0", scores={judge: _score(0.9, True)}),
            _item(1, "i1", scores={judge: _score(0.4)}),
        ],
        evals=evals,
    )
    [e] = compare(a, b, resamples=200).evals
    assert e.flips.fail_to_pass == ["i0"] and e.flips.pass_to_fail == ["i1"]
    assert e.diff == pytest.approx(0.0) and e.kind == "llm_judge"


def test_compare_reports_evals_of_one_side_and_operations() -> None:
    a = _experiment(
        "a",
        [_item(i, f"i{i}", scores={"exact_match": _score(1.0, True)}) for i in range(10)],
        throttled=3,
    )
    b = _experiment(
        "b",
        [
            _item(i, f"i{i}", scores={"contains": _score(1.0, True)}, cost_usd=0.001)
            for i in range(10)
        ],
        evals=[EvalInfo("contains", "contains")],
        has_cost=True,
    )
    c = compare(a, b, resamples=100)
    assert c.evals == [] and c.evals_only_a == ["exact_match"] and c.evals_only_b == ["contains"]
    ops_a, ops_b = c.operations["a"], c.operations["b"]
    assert ops_a.latency_p50_ms == 104.5 and ops_a.latency_p95_ms == pytest.approx(108.55, abs=0.06)
    assert ops_a.total_tokens == 120 and ops_a.throttled == 3
    assert ops_a.cost_usd is None and ops_b.cost_usd == pytest.approx(0.01)


def test_timeline_buckets_by_completion_time() -> None:
    assert bucket_width(30) == 0.5 and bucket_width(600) == 10 and bucket_width(0.5) == 0.1
    items = [
        _item(0, "a", finished_s=0.2),
        _item(1, "b", finished_s=0.9, attempt=3),
        _item(2, "c", "failed", finished_s=2.5),
        _item(3, "d", "pending", finished_s=None),
    ]
    buckets = timeline(items, 1.0)
    assert [(b.start_s, b.ok, b.failed, b.retried_items, b.retries) for b in buckets] == [
        (0.0, 2, 0, 1, 2),
        (1.0, 0, 0, 0, 0),
        (2.0, 0, 1, 0, 0),
    ]
    # 429s and call failures go by when they happened, and may extend the span.
    seconds = [RetrySecond(0.0, 3, 0), RetrySecond(0.5, 1, 1), RetrySecond(3.2, 2, 0)]
    buckets = timeline(items, 1.0, seconds)
    assert [(b.start_s, b.ok, b.throttled, b.call_failures) for b in buckets] == [
        (0.0, 2, 4, 1),
        (1.0, 0, 0, 0),
        (2.0, 0, 0, 0),
        (3.0, 0, 2, 0),
    ]
    assert [b.start_s for b in timeline([], 1.0, seconds)] == [0.0, 1.0, 2.0, 3.0]


def test_the_throughput_plot_shows_recorded_429s_else_extra_attempts() -> None:
    items = [_item(i, f"i{i}", finished_s=i * 0.1, attempt=1 + i % 2) for i in range(20)]
    recorded = _experiment(
        "r", items, throttled=5, retry_seconds=[RetrySecond(0.2, 4, 0), RetrySecond(1.1, 1, 0)]
    )
    page = render_report(recorded)
    assert "by the second they happened" in page
    svg = re.search(r'<svg[^>]*data-plot="throughput".*?</svg>', page, re.S)
    assert svg is not None and "429s" in svg.group(0) and "extra attempts" not in svg.group(0)
    old = render_report(_experiment("o", items, throttled=5))
    svg = re.search(r'<svg[^>]*data-plot="throughput".*?</svg>', old, re.S)
    assert svg is not None and "extra attempts" in svg.group(0)
    assert "before they were recorded per second" in old


NASTY = 'What is 2 + 2? <b>bold</b> & "quotes" </td><script>alert(1)</script>'


def test_the_report_is_escaped_self_contained_and_deterministic() -> None:
    em = "exact_match"
    items = [
        _item(i, f"i{i}", scores={em: _score(float(i % 3 > 0), i % 3 > 0)}, attempt=1 + i % 2)
        for i in range(30)
    ]
    items.append(_item(30, "nasty", input=NASTY, output="<img src=x onerror=alert(2)>"))
    items.append(_item(31, "broken", "failed", error_kind="Timeout", error="<i>slow</i>"))
    exp = _experiment("exp-<1>", items, throttled=4)
    page = render_report(exp, max_rows=20)
    assert page == render_report(exp, max_rows=20)
    assert "<b>bold</b>" not in page and "<script>alert" not in page and "<img" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quotes&quot;" not in page  # row 30 is capped
    full = render_report(exp)
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quotes&quot; &lt;/td&gt;&lt;script&gt;" in full
    assert "&lt;img src=x onerror=alert(2)&gt;" in full and "&lt;i&gt;slow&lt;/i&gt;" in full
    assert "Experiment exp-&lt;1&gt;" in full
    assert 'id="rows-capped"' in page and 'id="rows-capped"' not in full
    assert full.count("<tr ") == 32
    # Nothing to fetch: no external script, style, image or link.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", full)
    assert "<link" not in full and "@import" not in full
    for plot in ("scores", "latency", "throughput"):
        assert f'data-plot="{plot}"' in full
    assert 'data-plot="cost"' not in full and "no <code>cost_usd</code>" in full
    # Ids of different plots never collide.
    ids = re.findall(r'\sid="([^"]+)"', full)
    assert len(ids) == len(set(ids))


def test_the_report_plots_cost_when_results_carry_it() -> None:
    items = [_item(i, f"i{i}", cost_usd=0.0005) for i in range(10)]
    page = render_report(_experiment("c", items, has_cost=True, evals=[]))
    assert 'data-plot="cost"' in page and "0.005000" in page
    items[0] = _item(0, "i0", cost_usd=None, cached=True)
    exp = _experiment("c", items, has_cost=True, evals=[])
    assert analysis.operations(exp).cost_unknown == 1
    page = render_report(exp)
    assert "1 of unknown price" in page and "answered from the cache" in page


# --- the real stack ----------------------------------------------------------------------


def _items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    rows = [
        {"id": f"{prefix}{i:04d}", "input": f"What is {i} + {i + 7}?", "expected": str(2 * i + 7)}
        for i in range(n)
    ]
    rows[3] = {"id": rows[3]["id"], "input": NASTY, "expected": "4"}
    return rows


async def _run(client: Client, task_queue: str, items: list[dict[str, Any]], name: str) -> str:
    body: dict[str, Any] = {
        "experiment_id": f"exp-{name}-{uuid.uuid4().hex[:8]}",
        "tenant_id": "demo",
        "name": name,
        "dataset": {"items": items},
        "task": {"model_group": "arith", "prompt_template": TEMPLATE},
        "evals": [{"kind": "exact_match"}],
        "max_concurrency": 10,
        "options": {"retry_max_s": 2.0, "monitor_interval_s": 0.5},
    }
    if "cache" in ExperimentInput.model_fields:
        # The output cache would answer the second run with the first one's outputs.
        body["cache"] = False
    result = await client.execute_workflow(
        Experiment.run, body, id=body["experiment_id"], task_queue=task_queue
    )
    assert result.summary.completed == len(items)
    return str(body["experiment_id"])


def _wrong(profile: dict[str, Any], item: dict[str, Any]) -> bool:
    """Whether the simulator's arith model answers the item wrongly with this profile."""
    messages = [{"role": "user", "content": TEMPLATE.replace("{input}", item["input"])}]
    reply = simulated_reply("sim-arith", ModelProfile.model_validate(profile), messages)
    return reply.strip() != item["expected"]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["experiments", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _chromium(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_compare_two_real_runs_and_open_the_report_in_chromium(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    items = _items(40)
    perfect = await sim.set_profile("sim-arith", accuracy=1.0)
    assert not any(_wrong(perfect, i) for i in items)
    exp_a = await _run(client, worker, items, "arith-perfect")
    sloppy = await sim.set_profile("sim-arith", accuracy=0.7)
    exp_b = await _run(client, worker, items, "arith-sloppy")
    expected = [i["id"] for i in items if _wrong(sloppy, i)]
    assert 0 < len(expected) < len(items)

    code, out, err = await asyncio.to_thread(_cli, capsys, "compare", exp_a, exp_b, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["items"] == {"shared": 40, "only_a": 0, "only_b": 0}
    assert doc["method"]["resamples"] == 10_000 and doc["method"]["seed"] == 0
    [em] = doc["evals"]
    assert em["name"] == "exact_match" and em["paired"] == 40
    assert em["flips"] == {"pass_to_fail": expected, "fail_to_pass": []}
    assert em["mean_a"] == 1.0 and em["diff"] == pytest.approx(-len(expected) / 40)
    assert em["ci_low"] <= em["diff"] <= em["ci_high"] < 0 and em["excludes_zero"]
    # Cost: a figure when the results have a `cost_usd` column, else null ("n/a").
    async with app_pool.acquire() as conn:
        has_cost = await conn.fetchval(
            "select count(*) > 0 from information_schema.columns"
            " where table_name = 'experiment_results' and column_name = 'cost_usd'"
        )
    for side in ("a", "b"):
        cost = doc["operations"][side]["cost_usd"]
        assert (cost is not None and cost >= 0) if has_cost else cost is None
    assert doc["operations"]["b"]["latency_p50_ms"] is not None
    # Reproducible: the same document again.
    again = await asyncio.to_thread(_cli, capsys, "compare", exp_a, exp_b, "--json")
    assert json.loads(again[1]) == doc

    code, out, err = await asyncio.to_thread(_cli, capsys, "compare", exp_a, exp_b)
    assert code == 0, err
    assert "exact_match" in out and expected[0] in out and "pass->fail" in out

    missing = f"exp-none-{uuid.uuid4().hex[:6]}"
    code, out, err = await asyncio.to_thread(_cli, capsys, "compare", exp_a, missing)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and missing in err and "does not exist" in err

    other = await _run(client, worker, _items(4, prefix="z"), "arith-other")
    code, out, err = await asyncio.to_thread(_cli, capsys, "compare", exp_a, other)
    assert code == 1 and "share no item" in err and err.count("\n") == 1

    page = tmp_path / "report.html"
    code, out, err = await asyncio.to_thread(_cli, capsys, "report", exp_b, "--out", str(page))
    assert code == 0, err
    assert page.is_file() and str(page) in out
    text = page.read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text

    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    shown = await asyncio.to_thread(_chromium, page.as_uri() + "#selftest", tmp_path, "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    for plot in ("scores", "latency", "throughput"):
        match = re.search(rf'<svg[^>]*data-plot="{plot}".*?</svg>', dom, re.S)
        assert match is not None, plot
        assert match.group(0).count("<path") >= 10, plot
    # The script ran in the browser: its filters, each applied once.
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert found is not None, dom[-2000:]
    selftest = json.loads(html.unescape(found.group(1)))
    wrong = len(expected)
    assert selftest["rows"] == selftest["all"] == 40
    assert selftest["status"] == {"ok": 40, "failed": 0, "pending": 0}
    assert selftest["evals"]["exact_match"] == {"pass": 40 - wrong, "fail": wrong, "none": 0}
    assert selftest["text_query"] == items[-1]["id"] and selftest["text"] == 1
    # The item with markup in its input is text in the page, not elements.
    assert "&lt;b&gt;bold&lt;/b&gt;" in dom and "<b>bold</b>" not in dom

    png = tmp_path / "report.png"
    shot = await asyncio.to_thread(
        _chromium,
        page.as_uri(),
        tmp_path,
        f"--screenshot={png}",
        "--window-size=1280,2000",
        "--hide-scrollbars",
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_compare_pairs_dataset_items_when_an_experiment_ran_epochs() -> None:
    def score(value: float) -> dict[str, Any]:
        return {"exact_match": {"score": value, "passed": value == 1.0}}

    # A: one run per item. B: three epochs per item; q1 passes once in three.
    a = _experiment(
        "a",
        [
            _item(0, "q0", dataset_id="q0", scores=score(1.0)),
            _item(1, "q1", dataset_id="q1", scores=score(1.0)),
        ],
    )
    b_items = [
        _item(seq, f"q{i}@{e}", dataset_id=f"q{i}", epoch=e, scores=score(value))
        for seq, (i, e, value) in enumerate(
            [(0, 1, 1.0), (1, 1, 0.0), (0, 2, 1.0), (1, 2, 1.0), (0, 3, 1.0), (1, 3, 0.0)]
        )
    ]
    result = compare(a, _experiment("b", b_items), resamples=200)
    assert (result.items.shared, result.items.only_a, result.items.only_b) == (2, 0, 0)
    assert result.method.paired_by == "dataset_item"
    [exact] = result.evals
    assert exact.mean_b == pytest.approx((1.0 + 1 / 3) / 2, abs=1e-5)
    assert exact.flips.pass_to_fail == ["q1"] and exact.flips.fail_to_pass == []
    # B's side and operations count every result, all three epochs of each item.
    assert (result.b.total, result.b.ok) == (6, 6)
    assert result.operations["b"].total_tokens == 6 * result.operations["a"].total_tokens // 2
