"""Epochs and `experiments retry`, end to end on the real stack."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from temporalio.client import Client

from konstruct.app.cli import main as cli_main
from konstruct.experiments.models import ExperimentResult
from konstruct.experiments.store.summaries import experiment_rows
from konstruct.experiments.views import experiment_detail
from konstruct.platform.db import tenant_transaction
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.test_experiments import FAST, experiment, results, start


async def test_epochs_give_n_results_per_item_and_aggregates_per_item(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = experiment(8, epochs=3, evals=[{"kind": "exact_match"}])
    handle = await start(client, worker, body)
    result = await handle.result()
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
    ids = {r["item_id"] for r in rows}
    assert ids == {f"q{i:04d}@{e}" for i in range(8) for e in (1, 2, 3)}
    summary = result.summary
    assert (summary.total, summary.completed, summary.epochs) == (24, 24, 3)
    [exact] = summary.evals
    assert exact.scored == 24 and exact.mean == 1.0 and exact.pass_at_k == 1.0
    assert exact.stderr == 0.0
    async with tenant_transaction(app_pool, "demo") as conn:
        stored = await experiment_rows(conn, "demo", body["experiment_id"])
    detail = experiment_detail(stored)
    per_item = detail["by_dataset_item"]
    assert set(per_item) == {f"q{i:04d}" for i in range(8)}
    assert per_item["q0003"] == {
        "epochs": 3,
        "with_result": 3,
        "scores": {"exact_match": {"mean": 1.0, "pass_at_k": True}},
    }
    # The simulator was asked each item three times.
    assert (await sim.model_stats(FAST))["ok"] == 24

    # compare pairs a run without epochs with this one by dataset item.
    once = experiment(8, evals=[{"kind": "exact_match"}])
    await (await start(client, worker, once)).result()
    argv = ["experiments", "compare", once["experiment_id"], body["experiment_id"], "--json"]
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["items"] == {"shared": 8, "only_a": 0, "only_b": 0}
    assert doc["method"]["paired_by"] == "dataset_item"
    assert (doc["b"]["total"], doc["b"]["ok"]) == (24, 24)
    assert doc["evals"][0]["paired"] == 8 and doc["evals"][0]["diff"] == 0.0
    assert doc["operations"]["b"]["prompt_tokens"] == 3 * doc["operations"]["a"]["prompt_tokens"]


async def test_retry_reruns_exactly_the_failed_items_and_keeps_the_ok_ones(
    client: Client,
    cli_worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await sim.set_profile(FAST, error_rate=0.5)
    body = experiment(30, options={"max_attempts": 1})
    first = await (await start(client, cli_worker, body)).result()
    assert 0 < first.summary.failed < 30
    before = {r["item_id"]: r for r in await results(app_pool, body["experiment_id"])}
    failed = {item for item, r in before.items() if r["status"] == "failed"}
    await sim.set_profile(FAST, error_rate=0.0)
    await sim.reset()
    # Half the calls failing may have opened the provider's breaker (six failures in
    # a row); the provider is back, so close it, as its cooldown and probe would.
    async with app_pool.acquire() as conn:
        await conn.execute(
            "update provider_breakers set status = 'closed', consecutive_failures = 0,"
            " opened_at = null, probe_started_at = null where task_queue = $1",
            cli_worker,
        )
    argv = ["experiments", "retry", body["experiment_id"]]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out = capsys.readouterr().out
    assert f"re-running {len(failed)} failed item(s)" in out
    assert f"{30 - len(failed)} ok result(s) kept" in out
    second = await client.get_workflow_handle(
        body["experiment_id"], result_type=ExperimentResult
    ).result()
    assert (second.summary.completed, second.summary.failed) == (30, 0)
    after = {r["item_id"]: r for r in await results(app_pool, body["experiment_id"])}
    # Every ok result of the first run is the same row; only the failed ones were made.
    for item, row in before.items():
        if item not in failed:
            assert (after[item]["output"], after[item]["updated_at"]) == (
                row["output"],
                row["updated_at"],
            )
    assert (await sim.model_stats(FAST))["ok"] == len(failed)
    # Nothing failed any more: a second retry has nothing to do.
    assert await asyncio.to_thread(cli_main, argv) == 0
    assert "nothing to re-run" in capsys.readouterr().out
