"""`konstruct up | down | status | worker | migrate | codec-server`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import click

from konstruct.app.cli.common import (
    CliState,
    app_pool,
    pass_state,
    reaching_postgres,
    run_async,
    temporal_client,
)
from konstruct.app.processes import port_in_use
from konstruct.app.stack import (
    MAX_WORKERS,
    Stack,
    StopRequested,
    prepare_database,
    process_gone,
    read_status,
    running_pid,
)
from konstruct.platform.errors import StackError

if TYPE_CHECKING:
    from konstruct.config import Settings

_READY_TIMEOUT_S = 180
_STOP_TIMEOUT_S = 60


@click.command("up")
@click.option("--detach", is_flag=True, help="start in the background and return")
@click.option(
    "--workers",
    type=click.IntRange(1, MAX_WORKERS),
    default=1,
    show_default=True,
    help="worker processes to start",
)
@pass_state
def up(state: CliState, detach: bool, workers: int) -> int:
    """Start the whole dev stack (foreground; Ctrl-C or `konstruct down` stops). A child
    that exits on its own is restarted, with backoff."""
    settings = state.settings
    if detach:
        return _up_detached(settings, workers)
    stack = Stack(settings, workers=workers)

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    try:
        try:
            stack.start()
            print(stack.banner(), flush=True)
            reason = stack.wait(say)
        except StopRequested as stopped:  # SIGINT or SIGTERM while starting
            reason = str(stopped)
        print(f"\nstopping ({reason}) ...", flush=True)
    finally:
        stack.stop()
    print("stopped.")
    return 0


def _up_detached(settings: Settings, workers: int) -> int:
    stack = Stack(settings, workers=workers)
    pid = running_pid(settings)
    if pid is not None:
        raise StackError(
            f"Konstruct is already running from {stack.state_dir} (pid {pid});"
            " `konstruct down` stops it"
        )
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = stack.state_dir / "stack.log"
    # The child finds what this process found, wherever that came from.
    command = [sys.executable, "-m", "konstruct.app.cli", "--state-dir", str(stack.state_dir)]
    if settings.source is not None:
        command += ["--config", str(settings.source)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command + ["up", "--workers", str(workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if stack.ready_file.exists():
            print(stack.banner().replace("Ctrl-C stops everything.", "`konstruct down` stops it."))
            return 0
        if process.poll() is not None:
            raise StackError(f"the stack failed to start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise StackError(f"the stack did not become ready in {_READY_TIMEOUT_S} s; see {log_path}")


@click.command("down")
@pass_state
def down(state: CliState) -> int:
    """Stop the running stack, detached or in the foreground."""
    settings = state.settings
    where = f"state directory {settings.state_path}, from {settings.state_dir_origin}"
    pid = running_pid(settings)
    if pid is None:
        print(f"Konstruct is not running ({where}).")
        return 0
    print(f"stopping Konstruct (pid {pid}, {where}) ...", flush=True)
    # SIGTERM takes Ctrl-C's path in `konstruct up`, whether it is starting or running.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        # Gone: it let go of the state directory's lock (after stopping every child)
        # and the process has ended.
        if running_pid(settings) is None and process_gone(pid):
            print("stopped.")
            return 0
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    print(
        f"stack did not stop in {_STOP_TIMEOUT_S} s; killed it"
        " (children follow via parent-death signal)."
    )
    return 1


@click.command("status")
@pass_state
def status(state: CliState) -> int:
    """What of the stack is running (exit 3 when it is not)."""
    settings = state.settings
    stack = Stack(settings)
    pid = running_pid(settings)
    ready = stack.ready_file.exists()
    print(f"state dir  {stack.state_dir} (from {settings.state_dir_origin})")
    print(
        f"stack      {'running, pid ' + str(pid) if pid else 'not running'}"
        f"{' (ready)' if pid and ready else ''}"
    )
    checks = {
        "temporal": settings.temporal.port,
        "web ui": settings.temporal.ui_port,
        "simulator": settings.simulator.port,
    }
    if settings.temporal.encryption:
        checks["codec"] = settings.temporal.codec_port
    if settings.postgres.url is None:
        checks["postgres"] = settings.postgres.port
    if settings.gateway.enabled:
        checks["gateway"] = settings.gateway.port
    for name, port in checks.items():
        where = f"  {stack.gateway_url}" if name == "gateway" else ""
        print(f"{name:<10} port {port}: {'up' if port_in_use(port) else 'down'}{where}")
    if not pid and any(port_in_use(port) for port in checks.values()):
        print(
            "\nSome of these ports are in use, but no stack runs from this state directory:"
            " another stack or program holds them (name another stack's state directory"
            " with --state-dir or KONSTRUCT_HOME)."
        )
    children = (read_status(settings) or {}).get("children", []) if pid else []
    if children:
        print(f"\n{'child':<12} {'state':<11} {'pid':>7} {'restarts':>8}  last exit")
        for child in children:
            last = child["last_exit"]
            print(
                f"{child['name']:<12} {child['state']:<11} {child['pid'] or '-':>7}"
                f" {child['restarts']:>8}  {'-' if last is None else last}"
            )
    return 0 if pid else 3


@click.command("worker")
@pass_state
def worker(state: CliState) -> int:
    """Run one worker against the configured Temporal and PostgreSQL."""
    import logging

    from workers.main import run_worker

    settings = state.settings

    async def run() -> None:
        # Fail with one line, before the worker starts, when either is not there.
        await temporal_client(settings)
        async with app_pool(settings):
            pass
        await run_worker(settings)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_async(run())
    return 0


@click.command("migrate")
@pass_state
def migrate(state: CliState) -> int:
    """Apply database migrations and create the app role."""
    from konstruct.platform import db

    settings = state.settings
    skipped: list[str] = []
    with reaching_postgres(db.owner_url(settings)):
        ready = run_async(prepare_database(settings, skipped))
    print(f"applied: {', '.join(ready.applied) or 'nothing new'}")
    for message in skipped:
        print(f"warning: {message}", file=sys.stderr)
    note = ready.password_note(settings)
    if note is not None:
        # A new password for a role that had one is news its old users must hear.
        print(note, file=sys.stderr if ready.role_existed else sys.stdout)
    return 0


@click.command("codec-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), help="port (default temporal.codec_port)")
@click.option(
    "--ui-origin",
    "origins",
    multiple=True,
    help="a Web UI origin allowed to call it (default: the dev server's UI)",
)
@pass_state
def codec_server(state: CliState, host: str, port: int | None, origins: tuple[str, ...]) -> int:
    """Decode (and encode) payloads for the Web UI and `temporal --codec-endpoint`."""
    from konstruct.platform.temporal.codec import EncryptionCodec
    from konstruct.platform.temporal.codec_server import serve

    settings = state.settings
    ring = settings.key_ring()
    if ring is None:
        raise StackError("payload encryption is off (temporal.encryption): nothing to decode")
    ui = settings.temporal.ui_port
    token = settings.temporal.codec_token
    serve(
        EncryptionCodec(ring),
        host,
        port or settings.temporal.codec_port,
        list(origins) or [f"http://localhost:{ui}", f"http://127.0.0.1:{ui}"],
        token.get_secret_value() if token is not None else None,
    )
    return 0


@click.command("gateway")
@click.option("--host", help="address to listen on (default gateway.host, 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), help="port (default gateway.port, 8780)")
@pass_state
def gateway(state: CliState, host: str | None, port: int | None) -> int:
    """Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models); hosts a
    worker for the task queue."""
    import logging

    from konstruct.app.gateway import serve

    settings = state.settings

    async def run() -> None:
        await temporal_client(settings)
        async with app_pool(settings):
            pass
        await serve(settings, host, port)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_async(run())
    return 0


COMMANDS = [up, down, status, worker, migrate, codec_server, gateway]
