"""A spent quota (429 with `insufficient_quota`) pauses an experiment until it is resumed.

No retry helps a daily quota, so the calls are not retried: the experiment
shows `paused` with the reason, sends nothing more, and a resume runs exactly
the items left without a result.
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client

from konstruct.experiments.models import ExperimentResult
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.test_experiments import FAST, experiment, results, start, wait_for
from workflows.experiment import Experiment


async def test_a_spent_quota_pauses_the_experiment_until_it_is_resumed(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await sim.set_profile(FAST, latency_ms=20, rate_limit_shape="daily_quota", quota_requests=10)
    body = experiment(30, max_concurrency=2)
    handle = await start(client, worker, body)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert paused.paused_reason is not None and "quota" in paused.paused_reason
    assert paused.failed == 0 and paused.in_flight == 0
    sent = (await sim.model_stats(FAST))["requests"]
    still = await handle.query(Experiment.progress)
    assert still.status == "paused"
    done_before = len(await results(app_pool, body["experiment_id"]))
    assert done_before == still.completed < 30

    await sim.set_profile(FAST, rate_limit_shape="token_bucket")
    await handle.signal(Experiment.resume)
    result: ExperimentResult = await handle.result()
    assert result.summary.status == "completed"
    assert (result.summary.completed, result.summary.failed) == (30, 0)
    stored = await results(app_pool, body["experiment_id"])
    assert len(stored) == 30 and all(r["status"] == "ok" for r in stored)
    # Paused means paused: nothing was retried or dispatched while the quota was
    # spent (such a call is refused and counted), and the resume sent one call per
    # item left. Counted over the whole run rather than over a fixed sleep while
    # paused, a window that a late retry could fall outside of.
    assert (await sim.model_stats(FAST))["requests"] - sent == 30 - done_before
