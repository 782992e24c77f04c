"""Budget reservations that live exactly as long as their calls (issue 22), on the real
stack: dev server, PostgreSQL, the simulator over HTTP through litellm.

Each way a call can end is made to happen for real — answered, failed, refused,
cancelled, its worker killed with SIGKILL mid-batch — and each must leave nothing
held. A budget pauses only when what is spent leaves no room for one more call,
not when the estimates of the calls in flight fill it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from konstruct.experiments.models import ExperimentResult
from konstruct.experiments.store import budgets
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import BudgetExhausted
from konstruct.providers.pricing import cost_usd
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import WorkerProcess, wait_for_calls
from tests.test_experiments import FAST, experiment, results, start, wait_for
from tests.test_experiments_batches import BATCHED
from tests.test_experiments_cost import cli, experiment_row, own_prompt, prices
from workflows.experiment import Experiment

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

# A call's reservation can be no larger than this: its prompt guessed generously,
# its completion at the task's max_tokens (16).
MAX_TOKENS = 16
LARGEST_ESTIMATE = cost_usd(prices()["sim-fast"], 64, MAX_TOKENS)


async def holds(pool: asyncpg.Pool, experiment_id: str) -> list[asyncpg.Record]:
    async with tenant_transaction(pool, "demo") as conn:
        return await conn.fetch(
            "select hold_id, usd, tokens, expires_at < now() as expired from budget_holds"
            " where tenant_id = 'demo' and experiment_id = $1 order by hold_id",
            experiment_id,
        )


async def nothing_held(pool: asyncpg.Pool, experiment_id: str) -> None:
    row = await experiment_row(pool, experiment_id)
    assert row["reserved_usd"] == pytest.approx(0, abs=1e-12) and row["reserved_tokens"] == 0
    assert await holds(pool, experiment_id) == []


def spent_is_the_recorded_cost(row: Any, stored: list[asyncpg.Record]) -> None:
    assert row["spent_usd"] == pytest.approx(sum(r["cost_usd"] for r in stored), rel=1e-9)
    assert row["spent_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in stored)


def budgeted(n: int, max_usd: float, **overrides: Any) -> dict[str, Any]:
    task = {**own_prompt(), "max_tokens": MAX_TOKENS}
    return experiment(n, task=task, budget={"max_usd": max_usd}, **overrides)


async def test_a_budget_pauses_within_one_call_of_itself_not_at_the_estimates_in_flight(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    # Eight calls at once, each reserving about five times what it uses: on the first
    # version the estimates in flight filled the budget at a fraction of it (the
    # README's example paused at 17 of 600 items with 7 % of its budget spent).
    await sim.set_profile(FAST, latency_ms=200)
    body = budgeted(60, 1.2e-4, max_concurrency=8)
    handle = await start(client, worker, body)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert paused.paused_kind == "budget" and paused.in_flight == 0
    row = await experiment_row(app_pool, body["experiment_id"])
    # Paused because one more call might not fit, and no earlier.
    assert row["spent_usd"] > row["budget_max_usd"] - LARGEST_ESTIMATE, dict(row)
    # The calls in flight at the refusal overshoot it by less than they held.
    assert row["spent_usd"] <= row["budget_max_usd"] + (row["reserved_at_pause_usd"] or 0)
    await nothing_held(app_pool, body["experiment_id"])
    stored = await results(app_pool, body["experiment_id"])
    spent_is_the_recorded_cost(row, stored)
    assert 0 < len(stored) < 60

    await sim.set_profile(FAST, latency_ms=5)
    assert await cli("experiments", "resume", body["experiment_id"], "--raise-budget", "1") == 0
    result: ExperimentResult = await handle.result()
    assert (result.summary.completed, result.summary.failed) == (60, 0)
    assert result.summary.budget is not None
    # After the run the budget figure is the recorded cost.
    assert result.summary.budget.spent_usd == pytest.approx(result.summary.cost_usd, rel=1e-6)
    # And so says the progress `watch` and the Web UI show, once the run has ended
    # (the first version showed its last sample, with calls still holding).
    progress = await handle.query(Experiment.progress)
    assert progress.budget is not None and progress.budget.reserved_usd == 0
    assert progress.budget.spent_usd == pytest.approx(progress.cost_usd, rel=1e-6)
    await nothing_held(app_pool, body["experiment_id"])
    spent_is_the_recorded_cost(
        await experiment_row(app_pool, body["experiment_id"]),
        await results(app_pool, body["experiment_id"]),
    )


async def test_failed_calls_give_back_what_they_held_and_spend_nothing(
    client: Client, experiment_worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    # Every answer a 500, one attempt each; four items, under the breaker's threshold.
    await sim.set_profile(FAST, error_rate=1)
    body = budgeted(4, 1.0, max_concurrency=2, options={"max_attempts": 1})
    result: ExperimentResult = await (await start(client, experiment_worker, body)).result()
    assert result.summary.failed == 4
    row = await experiment_row(app_pool, body["experiment_id"])
    assert row["spent_usd"] == 0 and row["spent_tokens"] == 0
    await nothing_held(app_pool, body["experiment_id"])


async def test_a_cancelled_experiment_leaves_nothing_held_by_its_calls_in_flight(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await sim.set_profile(FAST, latency_ms=1500)
    body = budgeted(20, 1.0, max_concurrency=4)
    handle = await start(client, worker, body)
    await wait_for_calls(sim, FAST, ok=0, in_flight=4)
    assert len(await holds(app_pool, body["experiment_id"])) >= 1
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    # The cancelled calls settle as they end (no later than their answers).
    for _ in range(400):
        row = await experiment_row(app_pool, body["experiment_id"])
        if not await holds(app_pool, body["experiment_id"]) and row["reserved_usd"] < 1e-12:
            break
        await asyncio.sleep(0.05)
    await nothing_held(app_pool, body["experiment_id"])


async def test_a_hold_whose_worker_died_is_given_back_once_its_lease_runs_out(
    app_pool: asyncpg.Pool,
) -> None:
    # The store on its own: a call holds the whole budget and its worker never
    # settles it (it died). Another call waits (None) while the lease runs, and holds
    # the budget once it has run out — the dead call's share given back, not added.
    body = budgeted(1, 1e-5)
    experiment_id = body["experiment_id"]
    async with tenant_transaction(app_pool, "demo") as conn:
        await conn.execute(
            "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
            " workflow_id, total, budget_max_usd) values ('demo', $1, 'holds', '{}', '', $1,"
            " 1, 1e-5)",
            experiment_id,
        )
    reserve = budgets.reserve
    dead = await reserve(app_pool, "demo", experiment_id, 8e-6, 20, False, lease_s=0.5)
    assert dead is not None
    # While it may still be in flight the next call waits rather than pausing ...
    assert await reserve(app_pool, "demo", experiment_id, 8e-6, 20, False, lease_s=60) is None
    assert (await experiment_row(app_pool, experiment_id))["paused_reason"] is None
    # ... until its lease has run out (the database's clock says so).
    for _ in range(400):
        if all(h["expired"] for h in await holds(app_pool, experiment_id)):
            break
        await asyncio.sleep(0.05)
    alive = await reserve(app_pool, "demo", experiment_id, 8e-6, 20, False, lease_s=60)
    assert alive is not None
    row = await experiment_row(app_pool, experiment_id)
    assert row["reserved_usd"] == pytest.approx(8e-6) and row["reserved_tokens"] == 20
    assert [h["hold_id"] for h in await holds(app_pool, experiment_id)] == [alive.hold_id]
    # The dead call's settle, had it come late, takes nothing off twice.
    async with tenant_transaction(app_pool, "demo") as conn:
        await budgets.settle(conn, dead, 0.0, 0)
    assert (await experiment_row(app_pool, experiment_id))["reserved_usd"] == pytest.approx(8e-6)
    async with tenant_transaction(app_pool, "demo") as conn:
        await budgets.settle(conn, alive, 7e-6, 18)
    row = await experiment_row(app_pool, experiment_id)
    assert (row["spent_usd"], row["spent_tokens"]) == (pytest.approx(7e-6), 18)
    await nothing_held(app_pool, experiment_id)
    # Spent leaves no room for a call: refused, and the experiment says why.
    with pytest.raises(BudgetExhausted, match="has spent"):
        await reserve(app_pool, "demo", experiment_id, 8e-6, 20, False, lease_s=60)


async def test_kill_9_mid_batch_gives_back_the_dead_workers_holds_while_the_run_goes_on(
    client: Client,
    sim: SimulatorAdmin,
    worker_process: Callable[..., WorkerProcess],
    task_queue: str,
    app_pool: asyncpg.Pool,
) -> None:
    await sim.set_profile(FAST, latency_ms=600)
    # Worker processes whose budget holds last one second.
    first = worker_process("a", KONSTRUCT_BUDGET_HOLD_LEASE_S="1")
    body = budgeted(
        60,
        1.0,
        max_concurrency=8,
        options={**BATCHED, "batch_window_s": 1.0, "heartbeat_timeout_s": 3},
    )
    handle = await start(client, task_queue, body)
    await wait_for_calls(sim, FAST, ok=8, in_flight=4)
    first.kill()
    dead = {h["hold_id"] for h in await holds(app_pool, body["experiment_id"])}
    assert dead, "the killed worker held nothing"
    worker_process("b", KONSTRUCT_BUDGET_HOLD_LEASE_S="1")
    # The next worker's calls give the dead ones' shares back once their lease ran
    # out, long before the run ends (each call takes 600 ms, 8 at a time).
    for _ in range(1200):
        left = {h["hold_id"] for h in await holds(app_pool, body["experiment_id"])}
        if not left & dead:
            break
        await asyncio.sleep(0.05)
    assert not left & dead, "the dead worker's holds were never given back"
    assert len(await results(app_pool, body["experiment_id"])) < 60
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    result: ExperimentResult = await handle.result()
    assert (result.summary.completed, result.summary.failed) == (60, 0)
    await nothing_held(app_pool, body["experiment_id"])
    row = await experiment_row(app_pool, body["experiment_id"])
    stored = await results(app_pool, body["experiment_id"])
    # A call the dead worker settled but never stored was paid for: spent may exceed
    # the recorded cost by such calls, never fall short of it.
    assert row["spent_usd"] >= sum(r["cost_usd"] for r in stored) * (1 - 1e-9)


def test_the_lease_is_a_setting_with_an_environment_variable() -> None:
    from konstruct.config import ENV_OVERRIDES, load_settings

    assert ENV_OVERRIDES["KONSTRUCT_BUDGET_HOLD_LEASE_S"] == "experiments.budget_hold_lease_s"
    settings = load_settings(environ={"KONSTRUCT_BUDGET_HOLD_LEASE_S": "2.5"})
    assert settings.experiments.budget_hold_lease_s == 2.5


async def test_the_readmes_budget_example_pauses_where_it_says(
    client: Client, cli_worker: str, app_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    # README: `experiments start --id exp-2 --model-group arith --eval exact_match
    # --epochs 3 --budget-usd 0.0005 --watch` "pauses at $0.0005 (exit 3)". The first
    # version paused at 17 of 600 items with $0.000036 spent (the estimates of the
    # calls in flight filled it). Without the cache, so every item is a real call.
    exp = f"exp-2-{uuid.uuid4().hex[:6]}"
    flags = ["--model-group", "arith", "--eval", "exact_match", "--epochs", "3"]
    start_cmd = ["experiments", "start", "--id", exp, *flags, "--budget-usd", "0.0005"]
    assert await cli(*start_cmd, "--no-cache", "--watch") == 3
    assert f"experiment {exp!r} has spent" in capsys.readouterr().err
    row = await experiment_row(app_pool, exp)
    # One call's estimate before any answer taught the worker: its prompt guessed
    # generously, its completion at the first guess of 64 tokens.
    first_estimate = cost_usd(prices()["sim-arith"], 64, 64)
    assert 0.0005 - first_estimate < row["spent_usd"] <= 0.0005 + row["reserved_at_pause_usd"]
    await nothing_held(app_pool, exp)
    await client.get_workflow_handle(exp).terminate("the test has seen the pause")
