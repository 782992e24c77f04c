"""Cost, the output cache and budgets (issue 13), on the real stack: dev server,
PostgreSQL, the simulator over HTTP through litellm.

Prices come from the router config (`deploy/llm-router.yaml`); tokens are what
the simulator reported in each answer's usage (stored per result). Every test
that keeps the cache on gives its experiments a system prompt of its own, so
no other test's calls answer them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError
from temporalio.client import Client, WorkflowHistory

from konstruct.app.cli import main as cli_main
from konstruct.config import Settings
from konstruct.experiments.models import ExperimentResult
from konstruct.experiments.store.budgets import _usd_refused
from konstruct.experiments.store.cache import cache_key
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import ConfigError
from konstruct.providers.pricing import Price, cost_usd, price_of
from konstruct.providers.router import Deployment, RouterConfig, load_router_config
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.responders import count_tokens
from tests.support import ROOT, replay_all, replayer
from tests.test_experiment_replay import _runs, uncached_worker
from tests.test_experiments import FAST, calls_by_item, experiment, results, start, wait_for
from tests.test_experiments_batches import BATCHED, task_activities
from workflows.experiment import Experiment

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

JUDGE = "sim-judge"
JUDGED = [
    {"kind": "exact_match"},
    {"kind": "llm_judge", "model_group": "judge", "rubric": "Is the number right?"},
]


def prices() -> dict[str, Price]:
    config = load_router_config(ROOT / "deploy" / "llm-router.yaml")
    found = {d.deployment_id: price_of(d) for d in config.model_list}
    return {k: v for k, v in found.items() if v is not None}


def own_prompt() -> dict[str, str]:
    """A task whose calls no other test makes (its system prompt is new)."""
    return {
        "model_group": "fast",
        "system_prompt": f"You are run {uuid.uuid4().hex[:12]}.",
        "prompt_template": "Answer with a number only: {input}",
    }


def rerun(body: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The same experiment definition under a new experiment id."""
    return {**body, "experiment_id": f"exp-{uuid.uuid4().hex[:10]}", **overrides}


async def experiment_row(pool: asyncpg.Pool, experiment_id: str, tenant: str = "demo") -> Any:
    async with tenant_transaction(pool, tenant) as conn:
        return await conn.fetchrow(
            "select * from experiments where tenant_id = $1 and experiment_id = $2",
            tenant,
            experiment_id,
        )


async def cli(*argv: str) -> int:
    return int(await asyncio.to_thread(cli_main, list(argv)))


# --- prices, without the stack ------------------------------------------------------------


def test_a_price_comes_from_the_config_else_litellm_else_it_is_unknown() -> None:
    sim_fast = prices()["sim-fast"]
    assert (sim_fast.input_per_token, sim_fast.output_per_token) == (1.5e-07, 6.0e-07)
    assert sim_fast.source == "config"
    mini = Deployment(model_name="m", litellm_params={"model": "openai/gpt-4o-mini"})
    from_map = price_of(mini)
    assert from_map is not None and from_map.source == "litellm"
    assert from_map.input_per_token > 0 and from_map.output_per_token > 0
    nobody = Deployment(model_name="m", litellm_params={"model": "openai/sim-nobody-knows"})
    assert price_of(nobody) is None
    assert cost_usd(sim_fast, 1_000_000, 1_000_000) == pytest.approx(0.75)


def test_a_negative_price_fails_the_router_config(tmp_path: Path) -> None:
    entry = {
        "model_name": "fast",
        "litellm_params": {"model": "openai/x"},
        "model_info": {"id": "x", "output_cost_per_token": -1e-6},
    }
    with pytest.raises(ValidationError):
        RouterConfig.model_validate({"model_list": [entry]})
    path = tmp_path / "router.yaml"
    path.write_text(json.dumps({"model_list": [entry]}))
    with pytest.raises(ConfigError, match="model_list.0.model_info.output_cost_per_token"):
        load_router_config(path)


