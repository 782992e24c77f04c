"""A PostgreSQL outage of 30 s in the middle of a message, an experiment and a demo run
delays each of them and fails none: each completes once PostgreSQL is back, with
every row written once.

The test runs its own PostgreSQL and worker (on its own task queue), so stopping
the database disturbs no other test. Each workflow is caught in the middle of a
write: the test holds a SHARE lock on the table each one writes its result to,
waits until all three wait for that lock, and stops PostgreSQL under them.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.app.processes import free_port
from konstruct.config import Settings
from konstruct.platform import db
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.test_demo import demo_input
from tests.test_demo import start as start_demo
from tests.test_experiments import experiment
from tests.test_experiments import start as start_experiment
from tests.test_handle_message import message
from workers.main import build_worker
from workflows.demo_cascade._options import BASELINES
from workflows.handle_message import HandleMessage

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

# The table each kind writes its result to; the test locks them against writes.
RESULT_TABLES = ("message_turns", "experiment_results", "registry_runs")
OUTAGE_S = 30
ITEMS = 6


async def _waiting_for_locks(url: str) -> set[str]:
    """The tables some transaction is waiting to lock."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "select distinct c.relname from pg_locks l join pg_class c on c.oid = l.relation"
            " where not l.granted"
        )
    finally:
        await conn.close()
    return {r["relname"] for r in rows}


async def _rows(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_a_postgres_outage_delays_every_workflow_and_fails_none(
    tmp_path: Path, client: Client, settings: Settings, sim: SimulatorAdmin
) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata", free_port())
    server.start()
    try:
        url = server.owner_url
        await db.migrate(url, app_role="konstruct_app", app_password="konstruct-app")
        await db.seed_demo(url)
        own = settings.model_copy(
            update={"postgres": settings.postgres.model_copy(update={"url": url})}
        )
        task_queue = f"outage-{uuid.uuid4().hex[:8]}"
        holder = await asyncpg.connect(url)
        try:
            async with build_worker(client, own, task_queue) as worker, worker:
                await holder.execute("begin")
                await holder.execute(f"lock table {', '.join(RESULT_TABLES)} in share mode")
                body = message()
                message_handle = await client.start_workflow(
                    HandleMessage.run,
                    body,
                    id=f"outage-msg-{uuid.uuid4().hex[:8]}",
                    task_queue=task_queue,
                )
                # A long heartbeat timeout: a call waiting for the lock does not heartbeat.
                spec = experiment(ITEMS, max_concurrency=3, options={"heartbeat_timeout_s": 120})
                experiment_handle = await start_experiment(client, task_queue, spec)
                demo_handle = await start_demo(client, task_queue, demo_input())
                for _ in range(1200):
                    if set(RESULT_TABLES) <= await _waiting_for_locks(url):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"not every workflow reached its write: {RESULT_TABLES}")
                # Stopping PostgreSQL ends the lock and every waiting transaction with it.
                await asyncio.to_thread(server.stop)
                # The outage itself is what is tested: a real 30 s without PostgreSQL,
                # longer than any retry budget counted in a few attempts.
                await asyncio.sleep(OUTAGE_S)
                await asyncio.to_thread(server.start)
                reply, outcome, demo = await asyncio.gather(
                    message_handle.result(), experiment_handle.result(), demo_handle.result()
                )
        finally:
            holder.terminate()

        # The message: answered by the model, not the fallback; stored once.
        assert not reply.degraded and not reply.fallback_used, reply
        turns = await _rows(
            url, "select reply_text from message_turns where message_id = $1", body["message_id"]
        )
        assert [t["reply_text"] for t in turns] == [reply.response]
        steps = await _rows(
            url, "select step from agent_steps where message_id = $1", body["message_id"]
        )
        assert [s["step"] for s in steps] == [0]

        # The experiment: every item once, none failed.
        summary = outcome.summary
        assert (summary.completed, summary.failed) == (ITEMS, 0), summary
        results = await _rows(
            url,
            "select item_id, status from experiment_results where experiment_id = $1",
            spec["experiment_id"],
        )
        assert len(results) == len({r["item_id"] for r in results}) == ITEMS
        assert {r["status"] for r in results} == {"ok"}

        # The demo run: every step passed; its runs registered and promoted once.
        assert demo.overall_status == "pass", [(s.name, s.status, s.detail) for s in demo.steps]
        runs = await _rows(
            url,
            "select name from registry_runs where workflow_run_id = $1",
            demo.workflow_run_id,
        )
        assert sorted(r["name"] for r in runs) == sorted(BASELINES)
        promotes = await _rows(
            url,
            "select to_run_id from registry_alias_history"
            " where workflow_run_id = $1 and reason like 'promote champion%'",
            demo.workflow_run_id,
        )
        assert [str(p["to_run_id"]) for p in promotes] == [demo.champion_run_id]
        alias = await _rows(
            url, "select run_id from registry_aliases where alias = 'demo-production'"
        )
        assert [str(a["run_id"]) for a in alias] == [demo.champion_run_id]
    finally:
        server.destroy()
