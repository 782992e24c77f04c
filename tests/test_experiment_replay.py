"""Determinism: recorded Experiment histories must replay against today's code.

`tests.support.replay_all` says how to record them again from a fresh run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.worker import Worker

from activities.experiments import ExperimentActivities
from konstruct.config import Settings
from konstruct.platform import db
from konstruct.providers.router import load_router_config
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import recorded_histories, replay_all, replayer
from tests.test_experiments import experiment, wait_for
from workers.providers import provider_workers
from workflows.experiment import Experiment


async def test_recorded_histories_replay() -> None:
    histories = recorded_histories("experiment_*.json")
    assert histories, "no recorded Experiment history in tests/histories"
    await replay_all(replayer(Experiment), histories)


async def _runs(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Every run of a workflow id (continue-as-new makes several), oldest first."""
    runs = [execution async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    runs.sort(key=lambda e: e.start_time)
    return [
        await client.get_workflow_handle(workflow_id, run_id=e.run_id).fetch_history() for e in runs
    ]


@asynccontextmanager
async def uncached_worker(
    client: Client, settings: Settings, task_queue: str
) -> AsyncIterator[asyncpg.Pool]:
    """The provider workers and an Experiment worker that caches no workflow, so that
    every workflow task replays from scratch; yields their pool."""
    router_config = load_router_config(settings.path(settings.llm.router_config))
    pool = await db.create_pool(db.app_url(settings), max_size=10)
    acts = ExperimentActivities(pool, router_config, settings.experiments, settings.base_dir)
    try:
        async with provider_workers(
            client, settings, task_queue, pool, router_config
        ) as on_main_queue:
            no_cache = Worker(
                client,
                task_queue=task_queue,
                workflows=[Experiment],
                activities=[*acts.all(), *on_main_queue],
                max_cached_workflows=0,
            )
            async with no_cache:
                yield pool
    finally:
        await pool.close()


async def test_fresh_runs_replay_without_cache(
    client: Client, settings: Settings, task_queue: str, sim: SimulatorAdmin
) -> None:
    """Every workflow task replays from scratch (no cache), then every history replays."""
    await sim.set_profile("sim-fast", latency_ms=100)
    judged = experiment(
        20,
        evals=[
            {"kind": "exact_match"},
            {"kind": "llm_judge", "model_group": "judge", "rubric": "right?"},
        ],
        max_concurrency=3,
        options={"continue_as_new_every": 4, "toggle_cooldown_s": 0.0},
    )
    bad = experiment(3, evals=[{"kind": "bleu"}])
    histories: dict[str, WorkflowHistory] = {}
    async with uncached_worker(client, settings, task_queue):
        handle = await client.start_workflow(
            Experiment.run, judged, id=judged["experiment_id"], task_queue=task_queue
        )
        await wait_for(handle, lambda p: p.evaluated >= 2)
        await handle.signal(Experiment.stop)
        await wait_for(handle, lambda p: p.status == "stopped")
        await asyncio.sleep(0.2)
        await handle.signal(Experiment.resume)
        await handle.result()
        for index, history in enumerate(await _runs(client, judged["experiment_id"])):
            histories[f"judged_stop_resume_{index}"] = history
        # A spent quota pauses the run; a resume finishes it.
        await sim.set_profile(
            "sim-fast", latency_ms=20, rate_limit_shape="daily_quota", quota_requests=3
        )
        quota = experiment(8, max_concurrency=2, options={"toggle_cooldown_s": 0.0})
        paused = await client.start_workflow(
            Experiment.run, quota, id=quota["experiment_id"], task_queue=task_queue
        )
        await wait_for(paused, lambda p: p.status == "paused")
        await sim.set_profile("sim-fast", rate_limit_shape="token_bucket")
        await paused.signal(Experiment.resume)
        await paused.result()
        histories["quota_pause_resume"] = await paused.fetch_history()
        # Batched task calls, a limit that falls mid-run (429s handed to single
        # calls), and a stop and resume between batches.
        await sim.set_profile("sim-fast", latency_ms=50, rate_limit_rps=1000)
        # Enough items that the stop lands mid-run: 65 left when 15 are done, more
        # than 4 s at the 15/s limit set before the stop (60 in all could finish, at
        # 50/s, between the progress that showed 15 done and the signal).
        batched = experiment(
            80,
            max_concurrency=12,
            options={
                "batch_above_rps": 5.0,
                "batch_window_s": 0.2,
                "toggle_cooldown_s": 0.0,
                "continue_as_new_every": 15,
            },
        )
        run = await client.start_workflow(
            Experiment.run, batched, id=batched["experiment_id"], task_queue=task_queue
        )
        await wait_for(run, lambda p: p.completed >= 15)
        await sim.set_profile("sim-fast", rate_limit_rps=15)
        await run.signal(Experiment.stop)
        await wait_for(run, lambda p: p.status == "stopped")
        await run.signal(Experiment.resume)
        await run.result()
        await sim.set_profile("sim-fast", rate_limit_rps=1000)
        for index, history in enumerate(await _runs(client, batched["experiment_id"])):
            histories[f"batched_stop_resume_{index}"] = history
        failing = await client.start_workflow(
            Experiment.run, bad, id=bad["experiment_id"], task_queue=task_queue
        )
        try:
            await failing.result()
        except WorkflowFailureError:
            pass
        histories["bad_input"] = await failing.fetch_history()
    assert len([n for n in histories if n.startswith("judged")]) >= 3
    assert len([n for n in histories if n.startswith("batched")]) >= 2
    await replay_all(replayer(Experiment), histories, record_as="experiment_")
