"""`konstruct up` / `down` as a user runs them: subprocesses, real ports, nothing left behind."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from konstruct.processes import free_port
from tests.support import ROOT

KONSTRUCT = [sys.executable, "-m", "konstruct.cli"]


@pytest.fixture
def stack_config(tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "stack.yaml"
    ports = {name: free_port() for name in ("temporal", "ui", "postgres", "simulator")}
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"temporal: {{port: {ports['temporal']}, ui_port: {ports['ui']}}}\n"
        f"postgres: {{port: {ports['postgres']}}}\n"
        f"simulator: {{port: {ports['simulator']}, config: {ROOT / 'deploy' / 'simulator.yaml'}}}\n"
        f"llm: {{router_config: {ROOT / 'deploy' / 'llm-router.yaml'}}}\n"
    )
    yield config
    subprocess.run([*KONSTRUCT, "--config", str(config), "down"], env=clean_env(), timeout=90)


def clean_env() -> dict[str, str]:
    """The environment of a fresh shell: none of the test session's overrides."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KONSTRUCT_", "TEMPORAL_", "SIMULATOR_"))
    }


def run(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KONSTRUCT, "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=timeout,
        cwd=str(ROOT),
    )


def temporal_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["temporal"]["port"])


def children(config: Path) -> list[int]:
    pids_file = config.parent / "state" / "stack.children"
    return [int(p) for p in pids_file.read_text().split()]


def assert_all_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left behind: {alive}")


def test_up_detach_send_status_down_leaves_nothing(stack_config: Path) -> None:
    up = run(stack_config, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "http://localhost:" in up.stdout
    pids = children(stack_config)
    assert len(pids) == 4  # temporal, simulator, worker, postgres

    again = run(stack_config, "up", "--detach")
    assert again.returncode == 2 and "already running" in again.stderr

    reply = run(stack_config, "send", "demo", "assistant", "What are you?")
    assert reply.returncode == 0, reply.stderr
    assert "AI" in reply.stdout

    # The command the banner prints works as pasted (pointed at this stack's port).
    printed = next(line for line in up.stdout.splitlines() if "temporal workflow execute" in line)
    address = f"127.0.0.1:{temporal_port(stack_config)}"
    executed = subprocess.run(
        [*shlex.split(printed), "--address", address, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(clean_env(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    assert executed.returncode == 0, executed.stdout + executed.stderr
    assert '"degraded": false' in executed.stdout

    assert run(stack_config, "status").returncode == 0
    down = run(stack_config, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert_all_gone(pids)
    assert run(stack_config, "status").returncode == 3


def test_foreground_up_stops_every_child_on_ctrl_c(stack_config: Path) -> None:
    process = subprocess.Popen(
        [*KONSTRUCT, "--config", str(stack_config), "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        cwd=str(ROOT),
    )
    ready = stack_config.parent / "state" / "stack.ready"
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "stack never became ready"
        time.sleep(0.2)
    pids = children(stack_config)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert "Konstruct is up." in output and "stopped." in output
    assert_all_gone(pids)


def test_a_port_in_use_is_named(stack_config: Path) -> None:
    port = temporal_port(stack_config)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = run(stack_config, "up", "--detach", timeout=60)
    assert result.returncode == 2
    assert f"port {port} (Temporal frontend) is already in use" in result.stderr
