"""Session fixtures: one real PostgreSQL, Temporal dev server and simulator for the suite.

Each test gets its own task queue and workflow ids; a test that changes a
simulator profile gets the baseline back afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from temporalio.client import Client

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.app.processes import free_port
from konstruct.config import Settings, load_settings
from konstruct.platform import db
from konstruct.platform.temporal.client import connect
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import (
    ROOT,
    SIMULATOR_TEST_KEY,
    TEST_KEYS,
    DevServer,
    Hooks,
    SimulatorProcess,
    WorkerProcess,
    WorkerRelay,
    serve_locally,
)
from workers.main import build_worker

SIMULATOR_CONFIG = ROOT / "tests" / "simulator.yaml"
# A hung test fails with where it waits, and the suite goes on.
pytest_plugins = ["tests.hang_guard"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked `slow` first, each file's tests in their order. The two xdist
    processes take whole files from this order (`--no-loadscope-reorder`); xdist's
    own order, by number of tests, left the one-test files that run longest (the
    chaos soak, ~100 s) to the end, where one process ran them alone. Every
    process collects the same order, as xdist requires."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    """The session's servers' data and logs. Not under pytest's base temp: pytest
    keeps only a user's three newest of those, so a second pytest run on the machine
    deleted a running session's PostgreSQL data directory (ci40: every test of one
    xdist process after that failed with connection refused)."""
    path = Path(tempfile.mkdtemp(prefix="konstruct-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(session_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(session_dir / "pgdata", free_port())
    server.start()

    async def prepare() -> None:
        await db.migrate(server.owner_url, app_role="konstruct_app", app_password="konstruct-app")
        await db.seed_demo(server.owner_url)

    asyncio.run(prepare())
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def simulator(session_dir: Path) -> Iterator[SimulatorProcess]:
    process = SimulatorProcess.create(session_dir, SIMULATOR_CONFIG)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def dev_server(session_dir: Path) -> Iterator[DevServer]:
    server = DevServer.create(session_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def environ(
    postgres: EmbeddedPostgres, simulator: SimulatorProcess, dev_server: DevServer
) -> dict[str, str]:
    """The environment a worker of this session runs with (also exported to this process)."""
    values = {
        "KONSTRUCT_CONFIG": str(ROOT / "temporal-dev.yaml"),
        "TEMPORAL_ADDRESS": dev_server.address,
        "KONSTRUCT_DATABASE_URL": postgres.owner_url,
        "SIMULATOR_API_BASE": simulator.url + "/v1",
        "SIMULATOR_API_KEY": SIMULATOR_TEST_KEY,
        # The app role's password, as the session's migration set it.
        "KONSTRUCT_APP_DB_PASSWORD": "konstruct-app",
        # Payloads are encrypted in every history of the suite, as by default.
        "KONSTRUCT_ENCRYPTION_KEYS": TEST_KEYS,
    }
    os.environ.update(values)
    return dict(os.environ)


@pytest.fixture(scope="session")
def settings(environ: dict[str, str]) -> Settings:
    return load_settings(environ=environ)


@pytest.fixture(scope="session")
async def client(settings: Settings) -> Client:
    return await connect(settings)


@pytest.fixture(scope="session")
async def app_pool(settings: Settings) -> AsyncIterator:
    pool = await db.create_pool(db.app_url(settings))
    yield pool
    await pool.close()


@pytest.fixture
async def sim(simulator: SimulatorProcess) -> AsyncIterator[SimulatorAdmin]:
    admin = SimulatorAdmin(simulator.url)
    await admin.reset()
    yield admin
    await admin.real_clock()  # a test may have frozen the limiters' clock
    baseline = yaml.safe_load(SIMULATOR_CONFIG.read_text())["models"]
    for model, profile in baseline.items():
        await admin.set_profile(
            model,
            **{
                "latency_ms": 0,
                "latency_jitter_ms": 0,
                "rate_limit_shape": "token_bucket",
                "rate_limit_rps": None,
                "rate_limit_burst": 1,
                "rate_limit_window_s": 60.0,
                "rate_limit_requests": None,
                "rate_limit_tokens": None,
                "quota_requests": None,
                "error_rate": 0,
                "hang_rate": 0,
                "outage": False,
                "json_mismatch_rate": 0,
                "json_mismatch_first": 0,
                "ttft_ms": 0,
                "inter_token_ms": 0,
                **profile,
            },
        )
    await admin.close()


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def worker(client: Client, settings: Settings, task_queue: str) -> AsyncIterator[str]:
    """An in-process worker on this test's task queue; yields the queue name."""
    async with build_worker(client, settings, task_queue) as w, w:
        yield task_queue


