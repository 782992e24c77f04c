"""Child processes of the stack, the tests and the benches, started and watched one way."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from konstruct.platform.errors import StackError

_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies.

    So a `konstruct up` that is itself killed -9 leaves no orphan behind.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` or one of its descendants listens on TCP `port`.

    None when the system will not say (another user's process, no permission):
    the caller then settles for the port accepting.
    """
    import psutil  # noqa: PLC0415 - only `up` and the tests start children

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return None
    unknown = False
    for process in tree:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            unknown = True
            continue
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
        ):
            return True
    return None if unknown else False


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """True once `process` (or, without one, anything) listens on the port; False
    on timeout or if `process` exits.

    Another program that took the port between our check that it was free and
    the child's bind accepts on it too: only the child's own listening socket
    says the child came up (it would otherwise exit with "address already in
    use" after `up` reported success).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if port_in_use(port):
            owned = None if process is None else listens_on(process.pid, port)
            if owned is None or owned:
                return True
        time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class ReadyWhen:
    """When a started child is ready: its own process tree listens on each of `ports`,
    and (with `log`) it has logged that line since it started; within `timeout_s`."""

    ports: tuple[int, ...] = ()
    log: str | None = None
    timeout_s: float = 60.0


@dataclass
class ManagedProcess:
    """A child with its output appended to `log_path`.

    It runs in its own session (Ctrl-C reaches only the parent, which stops
    children in order) and gets SIGTERM from the kernel if the parent dies.
    """

    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    name: str = ""
    process: subprocess.Popen[bytes] | None = None
    _log_start: int = 0

    def __post_init__(self) -> None:
        self.name = self.name or self.log_path.stem

    def start(self) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=None if self.cwd is None else str(self.cwd),
                start_new_session=True,
                preexec_fn=kill_with_parent,
            )

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)

    def kill(self) -> None:
        """kill -9: no cleanup, no graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def listens(self, port: int) -> bool:
        """Whether this child (not another program) listens on `port` now."""
        if self.process is None or self.process.poll() is not None or not port_in_use(port):
            return False
        return listens_on(self.process.pid, port) is not False

    def logged(self, marker: str) -> bool:
        """Whether the child logged `marker` since it last started."""
        if not self.log_path.exists():
            return False
        return marker in self.log_path.read_bytes()[self._log_start :].decode(errors="replace")

    def is_ready(self, when: ReadyWhen) -> bool:
        """`when` holds now (no waiting: the supervisor asks again on its next round)."""
        return all(self.listens(p) for p in when.ports) and (
            when.log is None or self.logged(when.log)
        )

    def wait_ready(self, when: ReadyWhen) -> None:
        """Until `when` holds; a StackError with the log's tail if it does not in time."""
        for port in when.ports:
            self.wait_for_port(port, when.timeout_s)
        if when.log is not None:
            self.wait_for_log(when.log, when.timeout_s, fresh=True)

    def wait_for_port(self, port: int, timeout: float) -> None:
        if not wait_for_port(port, timeout, self.process):
            taken = " (another program listens on it)" if port_in_use(port) else ""
            raise StackError(
                f"{self.name} did not come up on port {port}{taken}; log tail:\n{self.log_tail()}"
            )

    def wait_for_log(self, marker: str, timeout: float, fresh: bool = False) -> None:
        """Until the log shows `marker`; `fresh`: written since this start (a
        restarted child appends to the log of its earlier runs)."""
        skip = self._log_start if fresh else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_path.read_bytes()[skip:].decode(errors="replace"):
                return
            if self.exited:
                break
            time.sleep(0.05)
        raise StackError(f"{self.name} did not print {marker!r}; log tail:\n{self.log_tail()}")
