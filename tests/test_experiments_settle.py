"""An experiment reports `completed` only when PostgreSQL holds a result for every item.

An item whose failure cannot be recorded is counted nowhere by the workflow; the
count at the end finds it, dispatches it again, and when it still cannot run the
experiment ends `incomplete`, saying how many and why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.experiments.models import ExperimentResult
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.test_experiments import FAST, experiment, results, start, wait_for
from workflows.experiment import Experiment

ITEMS = 6


async def _take_last_item(postgres: EmbeddedPostgres, experiment_id: str) -> dict[str, Any]:
    """Once prepare has loaded the items, delete the last one (as the database owner,
    past row-level security): its call then finds no item and its failure has no row
    to be recorded on. Returns the row, to put back."""
    conn = await asyncpg.connect(postgres.owner_url)
    try:
        for _ in range(400):
            row = await conn.fetchrow(
                "select * from experiment_items where experiment_id = $1 and seq = $2",
                experiment_id,
                ITEMS - 1,
            )
            if row is not None:
                await conn.execute(
                    "delete from experiment_items where experiment_id = $1 and seq = $2",
                    experiment_id,
                    ITEMS - 1,
                )
                return dict(row)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise AssertionError("prepare never loaded the items")


async def _put_back(postgres: EmbeddedPostgres, row: dict[str, Any]) -> None:
    conn = await asyncpg.connect(postgres.owner_url)
    try:
        await conn.execute(
            f"insert into experiment_items ({', '.join(row)})"
            f" values ({', '.join(f'${i + 1}' for i in range(len(row)))})",
            *row.values(),
        )
    finally:
        await conn.close()


Started = tuple[dict[str, Any], WorkflowHandle, dict[str, Any]]


@pytest.fixture
async def started_without_last_item(
    client: Client, worker: str, sim: SimulatorAdmin, postgres: EmbeddedPostgres
) -> Started:
    """An experiment of ITEMS items run one at a time, its last item taken away:
    its input, its handle and the row taken."""
    await sim.set_profile(FAST, latency_ms=300)
    body = experiment(ITEMS, max_concurrency=1)
    handle = await start(client, worker, body)
    return body, handle, await _take_last_item(postgres, body["experiment_id"])


async def test_an_item_left_without_a_result_ends_the_experiment_incomplete(
    started_without_last_item: Started, app_pool: asyncpg.Pool
) -> None:
    body, handle, taken = started_without_last_item
    result: ExperimentResult = await handle.result()
    summary = result.summary
    assert summary.status == "incomplete"
    assert (summary.total, summary.completed, summary.failed) == (ITEMS, ITEMS - 1, 0)
    assert summary.unfinished == 1
    assert summary.incomplete_reason is not None
    assert f"1 of {ITEMS} items have no result" in summary.incomplete_reason
    progress = await handle.query(Experiment.progress)
    assert progress.status == "incomplete" and progress.unfinished == 1
    assert progress.incomplete_reason == summary.incomplete_reason
    stored = await results(app_pool, body["experiment_id"])
    assert taken["item_id"] not in {r["item_id"] for r in stored}
    assert len(stored) == ITEMS - 1


async def test_an_item_whose_failure_could_not_be_recorded_at_first_is_run_again(
    started_without_last_item: Started, postgres: EmbeddedPostgres, app_pool: asyncpg.Pool
) -> None:
    body, handle, taken = started_without_last_item
    # The count at the end finds the item; while it waits to dispatch it again the
    # item is back, so the next pass runs it.
    settling = await wait_for(handle, lambda p: p.unfinished == 1)
    assert settling.status == "running"
    await _put_back(postgres, taken)
    result: ExperimentResult = await handle.result()
    summary = result.summary
    assert summary.status == "completed" and summary.unfinished == 0
    assert summary.completed + summary.failed == summary.total == ITEMS
    stored = await results(app_pool, body["experiment_id"])
    assert [r["item_id"] for r in stored] == [item["id"] for item in body["dataset"]["items"]]
    assert all(r["status"] == "ok" for r in stored)
