"""Real servers for the tests: PostgreSQL, the Temporal dev server, the simulator, workers."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvicorn
from aiohttp import web
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from konstruct.app.gateway import create_app
from konstruct.app.processes import ManagedProcess, free_port
from konstruct.app.stack import dev_server_command, simulator_command, temporal_test_server
from konstruct.config import Settings
from konstruct.platform.temporal.codec import EncryptionCodec, KeyRing
from konstruct.platform.temporal.plugin import KonstructPlugin
from konstruct.platform.temporal.search_attributes import SEARCH_ATTRIBUTES
from konstruct.providers.simulator.admin import SimulatorAdmin

ROOT = Path(__file__).resolve().parent.parent
HISTORIES = ROOT / "tests" / "histories"
# A secret-looking key: the history scan proves it never reaches Temporal.
SIMULATOR_TEST_KEY = "sk-sim-TEST-SECRET-" + "7f3a9c1e5b2d4f60"
# The CLI as a person starts it.
KONSTRUCT = [sys.executable, "-m", "konstruct"]

__all__ = [
    "HISTORIES",
    "KONSTRUCT",
    "ROOT",
    "SIMULATOR_TEST_KEY",
    "TAKEOVER_TASK_TIMEOUT",
    "DevServer",
    "ManagedProcess",
    "SimulatorProcess",
    "WorkerProcess",
    "WorkerRelay",
    "call_in_flight",
    "konstruct",
    "recorded_histories",
    "replay_all",
    "replayer",
    "serve_locally",
]


def konstruct(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`konstruct ARGS...` in a subprocess with environment `env`, its output captured.
    One still running after `timeout` fails the test with its output and every
    thread's stack (the CLI writes them on SIGUSR1), then is killed: ci102's `send`
    printed its reply and never ended, and said nothing of where it waited."""
    command = [*KONSTRUCT, *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        with suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=5)  # the stacks, written as it goes on
        process.kill()
        out, err = process.communicate()
        pytest.fail(
            f"`konstruct {' '.join(args)}` still running after {timeout} s;"
            f" its stdout: {out!r}; its stderr and stacks:\n{err}"
        )
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@asynccontextmanager
async def serve_locally(app: web.Application, shutdown_timeout: float = 60.0) -> AsyncIterator[str]:
    """`app` on a free port of 127.0.0.1 while the block runs; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class _Server(ManagedProcess):
    """A process that has started once it accepts connections on `port`."""

    cwd: Path | None = ROOT
    port: int = 0
    startup_s: ClassVar[float] = 30

    def start(self) -> None:
        super().start()
        self.wait_for_port(self.port, self.startup_s)


@dataclass
class DevServer(_Server):
    ui_port: int = 0
    startup_s: ClassVar[float] = 60

    @classmethod
    def create(cls, tmp: Path, db_file: Path | None = None) -> DevServer:
        port, ui_port = free_port(), free_port()
        command = dev_server_command(port, ui_port, "default", db_file)
        # The server delays the first task of a run that continues as new less than
        # this long (1 s by default) after its previous run started: the tests' small
        # `continue_as_new_every` made most of their runs wait it out. No test relies
        # on it; a workflow id's reuse after a terminate is also at once.
        command += ["--dynamic-config-value", "history.workflowIdReuseMinimalInterval=0"]
        return cls(
            command=command, log_path=tmp / f"temporal-{port}.log", port=port, ui_port=ui_port
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class SimulatorProcess(_Server):
    @classmethod
    def create(cls, tmp: Path, config: Path) -> SimulatorProcess:
        port = free_port()
        env = dict(os.environ, SIMULATOR_API_KEY=SIMULATOR_TEST_KEY)
        command = simulator_command(port, config, "SIMULATOR_API_KEY")
        return cls(command=command, log_path=tmp / f"simulator-{port}.log", env=env, port=port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class WorkerProcess(ManagedProcess):
    """A worker in its own process, so a test can kill -9 it."""

    cwd: Path | None = ROOT

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


# The workflow task timeout of a workflow whose worker a kill -9 test kills mid local
# activity: the server hands the task to another worker only once it times out (10 s by
# default). 3 s is under the take-over worker's start-up, so it costs that wait nothing;
# a slower workflow task than that on a busy machine is retried, as after the kill.
TAKEOVER_TASK_TIMEOUT = timedelta(seconds=3)


@dataclass
class WorkerRelay:
    """Two worker processes in turn, for the kill -9 tests: the first dies mid-call to a
    slowed model, the second finishes the work."""

    sim: SimulatorAdmin
    start_worker: Callable[[str], WorkerProcess]
    model: str = ""
    first: WorkerProcess | None = None

    async def start_slow(self, model: str, latency_ms: int) -> None:
        """Slow `model` down, then start the first worker."""
        self.model = model
        await self.sim.set_profile(model, latency_ms=latency_ms)
        self.first = self.start_worker("a")

    async def hand_over(self, latency_ms: int) -> int:
        """kill -9 the first worker, give the model `latency_ms`, start the second.

        Returns how many calls to the model were in flight right after the kill.
        """
        in_flight = await self.kill_first()
        await self.take_over(latency_ms)
        return in_flight

    async def kill_first(self) -> int:
        """kill -9 the first worker; the calls to the model in flight at that moment."""
        assert self.first is not None, "start_slow first"
        # Read just before and just after the kill: the simulator may notice a dropped
        # connection at once, so the count after alone can miss a call in flight.
        before = (await self.sim.model_stats(self.model)).get("in_flight", 0)
        self.first.kill()
        after = (await self.sim.model_stats(self.model)).get("in_flight", 0)
        return max(before, after)

    async def take_over(self, latency_ms: int) -> None:
        """Give the model `latency_ms` and start the second worker."""
        await self.sim.set_profile(self.model, latency_ms=latency_ms)
        self.start_worker("b")


async def wait_for_calls(sim: SimulatorAdmin, model: str, ok: int, in_flight: int) -> None:
    """Poll every 50 ms (20 s at most) until `model` answered `ok` calls and has
    `in_flight` more in progress: the moment a kill -9 test kills its worker."""
    for _ in range(400):
        stats = await sim.model_stats(model)
        if stats.get("ok", 0) >= ok and stats.get("in_flight", 0) >= in_flight:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the calls never got going")


async def call_in_flight(sim: SimulatorAdmin, model: str, polls: int) -> bool:
    """Poll every 50 ms until the simulator is answering a call to `model`."""
    for _ in range(polls):
        if (await sim.model_stats(model)).get("in_flight", 0) >= 1:
            return True
        await asyncio.sleep(0.05)
    return False


# The suite's payload key: fixed and committed, so histories recorded encrypted
# replay in later runs. A test key, never used outside the tests.
TEST_KEYS = "test-1:" + base64.b64encode(bytes(range(32))).decode()


def suite_codec() -> EncryptionCodec:
    return EncryptionCodec(KeyRing.parse(TEST_KEYS, "TEST_KEYS"))


def replayer(*workflows: type) -> Replayer:
    """A replayer wired as every worker is, by KonstructPlugin (with the suite's key:
    encrypted histories decode, plain ones recorded before encryption pass as they are)."""
    return Replayer(workflows=list(workflows), plugins=[KonstructPlugin(suite_codec())])


def recorded_histories(*patterns: str) -> dict[str, WorkflowHistory]:
    """The histories in tests/histories matching each glob, by file stem (the workflow id)."""
    paths = [path for pattern in patterns for path in sorted(HISTORIES.glob(pattern))]
    return {path.stem: WorkflowHistory.from_json(path.stem, path.read_text()) for path in paths}


async def replay_all(
    replayer: Replayer, histories: dict[str, WorkflowHistory], record_as: str | None = None
) -> None:
    """Replay every history, failing with the name of one that does not replay.

    With `record_as` and KONSTRUCT_RECORD_HISTORIES=1, each history that
    replays is (re)written to tests/histories/<record_as><name>.json; commit
    them when a change to the workflow is intended.
    """
    record = record_as is not None and os.environ.get("KONSTRUCT_RECORD_HISTORIES") == "1"
    for name, history in histories.items():
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, f"{name}: {result.replay_failure}"
        if record:
            (HISTORIES / f"{record_as}{name}.json").write_text(history.to_json())


@dataclass
class Hooks:
    """Webhook tools served in the test: what each received, by Idempotency-Key."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    executed: Counter[str] = field(default_factory=Counter)
    answers: dict[str, str] = field(default_factory=dict)
    hold_first: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # Set at teardown: ends the request `hold_first` holds.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def keys(self, path: str) -> list[str]:
        return [r["key"] for r in self.requests if r["path"] == path]


@asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server, wired as the suite's clients are, with the
    Konstruct search attributes registered (the dev server registers them at start)."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=temporal_test_server(), plugins=[KonstructPlugin(suite_codec())]
    )
    try:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in SEARCH_ATTRIBUTES
                },
            )
        )
        yield env
    finally:
        await env.shutdown()


@asynccontextmanager
async def gateway_process(
    client: Client, settings: Settings, task_queue: str | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """A gateway while the block runs: its /v1 URL and the Gateway. Its own task
    queue and in-process worker; or, given a `task_queue`, no worker (the test runs
    the queue's workers)."""
    app = create_app(
        client,
        settings,
        task_queue or f"tq-gw-{uuid.uuid4().hex[:8]}",
        host_worker=task_queue is None,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the gateway did not start"
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    gateway = app.state.gateway
    for _ in range(100):  # the approval listener connects in the background
        if gateway.notices.connected:
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", gateway
    finally:
        server.should_exit = True
        await serving