@pytest.fixture
def cli_worker(worker: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The in-process worker's task queue, set as KONSTRUCT_TASK_QUEUE: the CLI the
    test runs starts its work there."""
    monkeypatch.setenv("KONSTRUCT_TASK_QUEUE", worker)
    return worker


@pytest.fixture
def worker_process(
    environ: dict[str, str], session_dir: Path, task_queue: str
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers in their own processes (for kill -9), with more environment
    variables if given; all stopped at the end."""
    started: list[WorkerProcess] = []

    def start(name: str, **more_env: str) -> WorkerProcess:
        env = dict(environ, KONSTRUCT_TASK_QUEUE=task_queue, **more_env)
        process = WorkerProcess.create(session_dir, env, f"{task_queue}-{name}")
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def relay(sim: SimulatorAdmin, worker_process: Callable[[str], WorkerProcess]) -> WorkerRelay:
    """A worker process to kill -9 mid-call and one to take over (on this test's queue)."""
    return WorkerRelay(sim, worker_process)


@pytest.fixture(scope="session")
def span_exporter():  # type: ignore[no-untyped-def]
    """Every span of this test process, in memory (the global provider can be set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


# --- experiments ---
@pytest.fixture(scope="session")
def experiment_settings(settings: Settings) -> Settings:
    """The session settings with breaker cooldown and backoff short enough for tests."""
    return settings.model_copy(
        update={
            "experiments": settings.experiments.model_copy(
                update={"breaker_cooldown_s": 1.5, "probe_after_s": 0.5}
            )
        }
    )


@pytest.fixture
async def experiment_worker(
    client: Client, experiment_settings: Settings, task_queue: str
) -> AsyncIterator[str]:
    """An in-process worker (with provider workers) using `experiment_settings`."""
    async with build_worker(client, experiment_settings, task_queue) as w, w:
        yield task_queue


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    state = Hooks()

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        key = request.headers.get("Idempotency-Key", "")
        state.requests.append(
            {
                "path": request.path,
                "key": key,
                "secret": request.headers.get("X-Hook-Secret"),
                "body": body,
            }
        )
        state.arrived.set()
        if request.path == "/big":
            return web.json_response({"result": "x" * 10_000})
        if request.path == "/flaky":
            return web.json_response({"error": "down for maintenance"}, status=503)
        if key in state.answers:
            # A webhook that honours the idempotency key answers a retry from its record.
            return web.json_response({"result": state.answers[key]})
        if request.path == "/slow" and state.hold_first and len(state.keys("/slow")) == 1:
            # Held until the test ends (its caller is killed meanwhile).
            await state.release.wait()
        state.executed[key] += 1
        answer = f"hook {request.path} got {json.dumps(body['arguments'], sort_keys=True)}"
        state.answers[key] = answer
        return web.json_response({"result": answer})

    app = web.Application()
    app.router.add_post("/{name}", handle)

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="the page says hello")

    app.router.add_get("/page", page)
    async with serve_locally(app) as url:
        state.url = url
        yield state
        # A held request would keep `cleanup` waiting out its 60 s shutdown timeout.
        state.release.set()


@pytest.fixture
async def talker_tenant(app_pool: Any) -> tuple[str, str]:
    """A new tenant with one agent, `talker` (no tools), and a gateway key: (tenant, key)."""
    from konstruct.agents.models import AgentProfile
    from konstruct.agents.store.agents import put_agent
    from konstruct.agents.store.keys import create_key

    tenant = f"tt-{uuid.uuid4().hex[:8]}"
    async with db.tenant_transaction(app_pool, tenant) as conn:
        await put_agent(
            conn,
            tenant,
            AgentProfile(agent_id="talker", name="Tal", role="a talker", fallback_reply="Sorry."),
        )
        _, key = await create_key(conn, tenant)
    return tenant, key
