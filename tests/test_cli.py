"""The `konstruct` CLI as a user runs it: a subprocess against the session's real stack."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from konstruct.agents.models import AgentProfile
from konstruct.agents.store.agents import put_agent
from konstruct.app.cli.experiment_watch import ItemRate, progress_view
from konstruct.app.processes import free_port
from konstruct.experiments.models import ExperimentProgress
from konstruct.platform.db import tenant_transaction
from konstruct.registry.models import MoveAliasInput, NewRun
from konstruct.registry.store import insert_runs, move_alias
from tests.support import KONSTRUCT, ROOT, konstruct


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], done.stderr


@pytest.mark.parametrize(
    "command",
    [["demo", "progress"], ["send", "demo", "assistant", "hi"], ["experiments", "watch", "x"]],
)
def test_unreachable_temporal_is_one_line(environ: dict[str, str], command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    done = konstruct(dict(environ, TEMPORAL_ADDRESS=address), *command)
    assert_one_line_error(done, f"cannot reach Temporal at {address}", "TEMPORAL_ADDRESS")


@pytest.mark.parametrize(
    "command",
    [
        ["agents", "list", "demo"],
        ["experiments", "watch", "x"],
        ["registry", "history", "demo-production", "--json"],
        ["migrate"],
    ],
)
def test_unreachable_postgres_is_one_line(environ: dict[str, str], command: list[str]) -> None:
    port = free_port()
    env = {k: v for k, v in environ.items() if k != "KONSTRUCT_APP_DATABASE_URL"}
    env["KONSTRUCT_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/konstruct"
    done = konstruct(env, *command)
    assert_one_line_error(done, f"cannot reach PostgreSQL at 127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (["demo", "run", "--seed", "abc"], "'--seed'"),
        (["demo", "run", "--fail-at", "nowhere"], "'--fail-at'"),
        (["experiments", "watch", "x", "--interval", "0"], "'--interval'"),
        (["agents", "put", "demo", "a1", "--role", "r"], "'--name'"),
        (["agents", "put", "demo", "a1", "--name", "", "--role", "r"], "name"),
        (["agents", "put", "demo", "a1", "--name", "Kay", "--role", "  "], "role"),
        (["agents", "put", "demo", "Not An Id", "--name", "Kay", "--role", "r"], "agent_id"),
        (["send", "demo", "assistant", ""], "text"),
        (["send", "Not A Tenant", "assistant", "hi"], "'TENANT'"),
        (["agents", "list", "Bad/Tenant"], "is not a tenant id"),
        (["experiments", "start", "--tenant", ""], "'--tenant'"),
        (["demo", "run", "--id", "two words"], "'--id'"),
        (["experiments", "start", "--id", " "], "'--id'"),
        (["registry", "history"], "'ALIAS'"),
        (["experiments", "start", "--agent", "helper", "--template", "{input}"], "--template"),
        (["experiments", "start", "--approvals", "approve"], "--approvals: only for an agent"),
        (["experiments", "start", "--agent", "helper", "--tools", "some"], "'--tools'"),
    ],
)
def test_a_bad_argument_is_named(command: list[str], named: str) -> None:
    done = konstruct(dict(os.environ), *command)
    assert done.returncode == 2
    assert_one_line_error(done, named)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model-group", "fastest"], "task.model_group: 'fastest' is not a model group"),
        (["--judge", "nobody"], "evals.1.model_group: 'nobody' is not a model group"),
        (["--dataset", "no/such/file.jsonl"], "dataset.path:"),
    ],
)
def test_experiments_start_checks_groups_and_files_before_starting(
    environ: dict[str, str], args: list[str], named: str
) -> None:
    done = konstruct(environ, "experiments", "start", *args)
    assert done.returncode == 2
    assert_one_line_error(done, named)


def test_an_unknown_experiment_is_one_line(environ: dict[str, str]) -> None:
    done = konstruct(environ, "experiments", "watch", f"exp-none-{uuid.uuid4().hex[:6]}")
    assert done.returncode == 2
    assert_one_line_error(done, "no experiment workflow")


def test_agents_list(environ: dict[str, str]) -> None:
    listed = konstruct(environ, "agents", "list", "demo", "--json")
    assert listed.returncode == 0, listed.stderr
    agents = json.loads(listed.stdout)
    assert "assistant" in {a["agent_id"] for a in agents}
    assert set(agents[0]) == set(AgentProfile.model_fields)
    table = konstruct(environ, "agents", "list", "demo")
    assert table.returncode == 0 and "assistant" in table.stdout


async def test_output_cut_short_by_head_ends_quietly(
    environ: dict[str, str], app_pool: asyncpg.Pool
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    runs = [NewRun(run_id=str(uuid.uuid4()), name=f"run-{i}") for i in range(2)]
    # Far more history than a pipe holds, so the CLI is still writing when head leaves.
    async with tenant_transaction(app_pool, tenant) as conn:
        await put_agent(
            conn, tenant, AgentProfile(agent_id="a", name="A", role="r", fallback_reply="-")
        )
        await insert_runs(conn, tenant, runs, None, None)
        for i in range(400):
            move = MoveAliasInput(
                tenant_id=tenant,
                alias="pipe",
                to_run_id=runs[i % 2].run_id,
                reason="a reason long enough to make every history row a few hundred bytes",
                move_id=f"move-{i}",
            )
            await move_alias(conn, move, workflow_id="cli-test", workflow_run_id="run")
    command = shlex.join([*KONSTRUCT, "registry", "history", "pipe", "--tenant", tenant, "--json"])
    done = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-c", f"{command} | head -1"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=str(ROOT),
        timeout=120,
    )
    assert done.stdout == "[\n"
    assert done.stderr == "", done.stderr


def test_items_per_second_reads_while_running() -> None:
    rate = ItemRate(window_s=10)
    assert rate.add(100.0, 0) is None
    assert rate.add(101.0, 5) == 5.0
    assert rate.add(102.0, 12) == 6.0
    # Only the last window counts once polls span more than one.
    for t in range(103, 120):
        rate.add(float(t), 12 + 2 * (t - 102))
    assert rate.add(120.0, 48) == pytest.approx(2.0)


def test_the_watch_view_shows_the_measured_rate() -> None:
    # The workflow's own figure is still 0.0 early in a run.
    progress = ExperimentProgress(
        experiment_id="e", tenant_id="demo", name="e", status="running", total=50, evaluated=10
    )
    out = Console(width=200, record=True)
    out.print(progress_view(progress, 4.0))
    text = out.export_text()
    assert "4.0 items/s" in text and "10/50" in text and "ETA    10s" in text


def test_migrate_generates_the_app_role_password_and_says_where_it_is(
    environ: dict[str, str], tmp_path: Path
) -> None:
    import asyncpg as pg

    role = f"konstruct_app_{uuid.uuid4().hex[:6]}"
    config = tmp_path / "konstruct.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\npostgres: {{app_role: {role}}}\n")
    env = {
        k: v
        for k, v in environ.items()
        if k not in ("KONSTRUCT_APP_DB_PASSWORD", "KONSTRUCT_APP_DATABASE_URL", "KONSTRUCT_CONFIG")
    }
    # A worker with neither a password nor a stored one is told what to do.
    worker = konstruct(env, "--config", str(config), "agents", "list", "demo")
    assert_one_line_error(worker, "the app role has no password", "KONSTRUCT_APP_DB_PASSWORD")
    first = konstruct(env, "--config", str(config), "migrate")
    assert first.returncode == 0, first.stderr
    stored = tmp_path / "state" / "app-db-password"
    assert f"stored in {stored} (mode 600)" in first.stdout
    assert stored.stat().st_mode & 0o777 == 0o600
    password = stored.read_text().strip()
    assert len(password) >= 24 and password != "konstruct-app"
    # The role logs in with it; a second migrate keeps it and says nothing of it.
    owner = environ["KONSTRUCT_DATABASE_URL"]
    host_port = owner.split("@", 1)[1].split("/", 1)[0]

    async def login() -> None:
        conn = await pg.connect(f"postgresql://{role}:{password}@{host_port}/konstruct")
        await conn.close()

    asyncio.run(login())
    again = konstruct(env, "--config", str(config), "migrate")
    assert again.returncode == 0 and "generated" not in again.stdout
    assert stored.read_text().strip() == password
    listed = konstruct(env, "--config", str(config), "agents", "list", "demo")
    assert listed.returncode == 0, listed.stderr
