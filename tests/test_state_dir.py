"""Where a command finds the stack: `--state-dir`, KONSTRUCT_HOME (or KONSTRUCT_STATE_DIR),
the nearest temporal-dev.yaml above the working directory, the running stack this user
started last, the per-user default; the files an install ships; `migrate` never silently
changing the app role's password or migrating from a folder that is not there.

Discovery runs `load_settings` with a working directory and an environment of its own (a
fake HOME and XDG_STATE_HOME); a running stack is its state directory's lock held by
this process, as `konstruct up` holds it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.config import (
    RUNNING_STACK_RECORD,
    STACK_LOCK,
    STACK_RECORD,
    StackRecord,
    load_settings,
)
from konstruct.experiments.datasets import load_items
from konstruct.experiments.models import DatasetSpec
from konstruct.platform import db
from konstruct.platform.errors import ConfigError
from konstruct.platform.settings import deploy_dir
from tests.support import KONSTRUCT, ROOT


def no_project_above(folder: Path) -> Path:
    """`folder`, after checking that no temporal-dev.yaml is above it (else walk-up wins)."""
    assert not [d for d in (folder, *folder.parents) if (d / "temporal-dev.yaml").exists()]
    return folder


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment with only a HOME and an XDG_STATE_HOME of this test's."""
    return {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose config keeps its state in `state/` and names its Temporal port."""
    folder = tmp_path / "project"
    (folder / "src" / "deep").mkdir(parents=True)
    (folder / "temporal-dev.yaml").write_text("state_dir: state\ntemporal: {port: 7301}\n")
    return folder


class RunningStack:
    """A state directory whose lock is held, with the record `konstruct up` writes."""

    def __init__(self, state_dir: Path, config: Path | None, user_state: Path) -> None:
        state_dir.mkdir(parents=True)
        self.lock = open(state_dir / STACK_LOCK, "w")  # noqa: SIM115 - held until stop
        fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = StackRecord(state_dir, config, os.getpid()).to_json()
        (state_dir / STACK_RECORD).write_text(record)
        user_state.mkdir(parents=True, exist_ok=True)
        (user_state / RUNNING_STACK_RECORD).write_text(record)

    def stop(self) -> None:
        self.lock.close()


@pytest.fixture
def running(tmp_path: Path, home: dict[str, str]) -> Iterator[RunningStack]:
    config = tmp_path / "elsewhere" / "stack.yaml"
    config.parent.mkdir()
    config.write_text("temporal: {port: 7302}\n")
    stack = RunningStack(
        tmp_path / "stack-state", config, Path(home["XDG_STATE_HOME"]) / "konstruct"
    )
    yield stack
    stack.stop()


def test_discovery_order(
    tmp_path: Path, home: dict[str, str], project: Path, running: RunningStack
) -> None:
    deep = project / "src" / "deep"
    explicit = load_settings(
        state_dir="mine", cwd=deep, environ={**home, "KONSTRUCT_HOME": str(tmp_path / "env")}
    )
    assert (explicit.state_path, explicit.state_dir_origin) == (deep / "mine", "--state-dir")
    from_env = load_settings(cwd=deep, environ={**home, "KONSTRUCT_HOME": str(tmp_path / "env")})
    assert (from_env.state_path, from_env.state_dir_origin) == (tmp_path / "env", "KONSTRUCT_HOME")
    # Explicit and env still read the project's config (found two folders up).
    assert explicit.temporal.port == from_env.temporal.port == 7301
    walked_up = load_settings(cwd=deep, environ=home)
    assert walked_up.state_path == project / "state"
    assert walked_up.source == project / "temporal-dev.yaml"
    assert walked_up.base_dir == project and walked_up.temporal.port == 7301
    # Outside any project: the running stack this user recorded, with its config file.
    outside = no_project_above(tmp_path / "nowhere")
    outside.mkdir()
    found = load_settings(cwd=outside, environ=home)
    assert found.state_path == tmp_path / "stack-state"
    assert found.temporal.port == 7302 and found.source == tmp_path / "elsewhere" / "stack.yaml"
    assert "running stack" in found.state_dir_origin
    # Named outright, a running stack's state directory gives its config too.
    named = load_settings(
        cwd=outside, environ={**home, "KONSTRUCT_HOME": str(tmp_path / "stack-state")}
    )
    assert named.temporal.port == 7302
    running.stop()
    default = load_settings(cwd=outside, environ=home)
    assert default.state_path == tmp_path / "xdg" / "konstruct"
    assert default.source is None and default.temporal.port == 7233


def test_the_per_user_default_without_xdg_state_home(tmp_path: Path) -> None:
    outside = no_project_above(tmp_path / "nowhere")
    outside.mkdir()
    # A relative XDG_STATE_HOME is ignored, as the XDG spec says.
    for environ in ({"HOME": str(tmp_path)}, {"HOME": str(tmp_path), "XDG_STATE_HOME": "rel"}):
        settings = load_settings(cwd=outside, environ=environ)
        assert settings.state_path == tmp_path / ".local" / "state" / "konstruct"


def test_konstruct_state_dir_is_an_alias_and_a_conflict_is_named(
    tmp_path: Path, home: dict[str, str], project: Path
) -> None:
    alias = load_settings(cwd=project, environ={**home, "KONSTRUCT_STATE_DIR": "old"})
    assert (alias.state_path, alias.state_dir_origin) == (project / "old", "KONSTRUCT_STATE_DIR")
    same = {"KONSTRUCT_HOME": str(project / "old"), "KONSTRUCT_STATE_DIR": "old"}
    assert load_settings(cwd=project, environ={**home, **same}).state_path == project / "old"
    with pytest.raises(ConfigError, match="KONSTRUCT_HOME .* and KONSTRUCT_STATE_DIR .* different"):
        load_settings(
            cwd=project, environ={**home, "KONSTRUCT_HOME": "a", "KONSTRUCT_STATE_DIR": "b"}
        )


def test_a_dead_stack_record_is_not_followed(tmp_path: Path, home: dict[str, str]) -> None:
    stack = RunningStack(tmp_path / "gone", None, Path(home["XDG_STATE_HOME"]) / "konstruct")
    stack.stop()  # the process that held the lock ended: its record stays behind
    outside = no_project_above(tmp_path / "nowhere")
    outside.mkdir()
    assert load_settings(cwd=outside, environ=home).state_path == tmp_path / "xdg" / "konstruct"


def test_without_a_config_file_the_defaults_are_the_shipped_files(
    tmp_path: Path, home: dict[str, str]
) -> None:
    outside = no_project_above(tmp_path / "nowhere")
    outside.mkdir()
    settings = load_settings(cwd=outside, environ=home)
    shipped = deploy_dir()
    assert settings.path(settings.llm.router_config) == shipped / "llm-router.yaml"
    assert settings.path(settings.simulator.config) == shipped / "simulator.yaml"
    assert (shipped / "llm-router.yaml").is_file() and (shipped / "simulator.yaml").is_file()
    # The documented sample path reads from anywhere; a project's own file wins.
    sample = DatasetSpec(path="deploy/datasets/arithmetic.jsonl")
    assert len(load_items(sample, outside)) == 200
    own = outside / "deploy" / "datasets" / "arithmetic.jsonl"
    own.parent.mkdir(parents=True)
    own.write_text('{"input": "1+1", "expected": "2"}\n')
    assert len(load_items(sample, outside)) == 1


async def test_migrating_from_a_missing_or_empty_folder_is_an_error_naming_it(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a migration")
    for folder in (tmp_path / "missing", empty):
        with pytest.raises(ConfigError, match=str(folder)):
            db.migration_files(folder)
        with pytest.raises(ConfigError, match=str(folder)):
            await db.migrate(
                postgres.owner_url,
                app_role="konstruct_app",
                app_password="konstruct-app",
                directory=folder,
            )
    assert db.migrations_dir() == deploy_dir() / "migrations"


def test_migrate_says_loudly_when_it_gives_an_existing_role_a_new_password(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    role = f"konstruct_app_{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONSTRUCT_")}
    env["KONSTRUCT_DATABASE_URL"] = postgres.owner_url
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")

    def migrate(state: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KONSTRUCT, "--state-dir", str(tmp_path / state), "migrate"],
            capture_output=True,
            text=True,
            env={**env, "KONSTRUCT_CONFIG": str(config)},
            timeout=120,
            cwd=str(ROOT),
        )

    config = tmp_path / "konstruct.yaml"
    config.write_text(f"postgres: {{app_role: {role}}}\n")
    first = migrate("first")
    assert first.returncode == 0, first.stderr
    assert "generated a password" in first.stdout and "warning" not in first.stderr
    # Another state directory, same database and role: the role gets a new password,
    # and migrate says so on stderr, naming the file.
    second = migrate("second")
    assert second.returncode == 0, second.stderr
    stored = tmp_path / "second" / "app-db-password"
    assert "already existed" in second.stderr and str(stored) in second.stderr, second.stderr
    assert "NEW password" in second.stderr
    # Once the directory holds the role's password, migrate keeps it and says nothing of it.
    again = migrate("second")
    assert again.returncode == 0 and "password" not in again.stdout + again.stderr
