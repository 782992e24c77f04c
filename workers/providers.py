"""Two Workers per provider: its rate-limited task queue, and its batch queue (the
batches of runs recorded before `BATCHES_ON_WORKFLOW_QUEUE`; later runs schedule
theirs on the workflow's own queue, whose Worker runs what `provider_workers` yields).

The Temporal server dispatches each `ProviderQueue(task_queue, provider)` at the provider's
adaptive rate, summed over every worker process; this module also keeps the
server's limit equal to the rate in PostgreSQL (the call that changes the rate
pushes it at once; this loop repairs a push that was lost or overtaken) and ages
what was learned of a provider that has been idle (`store.age_idle`), each second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from temporalio.client import Client
from temporalio.worker import Worker

from activities.agent_items import AgentItemActivities, ExperimentAgentSteps
from activities.provider_batches import ProviderBatchActivities
from activities.provider_calls import ProviderCallActivities
from konstruct.config import Settings
from konstruct.platform.naming import ProviderQueue
from konstruct.providers.control import AimdConfig
from konstruct.providers.queue_limits import push_rate, pushes_settled
from konstruct.providers.router import RouterConfig
from konstruct.providers.store import age_idle, current_rates

log = logging.getLogger("konstruct.worker.providers")
_meter = metrics.get_meter("konstruct.experiments")
# Pushed again even unchanged this often, in case another process overwrote it.
_REPUSH_EVERY_S = 10.0
_SYNC_EVERY_S = 1.0


@asynccontextmanager
async def provider_workers(
    client: Client,
    settings: Settings,
    task_queue: str,
    pool: asyncpg.Pool,
    router_config: RouterConfig,
    router: Any = None,
) -> AsyncIterator[list[Callable[..., Any]]]:
    """Runs the provider queues' Workers; yields the activities the main queue's
    Worker runs too: an Experiment's batches, started by the worker that schedules
    them (Temporal's eager activity dispatch) instead of waiting for the server's
    matching. `router`: what an agent item's `knowledge_search` embeds its query
    with (its model calls go through the provider pipeline, not the Router)."""
    calls = ProviderCallActivities(pool, router_config, settings.experiments, task_queue)
    batches = ProviderBatchActivities(calls)
    agent_items = AgentItemActivities(
        calls,
        ExperimentAgentSteps(
            calls,
            pool,
            router,
            router_config,
            address_policy=settings.tools.address_policy(),
        ),
    )
    providers = sorted({d.provider for d in router_config.active()})
    workers = [
        Worker(
            client,
            task_queue=queue,
            activities=activities,
            max_concurrent_activities=settings.worker.max_concurrent_activities,
            graceful_shutdown_timeout=timedelta(seconds=settings.worker.graceful_shutdown_seconds),
        )
        for provider in providers
        for queue, activities in _queues(
            ProviderQueue(task_queue, provider), calls, batches, agent_items
        )
    ]
    rates: dict[str, float] = {}

    def observe_rates(_options: CallbackOptions) -> list[Observation]:
        return [Observation(r, {"provider": p}) for p, r in rates.items()]

    def observe_slots(_options: CallbackOptions) -> list[Observation]:
        size = settings.worker.max_concurrent_activities
        return [Observation(n / size, {"provider": p}) for p, n in calls.in_progress.items()]

    _meter.create_observable_gauge(
        "konstruct.provider.rate", [observe_rates], unit="1/s", description="adaptive rate"
    )
    _meter.create_observable_gauge(
        "konstruct.provider.slot_utilisation",
        [observe_slots],
        description="provider calls in progress / activity slots, this worker",
    )
    sync = asyncio.create_task(
        _sync_rates(client, pool, task_queue, providers, rates, settings.experiments)
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            for worker in workers:
                await stack.enter_async_context(worker)
            yield [batches.run_batch]
    finally:
        sync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sync
        await pushes_settled()


def _queues(
    queue: ProviderQueue,
    calls: ProviderCallActivities,
    batches: ProviderBatchActivities,
    agent_items: AgentItemActivities,
) -> list[tuple[str, Sequence[Callable[..., Any]]]]:
    """A provider's two queues and the activities each runs."""
    return [
        (queue.name, [calls.run_item, calls.judge_item, agent_items.run_agent_item]),
        (queue.batch_name, [batches.run_batch]),
    ]


async def _sync_rates(
    client: Client,
    pool: asyncpg.Pool,
    task_queue: str,
    providers: list[str],
    rates: dict[str, float],
    aimd: AimdConfig,
) -> None:
    pushed: dict[str, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with pool.acquire() as conn:
                # A provider idle for a while starts its next calls from an aged rate.
                await age_idle(conn, task_queue, aimd)
                current = await current_rates(conn, task_queue)
            for provider in providers:
                rate = current.get(provider)
                if rate is None:
                    continue
                rates[provider] = rate
                last = pushed.get(provider)
                now = loop.time()
                if last is None or last[0] != rate or now - last[1] > _REPUSH_EVERY_S:
                    queue = ProviderQueue(task_queue, provider).name
                    await push_rate(client, queue, rate, "sync")
                    pushed[provider] = (rate, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # database or server away: try again next round
            log.debug("rate sync failed: %s", exc)
        await asyncio.sleep(_SYNC_EVERY_S)
