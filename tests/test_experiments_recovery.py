"""Experiments survive a restart of the Temporal dev server and of PostgreSQL mid-run.

Each test runs its own server (the session's are shared by every other test),
so the restart disturbs nobody else.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
from temporalio.client import Client

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.app.processes import free_port
from konstruct.config import Settings
from konstruct.experiments.models import ExperimentResult
from konstruct.platform import db
from konstruct.platform.temporal.client import connect
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import DevServer
from tests.test_experiments import FAST, experiment, start
from workers.main import build_worker
from workflows.experiment import Experiment


async def _count(url: str, experiment_id: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "select item_id, status from experiment_results where experiment_id = $1",
            experiment_id,
        )
    finally:
        await conn.close()
    return [(r["item_id"], r["status"]) for r in rows]


async def _wait_results(url: str, experiment_id: str, at_least: int) -> None:
    for _ in range(600):
        if len(await _count(url, experiment_id)) >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} results appeared")


async def test_dev_server_restart_mid_run(
    tmp_path: Path, settings: Settings, sim: SimulatorAdmin, postgres: EmbeddedPostgres
) -> None:
    server = DevServer.create(tmp_path, db_file=tmp_path / "temporal.db")
    server.start()
    try:
        client = await connect(settings, address=server.address)
        await sim.set_profile(FAST, latency_ms=150)
        body = experiment(40, max_concurrency=3)
        task_queue = f"restart-{uuid.uuid4().hex[:8]}"
        async with build_worker(client, settings, task_queue) as worker, worker:
            await start(client, task_queue, body)
            await _wait_results(postgres.owner_url, body["experiment_id"], 6)
            server.stop()
            await asyncio.sleep(1.0)
            server.start()
            client = await connect(settings, address=server.address)
            result = await client.get_workflow_handle_for(
                Experiment.run, body["experiment_id"]
            ).result()
        assert result.summary.completed == 40 and result.summary.failed == 0
        rows = await _count(postgres.owner_url, body["experiment_id"])
        assert len(rows) == 40 and {s for _, s in rows} == {"ok"}
    finally:
        server.stop()


async def test_postgres_restart_mid_run(
    tmp_path: Path, client: Client, settings: Settings, sim: SimulatorAdmin
) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata", free_port())
    server.start()
    try:
        await db.migrate(server.owner_url, app_role="konstruct_app", app_password="konstruct-app")
        await db.seed_demo(server.owner_url)
        own = settings.model_copy(
            update={"postgres": settings.postgres.model_copy(update={"url": server.owner_url})}
        )
        await sim.set_profile(FAST, latency_ms=100)
        body = experiment(40, max_concurrency=3)
        task_queue = f"pg-restart-{uuid.uuid4().hex[:8]}"
        async with build_worker(client, own, task_queue) as worker, worker:
            handle = await start(client, task_queue, body)
            await _wait_results(server.owner_url, body["experiment_id"], 6)
            server.kill()
            await asyncio.sleep(1.5)
            server.start()
            result: ExperimentResult = await handle.result()
            assert (await handle.query(Experiment.progress)).status == "completed"
        assert result.summary.completed == 40 and result.summary.failed == 0
        rows = await _count(server.owner_url, body["experiment_id"])
        assert len(rows) == 40 and {s for _, s in rows} == {"ok"}
    finally:
        server.destroy()
