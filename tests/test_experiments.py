"""Experiment end to end: real dev server, real PostgreSQL, the simulator through litellm.

Short latencies, small datasets and short cooldowns keep this file to a couple
of minutes; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import PendingActivityState, TimeoutType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from konstruct.app.cli import main as cli_main
from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.config import Settings
from konstruct.experiments.models import ExperimentProgress, ExperimentResult, ToggleInput
from konstruct.experiments.store.analysis import load_experiment
from konstruct.platform import db
from konstruct.platform.db import tenant_transaction
from konstruct.platform.naming import provider_queue
from konstruct.platform.temporal.search_attributes import STATUS
from konstruct.providers.control import ProviderBounds
from konstruct.providers.queue_limits import push_rate
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.responders import content_key
from konstruct.providers.store import ensure_provider
from tests.support import WorkerRelay, call_in_flight, wait_for_calls
from workflows.experiment import Experiment

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

FAST = "sim-fast"


def items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i:04d}", "input": f"What is {i} + {i + 1}?", "expected": str(2 * i + 1)}
        for i in range(n)
    ]


def experiment(n: int = 20, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "experiment_id": f"exp-{uuid.uuid4().hex[:10]}",
        "tenant_id": "demo",
        "dataset": {"items": items(n)},
        "task": {"model_group": "fast", "prompt_template": "Answer with a number only: {input}"},
        "evals": [{"kind": "exact_match"}, {"kind": "contains"}],
        "max_concurrency": 10,
        # The output cache is on by default, and every test's items are alike: the
        # first test's calls would answer the next ones'. tests/test_experiments_cost.py
        # turns it on.
        "cache": False,
        "options": {"retry_max_s": 2.0, "monitor_interval_s": 0.5},
    }
    for key, value in overrides.items():
        if key == "options":
            body["options"] = {**body["options"], **value}
        else:
            body[key] = value
    return body


async def start(client: Client, task_queue: str, body: dict[str, Any]) -> WorkflowHandle:
    return await client.start_workflow(
        Experiment.run, body, id=body["experiment_id"], task_queue=task_queue
    )


async def results(pool: asyncpg.Pool, experiment_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('konstruct.tenant_id', 'demo', true)")
        return await conn.fetch(
            "select * from experiment_results where tenant_id = 'demo' and experiment_id = $1"
            " order by seq",
            experiment_id,
        )


async def wait_for(
    handle: WorkflowHandle, check: Callable[[ExperimentProgress], bool], within_s: float = 60
) -> ExperimentProgress:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        progress = await handle.query(Experiment.progress)
        if check(progress):
            return progress
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition never met; last progress: {progress}")
        await asyncio.sleep(0.1)


def throttled(stats: dict[str, Any]) -> int:
    return int(stats.get("rate_limited", stats.get("throttled", stats.get("429", 0))) or 0)


async def test_contract_example_runs_and_show_lists_every_item(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body: dict[str, Any] = {
        "experiment_id": f"exp-{uuid.uuid4().hex[:10]}",
        "tenant_id": "demo",
        "name": "arith-fast",
        "dataset": {"path": "deploy/datasets/arithmetic.jsonl"},
        "task": {"model_group": "fast", "prompt_template": "Answer with a number only: {input}"},
        "evals": [{"kind": "exact_match"}],
        "max_concurrency": 20,
        # Not answered by the cache from an earlier test's run of the same dataset.
        "cache": False,
    }
    handle = await start(client, worker, body)
    result: ExperimentResult = await handle.result()
    summary = result.summary
    assert summary.total == 200 and summary.completed == 200 and summary.failed == 0
    assert [e.name for e in summary.evals] == ["exact_match"]
    assert summary.evals[0].scored == 200 and summary.evals[0].pass_rate is not None
    assert summary.latency.p50_ms is not None and summary.latency.p99_ms is not None
    assert summary.prompt_tokens > 0
    progress = await handle.query(Experiment.progress)
    assert progress.status == "completed" and progress.evaluated == 200
    assert any(p.provider == "simulator" for p in progress.providers)
    # One provider call per item, one row per item.
    assert (await sim.model_stats(FAST))["ok"] == 200
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 200 and {r["status"] for r in rows} == {"ok"}
    # The registry run holds the summary's metrics.
    async with app_pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('konstruct.tenant_id', 'demo', true)")
        run = await conn.fetchrow(
            "select * from registry_runs where run_id = $1::uuid", result.registry_run_id
        )
    assert run["kind"] == "experiment" and run["name"] == "arith-fast"
    assert json.loads(run["metrics"])["exact_match.pass_rate"] == summary.evals[0].pass_rate

    capsys.readouterr()
    assert (
        await asyncio.to_thread(cli_main, ["experiments", "show", body["experiment_id"], "--json"])
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "completed" and len(shown["items"]) == 200
    first = shown["items"][0]
    assert first["status"] == "ok" and first["output"] and "exact_match" in first["scores"]
    assert first["latency_ms"] is not None and first["model"]
    assert await asyncio.to_thread(cli_main, ["experiments", "list"]) == 0
    assert body["experiment_id"] in capsys.readouterr().out


def _bad(tmp_path: Path) -> list[tuple[dict[str, Any], str, str]]:
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"id": 1, "input": "What is 1 + 1?"}\n{"id": 2, "input": oops}\n')
    return [
        ({"dataset": {"path": str(tmp_path / "missing.jsonl")}}, "dataset.path", "does not exist"),
        ({"dataset": {"path": str(malformed)}}, "dataset.path", "line 2"),
        ({"evals": [{"kind": "bleu"}]}, "evals", "unknown eval kind 'bleu'"),
        (
            {"task": {"model_group": "nope", "prompt_template": "{input}"}},
            "task.model_group",
            "unknown model group 'nope'",
        ),
        (
            {"evals": [{"kind": "llm_judge", "model_group": "ghost", "rubric": "r"}]},
            "evals.0.model_group",
            "unknown model group 'ghost'",
        ),
        (
            {"task": {"model_group": "fast", "prompt_template": "no slot here"}},
            "task.prompt_template",
            "{input}",
        ),
    ]


async def invalid_input(client: Client, task_queue: str, change: dict[str, Any]) -> str:
    """The message of the failure an experiment changed by `change` ends in at once:
    a non-retryable InvalidInput."""
    handle = await start(client, task_queue, experiment(**change))
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), change
    assert cause.type == "InvalidInput" and cause.non_retryable, cause
    return cause.message


async def test_bad_inputs_fail_at_once_naming_the_field(
    client: Client, worker: str, tmp_path: Path
) -> None:
    for change, field, words in _bad(tmp_path):
        message = await invalid_input(client, worker, change)
        assert field in message and words in message, message


async def test_judge_evals_and_continue_as_new_twice(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    body = experiment(
        25,
        evals=[
            {"kind": "numeric_close", "tolerance": 0.01},
            {"kind": "llm_judge", "model_group": "judge", "rubric": "Is the number right?"},
        ],
        options={"continue_as_new_every": 8, "page_size": 5},
        max_concurrency=4,
    )
    handle = await start(client, worker, body)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 25
    by_name = {e.name: e for e in result.summary.evals}
    assert by_name["llm_judge"].scored + by_name["numeric_close"].scored == 50
    progress = await handle.query(Experiment.progress)
    assert progress.run_index >= 2, "the workflow should have continued as new twice"
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 25
    assert all(r["evaluated"] and "llm_judge" in json.loads(r["scores"]) for r in rows)
    # Each item called the task model once and the judge once, across three runs.
    twice = {i: n for i, n in (await calls_by_item(sim, body)).items() if n != 1}
    assert (await sim.model_stats(FAST))["ok"] == 25, twice
    assert (await sim.model_stats("sim-judge"))["ok"] == 25


async def start_provider_at(
    client: Client, pool: asyncpg.Pool, task_queue: str, rate: float
) -> None:
    """The simulator provider of `task_queue` at `rate` req/s, in PostgreSQL and on the
    server's task-queue limit, before an experiment starts (which keeps that rate)."""
    async with pool.acquire() as conn:
        await ensure_provider(conn, task_queue, "simulator", ProviderBounds(rate, 0.5, 1000.0))
        await conn.execute(
            "update provider_limits set rate = $2 where task_queue = $1 and provider = 'simulator'",
            task_queue,
            rate,
        )
    await push_rate(client, provider_queue(task_queue, "simulator"), rate)


