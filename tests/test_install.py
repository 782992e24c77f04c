"""A non-editable install (`pip install .`) has what `konstruct up` needs and runs from anywhere.

The wheel is built with pip from a copy of the checkout (building in place would leave
`build/` in it) and installed into a fresh virtual environment that borrows this one's
dependencies but not its editable Konstruct: the stack it starts from a folder with no
project reads the migrations, router and simulator configs it ships.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from konstruct.app.processes import free_port
from tests.support import ROOT

NOT_SHIPPED = (
    ".*",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "tests",
    "bench",
    "docs",
)


def pip(command: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """This environment's pip, quiet, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pip", command, "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("checkout") / "konstruct"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    out = tmp_path_factory.mktemp("wheel")
    built = pip(
        "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source), timeout=600
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [path] = out.glob("konstruct-*.whl")
    return path


def test_the_wheel_ships_the_migrations_configs_and_datasets(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    deploy = ROOT / "deploy"
    expected = {
        "deploy/__init__.py",
        "deploy/llm-router.yaml",
        "deploy/simulator.yaml",
        "workers/main.py",
        *(f"deploy/migrations/{p.name}" for p in (deploy / "migrations").glob("*.sql")),
        *(f"deploy/datasets/{p.name}" for p in (deploy / "datasets").iterdir()),
    }
    assert len(expected) > 10
    assert sorted(expected - names) == []


def test_an_installed_konstruct_starts_and_is_found_from_anywhere(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    installed = pip(
        "install", "--no-deps", "--no-index", "--target", str(site), str(wheel), timeout=300
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # The dependencies come from this environment (after the install, and without
    # running its .pth files, so without its editable Konstruct).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KONSTRUCT_", "TEMPORAL_", "SIMULATOR_", "PYTHON"))
    }
    env["XDG_STATE_HOME"] = str(tmp_path / "user-state")
    # The Temporal CLI is a wheel's binary in this environment's bin/.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_dir, nowhere = tmp_path / "run", tmp_path / "nowhere"
    run_dir.mkdir()
    nowhere.mkdir()
    assert not [d for d in (nowhere, *nowhere.parents) if (d / "temporal-dev.yaml").exists()]

    def konstruct(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-m", "konstruct", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=300,
        )

    where = subprocess.run(
        [
            str(python),
            "-c",
            "import konstruct, deploy, workers; print(konstruct.__file__,"
            " deploy.__file__, workers.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=nowhere,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    # Ports of this test's own; nothing else: router, simulator and datasets are the shipped ones.
    ports = {name: free_port() for name in ("t", "ui", "codec", "pg", "sim", "gw")}
    (run_dir / "ports.yaml").write_text(
        f"temporal: {{port: {ports['t']}, ui_port: {ports['ui']}, codec_port: {ports['codec']}}}\n"
        f"postgres: {{port: {ports['pg']}}}\nsimulator: {{port: {ports['sim']}}}\n"
        f"gateway: {{port: {ports['gw']}}}\n"
    )
    state = tmp_path / "state"
    try:
        up = konstruct(
            run_dir, "--config", "ports.yaml", "--state-dir", str(state), "up", "--detach"
        )
        assert up.returncode == 0, up.stdout + up.stderr
        migrations = len(list((ROOT / "deploy" / "migrations").glob("*.sql")))
        log = (state / "stack.log").read_text()
        assert f"database ready ({migrations} migrations applied now)" in log, log[-3000:]
        # From a folder with no project above it, every command finds the running stack.
        status = konstruct(nowhere, "status")
        assert status.returncode == 0 and f"state dir  {state}" in status.stdout, status.stdout
        reply = konstruct(nowhere, "send", "demo", "assistant", "What are you?")
        assert reply.returncode == 0 and "AI" in reply.stdout, reply.stdout + reply.stderr
        listed = konstruct(nowhere, "experiments", "list")
        assert listed.returncode == 0, listed.stderr
        down = konstruct(nowhere, "down")
        assert down.returncode == 0 and "stopped." in down.stdout, down.stdout + down.stderr
    finally:
        konstruct(run_dir, "--state-dir", str(state), "down")
    # Nothing was written where the commands ran.
    assert sorted(p.name for p in run_dir.iterdir()) == ["ports.yaml"]
    assert list(nowhere.iterdir()) == []
