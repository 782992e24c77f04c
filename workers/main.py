"""The Konstruct worker: every workflow and activity, wired together.

Run with `konstruct worker` (or `python -m workers.main`). Several workers on
several machines may poll the same task queue.
"""

from __future__ import annotations

import asyncio
import compileall
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

import workflows
from activities.agent import AgentActivities
from activities.demo import demo_activities
from activities.experiments import ExperimentActivities
from activities.llm import LlmActivities
from activities.messages import MessageActivities
from activities.registry import RegistryActivities
from konstruct.config import Settings, load_settings
from konstruct.platform import db
from konstruct.platform.telemetry import setup_telemetry
from konstruct.platform.temporal.client import connect
from konstruct.providers.router import RouterConfig, build_router, load_router_config
from workers.providers import provider_workers
from workflows.batch_sweep import BatchSweep
from workflows.demo_cascade import DemoCascade
from workflows.experiment import Experiment
from workflows.handle_message import HandleMessage

log = logging.getLogger("konstruct.worker")

WORKFLOWS = [HandleMessage, Experiment, DemoCascade, BatchSweep]


def _activities(
    pool: asyncpg.Pool, router: Any, router_config: RouterConfig, settings: Settings
) -> list[Callable[..., Any]]:
    """Every activity of the main task queue (provider calls run on the provider workers)."""
    messages = MessageActivities(pool)
    llm = LlmActivities(router, router_config)
    experiments = ExperimentActivities(pool, router_config, settings.experiments, settings.base_dir)
    return [
        messages.load_agent_context,
        messages.store_turn,
        llm.call_llm,
        *AgentActivities(
            pool,
            router,
            router_config,
            address_policy=settings.tools.address_policy(),
            mcp_refresh_s=settings.tools.mcp_refresh_seconds,
        ).all(),
        *experiments.all(),
        *RegistryActivities(pool).all(),
        *demo_activities(pool, router, router_config),
    ]


def precompile_workflows() -> None:
    """Write the bytecode of the workflow modules, if it is missing or stale; every
    level down, so the modules of a workflow package (`workflows/experiment/`) too.

    The sandbox imports a workflow's module afresh for every new workflow run;
    without a .pyc (PYTHONDONTWRITEBYTECODE, a fresh checkout) that is a compile
    from source each time: 2-3 ms of CPU per message on this machine. An
    unwritable directory only loses that saving.
    """
    directory = Path(workflows.__file__).parent
    try:
        compileall.compile_dir(directory, quiet=2, workers=1)
    except OSError as exc:
        log.warning("could not write the bytecode of %s: %s", directory, exc)


# A worker started while the Temporal server or PostgreSQL is (re)starting waits
# for them this long instead of exiting with a traceback (`konstruct up` restarts
# every child it sees die, and waits 60 s for a restarted worker's "worker ready").
SERVERS_RESTARTING_WAIT_S = 45.0


@asynccontextmanager
async def build_worker(
    client: Client, settings: Settings, task_queue: str | None = None, **worker_options: Any
) -> AsyncIterator[Worker]:
    """A worker with its database pool and LLM router; closes them on exit.

    Converter and interceptors come from the client's `KonstructPlugin`.
    `worker_options` go to `Worker` as they are (the replay tests pass
    `max_cached_workflows=0`).
    """
    precompile_workflows()
    router_config = load_router_config(settings.path(settings.llm.router_config))
    router = build_router(router_config)
    pool = await db.create_pool(
        db.app_url(settings),
        min_size=settings.postgres.pool_min,
        max_size=settings.postgres.pool_max,
        wait_s=SERVERS_RESTARTING_WAIT_S,
    )
    queue = task_queue or settings.temporal.task_queue
    try:
        # Experiment calls run on one rate-limited queue per provider, beside this one.
        async with provider_workers(
            client, settings, queue, pool, router_config, router
        ) as on_main_queue:
            yield Worker(
                client,
                task_queue=queue,
                workflows=WORKFLOWS,
                activities=[
                    *_activities(pool, router, router_config, settings),
                    *on_main_queue,
                ],
                max_concurrent_activities=settings.worker.max_concurrent_activities,
                max_concurrent_local_activities=settings.worker.max_concurrent_local_activities,
                max_concurrent_workflow_tasks=settings.worker.max_concurrent_workflow_tasks,
                graceful_shutdown_timeout=timedelta(
                    seconds=settings.worker.graceful_shutdown_seconds
                ),
                sticky_queue_schedule_to_start_timeout=timedelta(
                    seconds=settings.worker.sticky_timeout_seconds
                ),
                **worker_options,
            )
    finally:
        await pool.close()


async def run_worker(settings: Settings) -> None:
    setup_telemetry(settings.telemetry)
    client = await connect(settings, refused_wait_s=SERVERS_RESTARTING_WAIT_S)
    async with build_worker(client, settings) as worker:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "worker polling task queue %r on %s (namespace %s)",
            settings.temporal.task_queue,
            settings.temporal.target,
            settings.temporal.namespace,
        )
        print(f"worker ready on task queue {settings.temporal.task_queue}", flush=True)
        async with worker:
            await stop.wait()
            log.info("shutting down: letting running activities finish")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_worker(load_settings()))


if __name__ == "__main__":
    main()