async def test_continue_as_new_hands_queued_calls_to_the_next_run_without_calling_twice(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    # A slow provider rate keeps calls queued for capacity when a run ends: all 18
    # are scheduled at once, 6 end the first run, most others still wait for the 4/s
    # rate (at 8/s the server's burst and the climb had started them all).
    await start_provider_at(client, app_pool, worker, 4.0)
    body = experiment(18, max_concurrency=20, options={"continue_as_new_every": 6})
    handle = await start(client, worker, body)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 18 and result.summary.failed == 0
    first_run = [
        e
        async for e in client.get_workflow_handle(
            body["experiment_id"], run_id=handle.first_execution_run_id
        ).fetch_history_events()
    ]
    cancelled = [e for e in first_run if e.HasField("activity_task_canceled_event_attributes")]
    assert cancelled, "the first run should have ended with calls still queued"
    assert len(await results(app_pool, body["experiment_id"])) == 18
    # Cancelled before they started, the queued calls made no request: one per item.
    stats = await sim.model_stats(FAST)
    assert stats["requests"] == stats["ok"] == 18


@workflow.defn(sandboxed=False)
class CancelAStartedCall:
    """Starts one item's task call as an Experiment does, and cancels it when told:
    the race of `_cancel_waiting_calls` (and of a stop), which read the calls still
    scheduled and then cancel them, with a call that started in between."""

    def __init__(self) -> None:
        self.told = False

    @workflow.signal
    def cancel(self) -> None:
        self.told = True

    @workflow.run
    async def run(self, queue: str, call: dict[str, str]) -> str:
        handle = workflow.start_activity(
            "experiment_run_item",
            call,
            task_queue=queue,
            start_to_close_timeout=timedelta(seconds=60),
            # Heartbeats reach the server every 2-3 s: the cancel arrives mid-call.
            heartbeat_timeout=timedelta(seconds=4),
            retry_policy=RetryPolicy(maximum_attempts=1),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        await workflow.wait_condition(lambda: self.told)
        handle.cancel()
        try:
            await handle
        except ActivityError as err:
            return type(err.cause).__name__
        return "completed"


async def test_a_call_cancelled_after_its_request_left_finishes_and_keeps_its_answer(
    client: Client,
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    postgres: EmbeddedPostgres,
) -> None:
    # An item without a result in an experiment that is not stopped: the one item
    # of a finished experiment, its result row deleted.
    body = experiment(1)
    await (await start(client, worker, body)).result()
    (row,) = await results(app_pool, body["experiment_id"])
    conn = await asyncpg.connect(postgres.owner_url)
    try:
        await conn.execute(
            "delete from experiment_results where experiment_id = $1", body["experiment_id"]
        )
    finally:
        await conn.close()
    before = await sim.model_stats(FAST)
    await sim.set_profile(FAST, latency_ms=8000)
    call = {
        "tenant_id": "demo",
        "experiment_id": body["experiment_id"],
        "item_id": row["item_id"],
        "deployment_id": row["deployment_id"],
        "provider": "simulator",
    }
    queue = f"{worker}-canceller"
    async with Worker(client, task_queue=queue, workflows=[CancelAStartedCall]):
        handle = await client.start_workflow(
            CancelAStartedCall.run,
            args=[provider_queue(worker, "simulator"), call],
            id=f"cancel-{uuid.uuid4().hex[:10]}",
            task_queue=queue,
        )
        assert await call_in_flight(sim, FAST, polls=400), "the call never reached the provider"
        await handle.signal(CancelAStartedCall.cancel)
        seen = await handle.result()
    # The request had left: the answer is kept, not paid for and dropped.
    stored = await results(app_pool, body["experiment_id"])
    assert [r["status"] for r in stored] == ["ok"], f"the workflow saw {seen}; no result stored"
    after = await sim.model_stats(FAST)
    assert after["requests"] - before["requests"] == after["ok"] - before["ok"] == 1


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}


async def test_structured_answers_are_asked_for_and_scored_against_their_schema(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
    }
    task = {
        "model_group": "fast",
        "prompt_template": "Answer with a number only: {input}",
        "response_format": response_format,
    }
    evals = [{"kind": "json_schema", "schema": ANSWER_SCHEMA}, {"kind": "json_valid"}]
    fits: ExperimentResult = await (
        await start(client, worker, experiment(5, task=task, evals=evals))
    ).result()
    scored = {e.name: e for e in fits.summary.evals}
    assert scored["json_schema"].pass_rate == 1.0, scored
    # Told to answer JSON that does not fit: still JSON, but the schema eval fails it.
    await sim.set_profile(FAST, json_mismatch_rate=1.0)
    body = experiment(5, task=task, evals=evals)
    misfits: ExperimentResult = await (await start(client, worker, body)).result()
    scored = {e.name: e for e in misfits.summary.evals}
    assert scored["json_schema"].pass_rate == 0.0 and scored["json_valid"].pass_rate == 1.0
    rows = await results(app_pool, body["experiment_id"])
    details = [json.loads(r["scores"])["json_schema"] for r in rows]
    assert all("required property" in str(d) or "answer" in str(d) for d in details), details


async def row_says(pool: asyncpg.Pool, experiment_id: str, status: str) -> None:
    """Wait (60 s at most) until the experiment's row holds `status`: the workflow
    writes it just after the status changes."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        async with tenant_transaction(pool, "demo") as conn:
            said = await conn.fetchval(
                "select status from experiments where experiment_id = $1", experiment_id
            )
        if said == status:
            return
        assert asyncio.get_running_loop().time() < deadline, f"the row says {said!r}"
        await asyncio.sleep(0.1)


async def test_stop_lets_in_flight_finish_refuses_fast_toggles_and_resume_completes(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await sim.set_profile(FAST, latency_ms=400)
    # A 3 s cooldown (5 s by default): the refused resume below is sent as soon as the
    # stop's update returns, so both updates' workflow tasks start well within 3 s of
    # each other even on a loaded machine; the accepted resume waits it out.
    cooldown_s = 3.0
    body = experiment(30, max_concurrency=4, options={"toggle_cooldown_s": cooldown_s})
    handle = await start(client, worker, body)
    await wait_for(handle, lambda p: p.completed >= 4 and p.in_flight > 0)
    stopped = await handle.execute_update(Experiment.request_stop, ToggleInput(by="test"))
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    assert stopped.accepted
    # A toggle within the cooldown is refused, visibly.
    too_soon = await handle.execute_update(Experiment.request_resume, ToggleInput())
    assert not too_soon.accepted and "too soon" in too_soon.reason
    progress = await wait_for(handle, lambda p: p.status == "stopped")
    assert progress.last_refusal is not None and progress.last_refusal.action == "resume"
    assert progress.in_flight == 0
    # A stopped experiment gets no closer to its end: no ETA.
    assert progress.eta_s is None
    stats = await sim.model_stats(FAST)
    done = await results(app_pool, body["experiment_id"])
    # Calls in flight at the stop completed and were stored; nothing else was sent.
    assert stats.get("in_flight", 0) == 0
    assert stats["requests"] == len(done) < 30

    await sim.set_profile(FAST, latency_ms=5)
    # After the cooldown, resume by signal; the items without a result run, once.
    await asyncio.sleep(max(0.0, cooldown_s + 0.5 - (loop.time() - stopped_at)))
    # Nothing went out while stopped: checked over the whole cooldown the test must
    # wait anyway, not over a fixed sleep of its own (a window a slow dispatch could
    # miss), and the workflow and PostgreSQL still hold the stop that forbids it.
    assert (await sim.model_stats(FAST))["requests"] == stats["requests"]
    assert (await handle.query(Experiment.progress)).status == "stopped"
    async with tenant_transaction(app_pool, "demo") as conn:
        assert await conn.fetchval(
            "select stop_requested from experiments where experiment_id = $1",
            body["experiment_id"],
        )
    # One status everywhere: the row that `experiments list` and `show` read says
    # what the query says (it said `stopping` for good before), and so does the
    # search attribute the Web UI lists.
    await row_says(app_pool, body["experiment_id"], "stopped")
    described = await handle.describe()
    assert described.typed_search_attributes.get(STATUS) == "stopped"
    await handle.signal(Experiment.resume)
    resumed = await wait_for(handle, lambda p: p.status != "stopped")
    assert resumed.toggles[-1].action == "resume" and resumed.toggles[-1].accepted
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 30
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 30
    assert (await sim.model_stats(FAST))["requests"] == 30
    # One request per item: none was sent again after the resume.
    assert set((await calls_by_item(sim, body)).values()) == {1}


async def test_restarting_a_finished_experiment_gives_the_same_results(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    body = experiment(12)
    body["task"]["model_group"] = "arith"
    first = await (await start(client, worker, body)).result()
    before = [dict(r) for r in await results(app_pool, body["experiment_id"])]
    calls = (await sim.model_stats("sim-arith"))["requests"]
    for _ in range(2):
        workflow_id = f"{body['experiment_id']}-again-{uuid.uuid4().hex[:4]}"
        again = await client.execute_workflow(
            Experiment.run, body, id=workflow_id, task_queue=worker
        )
        assert again.summary.evals == first.summary.evals
        assert again.registry_run_id == first.registry_run_id
        # The one registry run is refreshed by the latest finalize, not left as the first.
        async with tenant_transaction(app_pool, body["tenant_id"]) as conn:
            run = await conn.fetchrow(
                "select status, workflow_run_id from registry_runs where run_id = $1::uuid",
                again.registry_run_id,
            )
        latest = await client.get_workflow_handle(workflow_id).describe()
        assert (run["status"], run["workflow_run_id"]) == ("success", latest.run_id)
    after = [dict(r) for r in await results(app_pool, body["experiment_id"])]
    assert after == before and len(after) == 12
    assert (await sim.model_stats("sim-arith"))["requests"] == calls


async def start_at_20ms(
    client: Client, worker: str, sim: SimulatorAdmin, items: int, concurrency: int, running_at: int
) -> tuple[dict[str, Any], WorkflowHandle]:
    """An experiment on the 20 ms fast model, returned once `running_at` items are done."""
    await sim.set_profile(FAST, latency_ms=20)
    body = experiment(items, max_concurrency=concurrency)
    handle = await start(client, worker, body)
    await wait_for(handle, lambda p: p.completed >= running_at)
    return body, handle


async def test_a_429_storm_lowers_the_rate_and_no_item_fails(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    # 180 items after the drop, 15 s at the new limit: several 429 episodes. The
    # first cut measures a window that still holds calls from before the drop (ci33:
    # 75 -> 18.8 req/s), and 80 items (7 s) could end before a second one.
    body, handle = await start_at_20ms(client, worker, sim, 200, 20, running_at=20)
    # The provider's limit drops far below the configured rate (50/s) mid-run.
    await sim.set_profile(FAST, rate_limit_rps=12)
    rates: list[float] = []

    async def sample_rate() -> None:
        while True:
            async with app_pool.acquire() as conn:
                rates.append(
                    await conn.fetchval(
                        "select rate from provider_limits"
                        " where task_queue = $1 and provider = 'simulator'",
                        worker,
                    )
                )
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_rate())
    result: ExperimentResult = await handle.result()
    sampler.cancel()
    assert result.summary.completed == 200 and result.summary.failed == 0
    stats = await sim.model_stats(FAST)
    assert throttled(stats) > 0, stats
    assert stats["ok"] == 200
    assert result.summary.providers["calls"]["throttled"] == throttled(stats)
    # The report's timeline: every 429 in the second it happened, within the run.
    async with tenant_transaction(app_pool, body["tenant_id"]) as conn:
        data = await load_experiment(conn, body["tenant_id"], body["experiment_id"])
    assert data.throttled == throttled(stats) and data.retry_seconds is not None
    assert sum(r.throttled for r in data.retry_seconds) == throttled(stats)
    assert all(-1.0 <= r.at_s <= (data.duration_s or 0.0) for r in data.retry_seconds)
    # The rate went under the new limit (where it ends depends on how far the
    # last probe got, so the lowest sample is what is checked).
    assert min(rates) < 12 * 1.2, rates


async def test_outage_opens_the_breaker_pauses_and_recovers_by_itself(
    client: Client, experiment_worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    body, handle = await start_at_20ms(client, experiment_worker, sim, 50, 5, running_at=5)
    await sim.set_profile(FAST, outage=True)
    paused = await wait_for(handle, lambda p: p.status == "paused")
    assert paused.paused_reason and "circuit" in paused.paused_reason
    provider = next(p for p in paused.providers if p.provider == "simulator")
    assert provider.breaker in ("open", "half_open") and provider.breaker_trips >= 1
    calls_while_open = (await sim.model_stats(FAST))["requests"]
    await asyncio.sleep(0.5)
    # While open (cooldown 1.5 s) at most the half-open probes reach the provider.
    assert (await sim.model_stats(FAST))["requests"] - calls_while_open <= 2
    await sim.set_profile(FAST, outage=False)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 50 and result.summary.failed == 0
    assert (await handle.query(Experiment.progress)).status == "completed"
    assert len(await results(app_pool, body["experiment_id"])) == 50


async def start_and_kill_9(
    client: Client,
    relay: WorkerRelay,
    task_queue: str,
    pool: asyncpg.Pool,
    body: dict[str, Any],
    ok: int,
) -> tuple[WorkflowHandle, set[str]]:
    """Starts `body` on the relay's first worker (slow answers), kills it with SIGKILL once
    `ok` calls are answered and 4 were in flight, and a result is stored with a call
    in flight, and hands the run to a second worker.

    Returns the handle and the items whose result the dead worker had stored: those
    must never be called again. (The others may be called twice: the dead worker's
    call may have reached the provider, or been answered while it was still writing.)
    """
    await relay.start_slow(FAST, latency_ms=600)
    handle = await start(client, task_queue, body)
    await wait_for_calls(relay.sim, FAST, ok=ok, in_flight=4)
    # And a result stored, with calls still in flight: a batch stores its results
    # once all its calls are answered, so `ok` answers alone may have stored none
    # yet (ci28), and then nothing tells an item stored from one called again.
    for _ in range(1200):
        if await results(pool, body["experiment_id"]):
            if (await relay.sim.model_stats(FAST)).get("in_flight", 0) >= 1:
                break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("no result was stored with calls in flight")
    await relay.kill_first()
    stored = {r["item_id"] for r in await results(pool, body["experiment_id"])}
    await relay.take_over(latency_ms=20)
    return handle, stored


async def calls_by_item(sim: SimulatorAdmin, body: dict[str, Any]) -> dict[str, int]:
    """How many requests the provider got for each item of `body`, by their prompts.

    Counted per prompt rather than as a total minus what was stored when the worker
    died: requests the dead worker had sent but the provider had not yet read were
    counted after that moment (the race behind a flaky `15 <= 14`)."""
    counts = (await sim.requests_by_content(FAST))["requests"]
    template = body["task"]["prompt_template"]
    return {
        item["id"]: counts.get(content_key(template.format(input=item["input"])), 0)
        for item in body["dataset"]["items"]
    }


def assert_called_once_unless_unstored(calls: dict[str, int], stored: set[str]) -> None:
    assert stored and stored <= set(calls)
    assert {i: n for i, n in calls.items() if i in stored and n != 1} == {}
    assert {i: n for i, n in calls.items() if not 1 <= n <= 2} == {}


async def test_kill_9_of_a_worker_loses_and_duplicates_nothing(
    client: Client, relay: WorkerRelay, task_queue: str, app_pool: asyncpg.Pool
) -> None:
    body = experiment(40, max_concurrency=8, options={"heartbeat_timeout_s": 3})
    handle, stored = await start_and_kill_9(client, relay, task_queue, app_pool, body, ok=8)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 40 and result.summary.failed == 0
    rows = await results(app_pool, body["experiment_id"])
    assert len(rows) == 40 and len({r["item_id"] for r in rows}) == 40
    assert_called_once_unless_unstored(await calls_by_item(relay.sim, body), stored)


async def test_a_summary_lost_with_its_worker_is_made_again_at_its_heartbeat_timeout(
    client: Client, relay: WorkerRelay, task_queue: str, settings: Settings
) -> None:
    # The summary's registry run cannot be written while the table is locked: the
    # first worker's `experiment_finalize` waits there, started, when it is killed.
    # The server notices the missing heartbeats and the second worker makes the
    # summary. Before, nothing noticed for the activity's two minutes (the chaos
    # soak, once the dev server was killed while a summary was being made: 180 s).
    body = experiment(4, max_concurrency=4)
    owner = await asyncpg.connect(db.owner_url(settings))
    try:
        locked = owner.transaction()
        await locked.start()
        await owner.execute("lock table registry_runs in exclusive mode")
        await relay.start_slow(FAST, latency_ms=20)
        handle = await start(client, task_queue, body)
        for _ in range(1200):
            pending = (await handle.describe()).raw_description.pending_activities
            if any(
                a.activity_type.name == "experiment_finalize"
                and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                for a in pending
            ):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the summary never started")
        await relay.kill_first()
        await locked.rollback()
    finally:
        await owner.close()
    await relay.take_over(latency_ms=20)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 4 and result.summary.registry_run_id
    finalize = None
    async for event in handle.fetch_history_events():
        scheduled = event.activity_task_scheduled_event_attributes
        if event.HasField("activity_task_scheduled_event_attributes"):
            if scheduled.activity_type.name == "experiment_finalize":
                finalize = event.event_id
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            if started.scheduled_event_id == finalize:
                break
    else:
        pytest.fail("no summary started in the history")
    # The attempt that made it started after the first one's heartbeat timed out.
    assert started.attempt >= 2, started
    timeout = started.last_failure.timeout_failure_info.timeout_type
    assert timeout == TimeoutType.TIMEOUT_TYPE_HEARTBEAT, started.last_failure


async def test_cli_start_watch_and_a_refused_stop(
    cli_worker: str, sim: SimulatorAdmin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items(5)))
    experiment_id = f"exp-cli-{uuid.uuid4().hex[:6]}"
    argv = ["experiments", "start", "--id", experiment_id, "--dataset", str(data)]
    argv += ["--eval", "exact_match", "--eval", "numeric_close", "--watch"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "5/5" in out and "numeric_close" in out
    # A stop of a finished experiment is answered, and refused.
    stop = ["experiments", "stop", experiment_id]
    assert await asyncio.to_thread(cli_main, stop) == 1
    assert "refused" in capsys.readouterr().out


async def test_a_stop_that_arrives_while_the_run_loads_is_kept_not_dropped(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    # Signal-with-start: the stop reaches the workflow before it has loaded its
    # dataset (as one right after a continue-as-new does). It used to be refused,
    # silently for a signal, and the experiment ran to the end.
    body = experiment(20, options={"toggle_cooldown_s": 0.0})
    handle = await client.start_workflow(
        Experiment.run,
        body,
        id=body["experiment_id"],
        task_queue=worker,
        start_signal="stop",
    )
    stopped = await wait_for(handle, lambda p: p.status == "stopped")
    assert stopped.completed < 20
    assert [t.action for t in stopped.toggles if t.accepted] == ["stop"]
    await handle.signal(Experiment.resume)
    result: ExperimentResult = await handle.result()
    assert result.summary.completed == 20
    assert len(await results(app_pool, body["experiment_id"])) == 20
