"""Real servers for the tests: PostgreSQL, the Temporal dev server, the simulator, workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from konstruct.processes import free_port, kill_with_parent, stop_process, wait_for_port
from konstruct.simulator_admin import SimulatorAdmin
from konstruct.stack import dev_server_command

ROOT = Path(__file__).resolve().parent.parent
# A secret-looking key: the history scan proves it never reaches Temporal.
SIMULATOR_TEST_KEY = "sk-sim-TEST-SECRET-" + "7f3a9c1e5b2d4f60"


@dataclass
class ManagedProcess:
    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(ROOT),
                start_new_session=True,
                preexec_fn=kill_with_parent,
            )

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        """kill -9: no cleanup, no graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for_log(self, marker: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_path.read_text(errors="replace"):
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.command[:3]} did not print {marker!r}:\n{self.log_tail()}")


@dataclass
class DevServer(ManagedProcess):
    port: int = 0
    ui_port: int = 0

    @classmethod
    def create(cls, tmp: Path, db_file: Path | None = None) -> DevServer:
        port, ui_port = free_port(), free_port()
        command = dev_server_command(port, ui_port, "default", db_file)
        return cls(
            command=command, log_path=tmp / f"temporal-{port}.log", port=port, ui_port=ui_port
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        if not wait_for_port(self.port, 60, self.process):
            raise RuntimeError(f"dev server did not start:\n{self.log_tail()}")


@dataclass
class SimulatorProcess(ManagedProcess):
    port: int = 0

    @classmethod
    def create(cls, tmp: Path, config: Path) -> SimulatorProcess:
        port = free_port()
        env = dict(os.environ, SIMULATOR_API_KEY=SIMULATOR_TEST_KEY)
        command = [
            sys.executable,
            "-m",
            "konstruct.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
            "--api-key-env",
            "SIMULATOR_API_KEY",
        ]
        return cls(command=command, log_path=tmp / f"simulator-{port}.log", env=env, port=port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        if not wait_for_port(self.port, 30, self.process):
            raise RuntimeError(f"simulator did not start:\n{self.log_tail()}")


@dataclass
class WorkerProcess(ManagedProcess):
    """A worker in its own process, so a test can kill -9 it."""

    @classmethod
    def create(cls, tmp: Path, env: dict[str, str], name: str) -> WorkerProcess:
        return cls(
            command=[sys.executable, "-m", "workers.main"],
            log_path=tmp / f"worker-{name}.log",
            env=env,
        )

    def start(self) -> None:
        super().start()
        self.wait_for_log("worker ready", 60)


async def call_in_flight(sim: SimulatorAdmin, model: str, polls: int) -> bool:
    """Poll every 50 ms until the simulator is answering a call to `model`."""
    for _ in range(polls):
        if (await sim.model_stats(model)).get("in_flight", 0) >= 1:
            return True
        await asyncio.sleep(0.05)
    return False