def test_a_refusal_names_the_budget_the_experiment_has() -> None:
    # Read after the refused update: settles in between may make the dollars pass again.
    row = {"spent_usd": 0.0001, "reserved_usd": 0.0, "budget_max_usd": 0.0002}
    usd_only = {**row, "budget_max_tokens": None, "spent_tokens": 40, "reserved_tokens": 0}
    assert _usd_refused(usd_only, 0.00001, 20)
    tokens_only = {**usd_only, "budget_max_usd": None, "budget_max_tokens": 50}
    assert not _usd_refused(tokens_only, 0.00001, 20)
    both = {**usd_only, "budget_max_tokens": 50}
    assert not _usd_refused(both, 0.00001, 20)  # tokens 60/50 beyond dollars 0.55
    # dollars (0.00019 + 0.00002) / 0.0002 = 1.05 beyond tokens (10 + 20) / 50 = 0.6
    assert _usd_refused({**both, "spent_usd": 0.00019, "spent_tokens": 10}, 0.00002, 20)


def test_the_cache_key_is_the_call() -> None:
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    key = cache_key("task", "sim-fast", messages, None, 16, 0)
    assert key == cache_key("task", "sim-fast", list(messages), None, 16, 0)
    others = [
        cache_key("judge", "sim-fast", messages, None, 16, 0),
        cache_key("task", "sim-arith", messages, None, 16, 0),
        cache_key("task", "sim-fast", [{"role": "user", "content": "What is 1 + 3?"}], None, 16, 0),
        cache_key("task", "sim-fast", messages, 0.5, 16, 0),
        cache_key("task", "sim-fast", messages, None, 17, 0),
        cache_key("task", "sim-fast", messages, None, 16, 2),
    ]
    assert key not in others and len(set(others)) == len(others)


# --- cost ------------------------------------------------------------------------------------


