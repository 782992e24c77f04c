"""`konstruct up | down | status | worker | migrate`."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from konstruct import db
from konstruct.cli.common import run_async, settings_of
from konstruct.errors import StackError
from konstruct.processes import port_in_use
from konstruct.stack import Stack, running_pid


def register(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start the whole dev stack (foreground; Ctrl-C stops)")
    up.add_argument("--detach", action="store_true", help="start in the background and return")
    up.set_defaults(handler=cmd_up)
    commands.add_parser("down", help="stop a detached stack").set_defaults(handler=cmd_down)
    commands.add_parser("status", help="what of the stack is running").set_defaults(
        handler=cmd_status
    )
    commands.add_parser(
        "worker", help="run one worker against the configured Temporal and PostgreSQL"
    ).set_defaults(handler=cmd_worker)
    commands.add_parser(
        "migrate", help="apply database migrations and create the app role"
    ).set_defaults(handler=cmd_migrate)


def cmd_up(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.detach:
        return _up_detached(args, settings)
    stack = Stack(settings)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        reason = stack.wait()
        print(f"\nstopping ({reason}) ...", flush=True)
    finally:
        stack.stop()
    print("stopped.")
    return 0


def _up_detached(args: argparse.Namespace, settings) -> int:  # type: ignore[no-untyped-def]
    stack = Stack(settings)
    pid = running_pid(settings)
    if pid is not None:
        raise StackError(f"Konstruct is already running (pid {pid}); `konstruct down` stops it")
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = stack.state_dir / "stack.log"
    command = [sys.executable, "-m", "konstruct.cli"]
    if args.config:
        command += ["--config", args.config]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command + ["up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if stack.ready_file.exists():
            print(stack.banner().replace("Ctrl-C stops everything.", "`konstruct down` stops it."))
            return 0
        if process.poll() is not None:
            raise StackError(f"the stack failed to start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise StackError(f"the stack did not become ready in 180 s; see {log_path}")


def cmd_down(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    pid = running_pid(settings)
    if pid is None:
        print("Konstruct is not running.")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if running_pid(settings) is None:
            print("stopped.")
            return 0
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    print("stack did not stop in 60 s; killed it (children follow via parent-death signal).")
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    stack = Stack(settings)
    pid = running_pid(settings)
    ready = stack.ready_file.exists()
    print(
        f"stack      {'running, pid ' + str(pid) if pid else 'not running'}"
        f"{' (ready)' if pid and ready else ''}"
    )
    checks = {
        "temporal": settings.temporal.port,
        "web ui": settings.temporal.ui_port,
        "simulator": settings.simulator.port,
    }
    if settings.postgres.url is None:
        checks["postgres"] = settings.postgres.port
    for name, port in checks.items():
        print(f"{name:<10} port {port}: {'up' if port_in_use(port) else 'down'}")
    return 0 if pid else 3


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from workers.main import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_async(run_worker(settings_of(args)))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    owner = db.owner_url(settings)
    applied = run_async(
        db.migrate(
            owner, app_role=settings.postgres.app_role, app_password=settings.postgres.app_password
        )
    )
    run_async(db.seed_demo(owner))
    print(f"applied: {', '.join(applied) or 'nothing new'}")
    return 0