async def test_cost_is_the_price_times_the_tokens_the_simulator_reported(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    price = prices()
    body = experiment(12, evals=JUDGED, max_concurrency=4)
    handle = await start(client, worker, body)
    result: ExperimentResult = await handle.result()
    summary = result.summary
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    task_total = judge_total = 0.0
    for row, item in zip(rows, body["dataset"]["items"], strict=True):
        # The tokens the simulator counted: words of the rendered prompt, of the reply.
        prompt = f"Answer with a number only: {item['input']}"
        assert row["prompt_tokens"] == count_tokens(prompt)
        assert row["completion_tokens"] == count_tokens(row["output"])
        expected = cost_usd(price["sim-fast"], row["prompt_tokens"], row["completion_tokens"])
        assert row["cost_usd"] == pytest.approx(expected, rel=1e-9)
        judged = json.loads(row["scores"])["llm_judge"]
        judge_cost = cost_usd(price[JUDGE], judged["prompt_tokens"], judged["completion_tokens"])
        assert judged["cost_usd"] == pytest.approx(judge_cost, rel=1e-9)
        assert row["judge_cost_usd"] == pytest.approx(judge_cost, rel=1e-9)
        assert not row["cached"]
        task_total += expected
        judge_total += judge_cost
    assert summary.cost_known and summary.cache_hits == 0
    assert summary.task_cost_usd == pytest.approx(task_total, rel=1e-6)
    assert summary.judge_cost_usd == pytest.approx(judge_total, rel=1e-6)
    assert summary.cost_usd == pytest.approx(task_total + judge_total, rel=1e-6)
    progress = await handle.query(Experiment.progress)
    assert progress.cost_usd == pytest.approx(summary.cost_usd, rel=1e-6)
    assert progress.cost_known and progress.cache_hits == 0
    # The registry run holds it, as every summary figure.
    async with tenant_transaction(app_pool, "demo") as conn:
        metrics = json.loads(
            await conn.fetchval(
                "select metrics from registry_runs where run_id = $1::uuid",
                result.registry_run_id,
            )
        )
    assert metrics["cost_usd"] == summary.cost_usd and metrics["cost_known"] == 1.0
    capsys.readouterr()
    assert await cli("experiments", "show", body["experiment_id"], "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cost_usd"] == summary.cost_usd and shown["cache_hits"] == 0
    assert shown["items"][0]["cost_usd"] == pytest.approx(rows[0]["cost_usd"])


# --- the output cache ----------------------------------------------------------------------


async def test_a_rerun_is_answered_by_the_cache_with_no_provider_call(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    first = experiment(15, task=own_prompt(), evals=JUDGED, cache=True, max_concurrency=5)
    made: ExperimentResult = await (await start(client, worker, first)).result()
    assert made.summary.cache_hits == 0 and made.summary.cost_usd > 0
    before = await sim.stats()

    # Same definition, new id, and a budget no real call would fit in: hits reserve nothing.
    again = rerun(first, budget={"max_usd": 1e-9})
    handle = await start(client, worker, again)
    hit: ExperimentResult = await handle.result()
    after = await sim.stats()
    for model in (FAST, JUDGE):
        assert after["models"][model]["requests"] == before["models"][model]["requests"], model
    summary = hit.summary
    assert summary.status == "completed" and summary.completed == 15
    # 15 task calls and 15 judge calls, none made.
    assert summary.cache_hits == 30 and summary.cost_usd == 0
    assert summary.cost_saved_usd == pytest.approx(made.summary.cost_usd, rel=1e-6)
    assert summary.budget is not None and summary.budget.spent_usd == 0
    assert [e.model_dump() for e in summary.evals] == [e.model_dump() for e in made.summary.evals]
    progress = await handle.query(Experiment.progress)
    assert progress.cache_hits == 30 and progress.cost_usd == 0
    rows = await results(app_pool, again["experiment_id"])
    made_rows = await results(app_pool, first["experiment_id"])
    assert all(r["cached"] and r["cache_hits"] == 2 and r["latency_ms"] is None for r in rows)
    assert [r["output"] for r in rows] == [r["output"] for r in made_rows]

    # cache: false calls again.
    uncached: ExperimentResult = await (
        await start(client, worker, rerun(first, cache=False))
    ).result()
    last = await sim.stats()
    assert last["models"][FAST]["requests"] - after["models"][FAST]["requests"] == 15
    assert last["models"][JUDGE]["requests"] - after["models"][JUDGE]["requests"] == 15
    assert uncached.summary.cache_hits == 0 and uncached.summary.cost_usd > 0


async def test_batched_calls_store_and_hit_the_cache_with_one_lookup_per_batch(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await sim.set_profile(FAST, latency_ms=20)
    first = experiment(150, task=own_prompt(), cache=True, max_concurrency=20, options=BATCHED)
    await (await start(client, worker, first)).result()
    assert (await sim.model_stats(FAST))["ok"] == 150
    again = rerun(first)
    handle = await start(client, worker, again)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 150 and result.summary.cache_hits == 150
    assert (await sim.model_stats(FAST))["requests"] == 150
    kinds = await task_activities(handle)
    assert kinds["experiment_run_batch"] >= 1, kinds
    rows = await results(app_pool, again["experiment_id"])
    assert len(rows) == 150 and all(r["cached"] for r in rows)


async def test_a_failure_is_not_cached(
    client: Client, experiment_worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    # Four items: under the breaker's threshold of five consecutive failures.
    await sim.set_profile(FAST, error_rate=1)
    first = experiment(4, task=own_prompt(), cache=True, options={"max_attempts": 1})
    failed: ExperimentResult = await (await start(client, experiment_worker, first)).result()
    assert failed.summary.failed == 4 and failed.summary.cost_usd == 0
    await sim.set_profile(FAST, error_rate=0)
    before = (await sim.model_stats(FAST))["ok"]
    second = rerun(first)
    again: ExperimentResult = await (await start(client, experiment_worker, second)).result()
    errors = [r["error"] for r in await results(app_pool, second["experiment_id"]) if r["error"]]
    assert again.summary.completed == 4 and again.summary.cache_hits == 0, errors
    assert (await sim.model_stats(FAST))["ok"] - before == 4


# --- budgets ---------------------------------------------------------------------------------


async def test_a_budget_pauses_with_calls_in_flight_and_a_raise_resumes_it(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Slow answers and 8 calls at once: several are in flight when the budget runs out.
    # A call's estimate (about 10 prompt + 16 completion tokens, $11e-6) is over what
    # it uses (10 + 1, $2.1e-6); the 40 calls cost about $1.1e-4 in all.
    await sim.set_profile(FAST, latency_ms=400)
    task = {**own_prompt(), "max_tokens": 16}
    body = experiment(40, task=task, max_concurrency=8, budget={"max_usd": 6e-5})
    handle = await start(client, worker, body)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert paused.paused_kind == "budget" and paused.in_flight == 0 and paused.eta_s is None
    assert paused.paused_reason is not None and paused.paused_reason.startswith("budget: ")
    assert "--raise-budget" in paused.paused_reason
    assert 0 < paused.completed < 40 and paused.failed == 0
    row = await experiment_row(app_pool, body["experiment_id"])
    # The first refusal's words (two refused at once may differ in their figures).
    assert row["status"] == "paused"
    assert row["paused_reason"].startswith(
        f"budget: experiment {body['experiment_id']!r} has spent"
    )
    # Calls were in flight, and those at the refusal overshoot by less than they held.
    assert (await sim.model_stats(FAST))["max_in_flight"] >= 3
    assert row["spent_usd"] <= row["budget_max_usd"] + (row["reserved_at_pause_usd"] or 0)
    assert row["reserved_usd"] == pytest.approx(0, abs=1e-12) and row["reserved_tokens"] == 0
    stored = await results(app_pool, body["experiment_id"])
    assert row["spent_usd"] == pytest.approx(sum(r["cost_usd"] for r in stored), rel=1e-9)
    assert row["spent_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in stored)
    sent = (await sim.model_stats(FAST))["requests"]
    capsys.readouterr()
    assert await cli("experiments", "show", body["experiment_id"]) == 0
    assert f"paused: budget: experiment {body['experiment_id']!r}" in capsys.readouterr().out

    await sim.set_profile(FAST, latency_ms=5)
    assert await cli("experiments", "resume", body["experiment_id"], "--raise-budget", "1") == 0
    assert "raised" in capsys.readouterr().out
    result: ExperimentResult = await handle.result()
    summary = result.summary
    assert (summary.status, summary.completed, summary.failed) == ("completed", 40, 0)
    assert summary.budget is not None and summary.budget.max_usd == pytest.approx(1.0 + 6e-5)
    assert summary.budget.spent_usd == pytest.approx(summary.cost_usd, rel=1e-6)
    row = await experiment_row(app_pool, body["experiment_id"])
    assert row["paused_reason"] is None and row["reserved_usd"] == 0
    # Paused means no call goes out: the resume sent exactly one call per item left
    # without a result, and no item was called twice. Counted over the whole run
    # rather than over a fixed sleep while paused, a window a late call could miss.
    assert (await sim.model_stats(FAST))["requests"] - sent == 40 - len(stored)
    assert set((await calls_by_item(sim, body)).values()) == {1}


async def test_a_token_budget_pauses_and_raise_tokens_resumes_it(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    task = {**own_prompt(), "max_tokens": 16}
    body = experiment(10, task=task, max_concurrency=2, budget={"max_tokens": 80})
    handle = await start(client, worker, body)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert paused.paused_kind == "budget" and "tokens budget" in (paused.paused_reason or "")
    row = await experiment_row(app_pool, body["experiment_id"])
    assert row["spent_tokens"] <= 80 + row["reserved_at_pause_tokens"]
    assert await cli("experiments", "resume", body["experiment_id"], "--raise-tokens", "10000") == 0
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 10
    assert result.summary.budget is not None and result.summary.budget.max_tokens == 10080


async def test_a_spent_tenant_month_pauses_every_experiment_of_the_tenant(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = f"budget-{uuid.uuid4().hex[:8]}"
    async with tenant_transaction(app_pool, tenant) as conn:
        await conn.execute(
            "insert into tenants (tenant_id, name) values ($1, 'budget test')", tenant
        )
    assert await cli("budgets", "set", tenant, "--monthly-usd", "0.0001") == 0
    await sim.set_profile(FAST, latency_ms=300)
    task = {**own_prompt(), "max_tokens": 16}
    bodies = [
        experiment(40, tenant_id=tenant, task=task, max_concurrency=3, cache=False)
        for _ in range(2)
    ]
    handles = [await start(client, worker, body) for body in bodies]
    for handle in handles:
        paused = await wait_for(handle, lambda p: p.status == "paused")
        assert paused.paused_kind == "budget" and paused.completed < 40
        assert f"tenant {tenant!r}'s monthly budget" in (paused.paused_reason or "")
    capsys.readouterr()
    assert await cli("budgets", "show", tenant, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted(p["experiment_id"] for p in shown["paused"]) == sorted(
        b["experiment_id"] for b in bodies
    )
    month = shown["month"]
    rows = [await experiment_row(app_pool, b["experiment_id"], tenant) for b in bodies]
    in_flight = sum(r["reserved_at_pause_usd"] or 0 for r in rows)
    assert month["spent_usd"] <= month["max_usd"] + in_flight
    assert month["spent_usd"] == pytest.approx(sum(r["spent_usd"] for r in rows), rel=1e-9)
    assert month["reserved_usd"] == pytest.approx(0, abs=1e-12)

    await sim.set_profile(FAST, latency_ms=5)
    assert await cli("budgets", "set", tenant, "--monthly-usd", "5") == 0
    for handle in handles:
        await handle.signal(Experiment.resume)
    summaries = [(await h.result()).summary for h in handles]
    assert [(s.status, s.completed) for s in summaries] == [("completed", 40)] * 2
    capsys.readouterr()
    assert await cli("budgets", "show", tenant, "--json") == 0
    month = json.loads(capsys.readouterr().out)["month"]
    assert month["spent_usd"] == pytest.approx(sum(s.cost_usd for s in summaries), rel=1e-6)
    assert month["max_usd"] == 5


async def test_the_documented_budget_commands(
    client: Client, cli_worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/experiments.md, "Budgets", on this test's worker.
    exp = f"exp-b-{uuid.uuid4().hex[:6]}"
    start = ["experiments", "start", "--id", exp, "--budget-usd", "0.0002", "--no-cache"]
    # `--watch` returns (exit 3) once the spent budget has paused it: only a person moves it.
    assert await cli(*start, "--watch") == 3
    err = capsys.readouterr().err
    assert "paused until you resume it" in err and f"experiment {exp!r} has spent" in err
    assert f"`konstruct experiments resume {exp} --tenant demo --raise-budget USD`" in err
    handle = client.get_workflow_handle(exp)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert f"experiment {exp!r} has spent" in (paused.paused_reason or "")
    assert paused.in_flight == 0
    assert await cli("experiments", "watch", exp) == 3
    capsys.readouterr()
    assert await cli("experiments", "resume", exp, "--raise-budget", "0.01") == 0
    out = capsys.readouterr().out
    assert "raised" in out and "resume accepted: the experiment runs again" in out
    assert await cli("experiments", "watch", exp) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "cost $0.0004" in out
    assert await cli("budgets", "show", "demo") == 0
    assert "has no monthly budget" in capsys.readouterr().out


# --- replay ----------------------------------------------------------------------------------


async def test_budget_pause_and_cached_runs_replay_without_cache(
    client: Client, settings: Settings, task_queue: str, sim: SimulatorAdmin
) -> None:
    """Fresh histories of a budget pause + resume and of a run answered by the cache,
    every workflow task replayed from scratch; recorded with KONSTRUCT_RECORD_HISTORIES=1."""
    histories: dict[str, WorkflowHistory] = {}
    async with uncached_worker(client, settings, task_queue) as pool:
        await sim.set_profile(FAST, latency_ms=200)
        task = {**own_prompt(), "max_tokens": 16}
        budgeted = experiment(
            12,
            task=task,
            max_concurrency=4,
            # Under the run's cost (about $3.2e-5, judges included): it pauses.
            budget={"max_usd": 2e-5},
            evals=JUDGED,
            cache=True,
            options={"toggle_cooldown_s": 0.0},
        )
        handle = await start(client, task_queue, budgeted)
        await wait_for(handle, lambda p: p.status == "paused")
        await sim.set_profile(FAST, latency_ms=5)
        async with tenant_transaction(pool, "demo") as conn:
            await conn.execute(
                "update experiments set budget_max_usd = budget_max_usd + 1"
                " where tenant_id = 'demo' and experiment_id = $1",
                budgeted["experiment_id"],
            )
        await handle.signal(Experiment.resume)
        await handle.result()
        histories["budget_pause_resume"] = await handle.fetch_history()
        # The same definition again: every call answered by the cache.
        cached = rerun(
            budgeted,
            budget=None,
            options={**budgeted["options"], "continue_as_new_every": 5},
        )
        run = await start(client, task_queue, cached)
        result: ExperimentResult = await run.result()
        assert result.summary.cache_hits == 24
        for index, history in enumerate(await _runs(client, cached["experiment_id"])):
            histories[f"cached_rerun_{index}"] = history
    await replay_all(replayer(Experiment), histories, record_as="experiment_")
