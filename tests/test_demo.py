"""DemoCascade end to end: real dev server, real PostgreSQL, the simulator through litellm.

The invariant every test checks, however the run ended: `demo-production` is
on the champion the run recorded, or where it was before the run when no
champion was recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from activities.demo_registry import DemoRegistryActivities
from konstruct.config import Settings
from konstruct.demo.models import (
    DEMO_ALIAS,
    STEP_NAMES,
    DemoCascadeResult,
    DemoProgress,
    RegisteredRun,
    RegressionCheckInput,
    steps_of,
)
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import NotFound, to_application_error
from konstruct.platform.temporal.search_attributes import KIND, STATUS, TENANT
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.registry import store as registry
from konstruct.registry.models import MoveAliasInput, NewRun
from tests.support import (
    ROOT,
    TAKEOVER_TASK_TIMEOUT,
    WorkerRelay,
    call_in_flight,
    konstruct,
    time_skipping_server,
)
from workers.main import build_worker
from workflows.demo_cascade import APPROVAL_TIMEOUT, DemoCascade

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

MINIMAL_STEPS = [s.name for s in steps_of("demo_minimal")]
RICH_ONLY_STEPS = [n for n in STEP_NAMES if n not in MINIMAL_STEPS]
# Steps whose change registers its undo (the rest only read or report).
STEPS_WITH_A_COMPENSATION = {
    "seed_data",
    "backfill",
    "features",
    "train_baselines",
    "train_v2",
    "batch_sweep",
    "register_runs",
    "promote",
    "safer_promote",
    "scenario_simulate_and_save",
    "rag_index",
    "agent_decision",
    "agent_eval",
}
ARTIFACT_URI = re.compile(r"^demo/[a-z_0-9]+-model_[0-9a-f]{12}\.joblib$")


def demo_input(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "scenario": "demo_minimal",
        "seed": 42,
        "approval": "auto",
        "fail_at": None,
    }
    body.update(overrides)
    return body


async def start(
    client: Client, task_queue: str, body: dict[str, Any], **options: Any
) -> WorkflowHandle[Any, DemoCascadeResult]:
    return await client.start_workflow(
        DemoCascade.run,
        body,
        id=f"demo-test-{uuid.uuid4().hex[:10]}",
        task_queue=task_queue,
        **options,
    )


async def progress_of(handle: WorkflowHandle[Any, Any]) -> DemoProgress:
    return await handle.query(DemoCascade.progress)


async def wait_for(
    handle: WorkflowHandle[Any, Any],
    check: Callable[[DemoProgress], bool],
    what: str,
    within: float = 60,
) -> DemoProgress:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        progress = await progress_of(handle)
        if check(progress):
            return progress
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}: {await progress_of(handle)}")


async def current_details(handle: WorkflowHandle[Any, Any]) -> str:
    """What the Web UI shows as the workflow's current details."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(metadata.current_details)


async def failure_of(handle: WorkflowHandle[Any, Any]) -> BaseException:
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    assert info.value.cause is not None
    return info.value.cause


async def alias_run_id(pool: asyncpg.Pool, alias: str = DEMO_ALIAS) -> str | None:
    async with tenant_transaction(pool, "demo") as conn:
        return (await registry.alias_state(conn, "demo", alias)).run_id


async def moves_by(pool: asyncpg.Pool, workflow_id: str) -> list[Any]:
    async with tenant_transaction(pool, "demo") as conn:
        history = await registry.alias_history(conn, "demo", DEMO_ALIAS)
    return [m for m in history if m.workflow_id == workflow_id]


async def session_files(pool: asyncpg.Pool, run_id: str, under: str = "") -> list[str]:
    async with tenant_transaction(pool, "demo") as conn:
        rows = await conn.fetch(
            "select uri from registry_artifacts where tenant_id = 'demo' and starts_with(uri, $1)",
            f"demo/sessions/{run_id}/{under}",
        )
    return sorted(r["uri"] for r in rows)


def assert_invariant(progress: DemoProgress, alias_now: str | None) -> None:
    """The alias is on the recorded champion, or where it was before the run."""
    expected = progress.champion_run_id or progress.pre_run_alias_run_id
    assert alias_now == expected, (
        f"alias on {alias_now}, expected {expected} "
        f"(champion {progress.champion_run_id}, before {progress.pre_run_alias_run_id});"
        f" compensations {progress.compensations}"
    )


# --- input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"scenario": "everything"}, "scenario"),
        ({"approval": "maybe"}, "approval"),
        ({"fail_at": "nowhere"}, "fail_at"),
        ({"fail_at": "safer_promote"}, "fail_at"),  # not a step of demo_minimal
        ({"seed": "42"}, "seed"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_bad_input_fails_at_once_naming_the_field(
    client: Client, worker: str, change: dict[str, Any], field: str
) -> None:
    handle = await start(client, worker, demo_input(**change))
    error = await failure_of(handle)
    assert isinstance(error, ApplicationError)
    assert error.type == "InvalidInput" and error.non_retryable
    assert field in error.message


# --- the happy paths ----------------------------------------------------------------


async def test_showcase_rich_passes_every_step(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    handle = await start(client, worker, demo_input(scenario="showcase_rich"))
    result = await handle.result()
    assert result.overall_status == "pass"
    attributes = (await handle.describe()).typed_search_attributes
    assert attributes.get(KIND) == "demo" and attributes.get(TENANT) == "demo"
    assert attributes.get(STATUS) == "completed"
    assert [s.name for s in result.steps] == list(STEP_NAMES)
    for step in result.steps:
        # The simulator serves chat, judge and embeddings, so nothing is optional here.
        assert step.status == "pass", f"{step.name}: {step.status} {step.detail}"
        assert step.detail
    # The alias ends on the recorded champion, whose artifact is real and hashed.
    assert result.champion_run_id is not None
    assert await alias_run_id(app_pool) == result.champion_run_id
    async with tenant_transaction(app_pool, "demo") as conn:
        runs = {r.run_id: r for r in await registry.list_runs(conn, "demo")}
    champion = runs[result.champion_run_id]
    assert champion.owner == "demo" and champion.workflow_id == handle.id
    mine = [r for r in runs.values() if r.workflow_run_id == result.workflow_run_id]
    models = {r.params["model"] for r in mine if r.kind == "model"}
    assert {"naive", "seasonal_naive", "moving_average", "trend_seasonal_v2"} <= models
    for run in mine:
        if run.kind == "model":
            assert run.artifact_uri and ARTIFACT_URI.match(run.artifact_uri), run.artifact_uri
            assert run.artifact_uri.split("_")[-1][:12] == run.artifact_sha256[:12]  # type: ignore[index]
            assert "wape" in run.metrics
    # Every alias move names the workflow run that made it: promote, the trial
    # swap to a worse run and its rollback (plus the agent's promote, if any).
    moves = await moves_by(app_pool, handle.id)
    assert all(m.workflow_run_id == result.workflow_run_id for m in moves)
    reasons = [m.reason for m in moves]
    assert reasons[0].startswith("promote champion")
    swap = next(m for m in moves if m.reason.startswith("safer promote: trial swap"))
    rollback = next(m for m in moves if m.reason.startswith("safer promote: regression"))
    assert rollback.from_run_id == swap.to_run_id and rollback.to_run_id == swap.from_run_id
    worse = runs[swap.to_run_id]  # type: ignore[index]
    assert worse.metrics["wape"] > runs[swap.from_run_id].metrics["wape"]  # type: ignore[index]
    assert re.search(r"model_([0-9a-f]+)(?:\.joblib)?$", worse.artifact_uri or "")
    # Scratch data is gone; the saved scenarios and the RAG index stay.
    assert await session_files(app_pool, result.workflow_run_id, "data/") == []
    assert await session_files(app_pool, result.workflow_run_id, "scenarios/")
    assert await session_files(app_pool, result.workflow_run_id, "rag/")
    by_name = {s.name: s for s in result.steps}
    assert "regression detected" in by_name["safer_promote"].detail
    # Planning ran on the champion `promote` recorded, never on the swapped alias.
    promoted = moves[0].to_run_id
    assert promoted is not None and promoted != swap.to_run_id
    assert f"on champion {runs[promoted].name} ({promoted[:8]})" in (
        by_name["scenario_simulate_and_save"].detail
    )
    # The agent weighed v2 against the v1 champion (seed 42: v2 is better) and,
    # approved automatically, promoted it: the second recorded champion.
    assert result.decision == "PROMOTE"
    assert runs[result.champion_run_id].params["model"] == "trend_seasonal_v2"
    assert runs[result.champion_run_id].metrics["wape"] < runs[promoted].metrics["wape"]
    assert moves[-1].reason.startswith("agent promote")
    assert moves[-1].to_run_id == result.champion_run_id
    stats = await sim.stats()
    assert stats["models"].get("sim-embed", {}).get("ok", 0) >= 1
    # The Experiment child scored the agent's rationale, and its run is demo-owned.
    evaluation = by_name["agent_eval"].detail
    assert "has_decision mean 1.0 pass 1.0" in evaluation, evaluation
    assert re.search(r"judge mean (0\.\d+|1\.0) pass", evaluation), evaluation
    assert "is demo-owned" in evaluation


async def test_rag_step_skips_with_its_reason_without_an_embedding_provider(
    client: Client, settings: Settings, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "llm-router.yaml").read_text())
    config["model_list"] = [d for d in config["model_list"] if d["model_name"] != "embed"]
    router_config = tmp_path / "router-without-embed.yaml"
    router_config.write_text(yaml.safe_dump(config))
    without_embed = settings.model_copy(
        update={"llm": settings.llm.model_copy(update={"router_config": router_config})}
    )
    task_queue = f"tq-{uuid.uuid4().hex[:10]}"
    async with build_worker(client, without_embed, task_queue) as worker, worker:
        result = await (
            await start(client, task_queue, demo_input(scenario="showcase_rich"))
        ).result()
    assert result.overall_status == "pass"
    statuses = {s.name: s for s in result.steps}
    assert statuses["rag_index"].status == "skip"
    assert "no embedding provider configured" in statuses["rag_index"].detail
    assert all(s.status == "pass" for s in result.steps if s.name != "rag_index")
    assert "embeddings off" in statuses["precheck"].detail
    assert await alias_run_id(app_pool) == result.champion_run_id


async def test_demo_twice_in_a_row_and_reset_keeps_other_rows(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    # A user's run and alias, which no demo reset may touch.
    user_run = str(uuid.uuid4())
    async with tenant_transaction(app_pool, "demo") as conn:
        await registry.store_artifact(conn, "demo", f"user/model-{user_run}.bin", b"user bytes")
        await registry.insert_runs(
            conn,
            "demo",
            [
                NewRun(
                    run_id=user_run,
                    name="user-model",
                    owner="user",
                    artifact_uri=f"user/model-{user_run}.bin",
                    artifact_sha256=registry.sha256_hex(b"user bytes"),
                )
            ],
            "by-hand",
            None,
        )
        # The user points demo-production (and an alias of their own) at it.
        for alias in (DEMO_ALIAS, "user-staging"):
            await registry.move_alias(
                conn,
                MoveAliasInput(
                    tenant_id="demo",
                    alias=alias,
                    to_run_id=user_run,
                    reason="by hand",
                    move_id=f"by-hand-{uuid.uuid4().hex}",
                ),
            )
    # A demo run that fails before promote leaves demo-production on the user's run.
    failed = await start(client, worker, demo_input(fail_at="register_runs"))
    await failure_of(failed)
    assert (await progress_of(failed)).pre_run_alias_run_id == user_run
    assert await alias_run_id(app_pool) == user_run
    first = await (await start(client, worker, demo_input())).result()
    second = await (await start(client, worker, demo_input())).result()
    assert first.overall_status == second.overall_status == "pass"
    assert first.pre_run_alias_run_id == user_run
    assert await alias_run_id(app_pool) == second.champion_run_id
    async with tenant_transaction(app_pool, "demo") as conn:
        runs = {r.run_id: r for r in await registry.list_runs(conn, "demo")}
    assert user_run in runs and runs[user_run].owner == "user"
    assert await alias_run_id(app_pool, "user-staging") == user_run
    # The first run's rows went with the second run's reset, except its champion,
    # which the alias still pointed at when that reset ran.
    left = [r for r in runs.values() if r.workflow_run_id == first.workflow_run_id]
    assert [r.run_id for r in left] == [first.champion_run_id]
    reset = next(s for s in second.steps if s.name == "reset")
    assert "deleted" in reset.detail


async def test_concurrent_demo_runs_are_safe(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    handles = [
        await start(client, worker, demo_input(scenario=s))
        for s in ("demo_minimal", "showcase_rich", "demo_minimal")
    ]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert all(r.overall_status == "pass" for r in results)
    # They did overlap: a later reset saw the others live, and left their rows alone.
    resets = [next(s for s in r.steps if s.name == "reset").detail for r in results]
    assert any(re.search(r"; [12] other demo runs live", d) for d in resets), resets
    champions = {r.champion_run_id for r in results}
    alias = await alias_run_id(app_pool)
    assert alias in champions
    # The alias's last move was made by one of these runs, and it is on that run's champion.
    async with tenant_transaction(app_pool, "demo") as conn:
        history = await registry.alias_history(conn, "demo", DEMO_ALIAS)
    last = history[-1]
    winner = next(r for r in results if r.workflow_run_id == last.workflow_run_id)
    assert alias == winner.champion_run_id
    # Every champion still exists: no run's reset deleted another's rows.
    async with tenant_transaction(app_pool, "demo") as conn:
        run_ids = {r.run_id for r in await registry.list_runs(conn, "demo")}
    assert champions <= run_ids


# --- failure at every step ------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "step"),
    [("demo_minimal", s) for s in MINIMAL_STEPS] + [("showcase_rich", s) for s in RICH_ONLY_STEPS],
)
async def test_fail_at_every_step_keeps_the_invariant(
    client: Client, worker: str, app_pool: asyncpg.Pool, scenario: str, step: str
) -> None:
    before = await alias_run_id(app_pool)
    handle = await start(client, worker, demo_input(scenario=scenario, fail_at=step))
    error = await failure_of(handle)
    # The original error is the one reported.
    assert isinstance(error, ApplicationError), repr(error)
    assert error.type == "InjectedFailure"
    assert f"injected failure at step {step!r}" in error.message
    progress = await progress_of(handle)
    assert progress.status == "failed"
    assert progress.pre_run_alias_run_id == before
    rows = {s.name: s for s in progress.steps}
    assert rows[step].status == "fail" and "InjectedFailure" in rows[step].detail
    names = [s.name for s in progress.steps]
    for later in names[names.index(step) + 1 :]:
        assert rows[later].status == "skip" and "not reached" in rows[later].detail
    assert all(c.status == "pass" for c in progress.compensations), progress.compensations
    assert_invariant(progress, await alias_run_id(app_pool))
    # The champion is recorded exactly when promote went through.
    promoted = names.index(step) > names.index("promote")
    assert (progress.champion_run_id is not None) == promoted
    # The session's scratch data was compensated away (or cleaned up).
    description = await handle.describe()
    assert await session_files(app_pool, description.run_id, "data/") == []
    assert await session_files(app_pool, description.run_id, "models/") == []
    # The failing step's own change (made before the injected failure) was undone.
    if step in STEPS_WITH_A_COMPENSATION:
        assert any(c.step == step for c in progress.compensations), progress.compensations


async def test_failing_compensation_never_masks_the_original_error(
    client: Client,
    worker: str,
    app_pool: asyncpg.Pool,
    postgres: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A trigger makes the delete of this run's sales data fail, for real, in PostgreSQL."""
    handle = await start(client, worker, demo_input(fail_at="features"), start_signal="stop")
    await wait_for(handle, lambda p: p.status == "paused", "the run to pause before precheck")
    run_id = (await handle.describe()).run_id
    owner = await asyncpg.connect(postgres.owner_url)
    function = f"refuse_{uuid.uuid4().hex[:8]}"
    try:
        await owner.execute(
            f"create function {function}() returns trigger language plpgsql as $$"
            " begin raise exception 'artifact store refuses deletes (test)'; end $$"
        )
        await owner.execute(
            f"create trigger {function} before delete on registry_artifacts for each row"
            f" when (starts_with(old.uri, 'demo/sessions/{run_id}/data/sales'))"
            f" execute function {function}()"
        )
        await handle.signal(DemoCascade.resume)
        error = await failure_of(handle)
    finally:
        await owner.execute(f"drop trigger if exists {function} on registry_artifacts")
        await owner.execute(f"drop function if exists {function}()")
        await owner.close()
    assert isinstance(error, ApplicationError)
    assert error.type == "InjectedFailure" and "'features'" in error.message
    progress = await progress_of(handle)
    failed = [c for c in progress.compensations if c.status == "fail"]
    assert [c.step for c in failed] == ["seed_data"]
    assert "refuses deletes" in failed[0].detail
    # The other compensations still ran.
    assert any(c.step == "features" and c.status == "pass" for c in progress.compensations)
    assert_invariant(progress, await alias_run_id(app_pool))
    # The Web UI shows it too, and the worker logged it with its exception.
    details = await current_details(handle)
    assert "Compensations that failed" in details and "refuses deletes" in details
    logged = [
        r
        for r in caplog.records
        if "compensation 'delete sales series' of step seed_data failed" in r.getMessage()
    ]
    assert logged and logged[0].exc_info is not None
    chain, error_of_log = [], logged[0].exc_info[1]
    while error_of_log is not None:
        chain.append(str(error_of_log))
        error_of_log = error_of_log.__cause__
    assert any("refuses deletes" in text for text in chain), chain


# --- stop, resume, cancel, kill -9 --------------------------------------------------------


async def test_stop_pauses_between_steps_and_resume_continues(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    handle = await start(client, worker, demo_input(), start_signal="stop")
    paused = await wait_for(handle, lambda p: p.status == "paused", "pause")
    assert all(s.status == "pending" for s in paused.steps)
    await handle.signal(DemoCascade.resume)
    result = await handle.result()
    assert result.overall_status == "pass"
    assert await alias_run_id(app_pool) == result.champion_run_id


async def test_cancel_mid_run_compensates_and_keeps_the_champion(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    handle = await start(client, worker, demo_input(scenario="showcase_rich", approval="manual"))
    waiting = await wait_for(handle, lambda p: p.pending_approval is not None, "approval")
    assert waiting.status == "awaiting_approval"
    await handle.cancel()
    error = await failure_of(handle)
    assert isinstance(error, CancelledError)
    progress = await progress_of(handle)
    assert progress.status == "cancelled"
    assert progress.champion_run_id is not None
    rows = {s.name: s for s in progress.steps}
    assert rows["agent_decision"].status == "fail" and rows["agent_decision"].detail == "cancelled"
    assert rows["scenario_simulate_and_save"].status == "compensated"
    assert all(c.status == "pass" for c in progress.compensations)
    assert_invariant(progress, await alias_run_id(app_pool))
    description = await handle.describe()
    assert await session_files(app_pool, description.run_id, "data/") == []


async def test_killed_worker_mid_step_is_finished_by_another(
    client: Client, relay: WorkerRelay, task_queue: str, app_pool: asyncpg.Pool
) -> None:
    await relay.start_slow("sim-embed", latency_ms=4000)
    handle = await start(
        client, task_queue, demo_input(scenario="showcase_rich"), task_timeout=TAKEOVER_TASK_TIMEOUT
    )
    if not await call_in_flight(relay.sim, "sim-embed", polls=600):
        pytest.fail("the embedding call never started")
    await relay.hand_over(latency_ms=1)
    result = await handle.result()
    assert result.overall_status == "pass"
    assert all(s.status == "pass" for s in result.steps)
    assert await alias_run_id(app_pool) == result.champion_run_id
    # The steps before the kill ran once: one promote move by this run.
    moves = await moves_by(app_pool, handle.id)
    assert sum(m.reason.startswith("promote champion") for m in moves) == 1


# --- the human in the loop -------------------------------------------------------------


@pytest.mark.parametrize("answer", ["approve", "reject"])
async def test_manual_approval_is_decided_by_the_signal(
    client: Client, worker: str, app_pool: asyncpg.Pool, answer: str
) -> None:
    handle = await start(client, worker, demo_input(scenario="showcase_rich", approval="manual"))
    waiting = await wait_for(handle, lambda p: p.pending_approval is not None, "approval")
    pending = waiting.pending_approval
    assert pending is not None and pending.rationale
    # Seed 42: v2 beats the v1 champion, and the agent proposes to promote it.
    assert pending.proposal == "PROMOTE" and pending.challenger_wape < pending.champion_wape
    assert (await handle.describe()).typed_search_attributes.get(STATUS) == "awaiting_approval"
    details = await current_details(handle)
    assert "Waiting for approval" in details and pending.rationale[:40] in details
    await handle.signal(DemoCascade.approve if answer == "approve" else DemoCascade.reject)
    result = await handle.result()
    assert result.overall_status == "pass"
    decision_row = next(s for s in result.steps if s.name == "agent_decision")
    assert ("approved by signal" if answer == "approve" else "rejected by signal") in (
        decision_row.detail
    )
    promoted = answer == "approve"
    assert result.decision == ("PROMOTE" if promoted else "HOLD")
    expected = pending.challenger_run_id if promoted else pending.champion_run_id
    assert result.champion_run_id == expected
    assert await alias_run_id(app_pool) == expected


async def test_no_answer_within_the_timeout_means_hold(
    settings: Settings, app_pool: asyncpg.Pool
) -> None:
    """On the time-skipping server the 90 s wait passes at once."""
    async with time_skipping_server() as env:
        task_queue = f"tq-{uuid.uuid4().hex[:8]}"
        async with build_worker(env.client, settings, task_queue) as worker, worker:
            handle = await start(
                env.client, task_queue, demo_input(scenario="showcase_rich", approval="manual")
            )
            waiting = await wait_for(handle, lambda p: p.pending_approval is not None, "approval")
            assert waiting.status == "awaiting_approval"
            await env.sleep(APPROVAL_TIMEOUT + timedelta(seconds=1))
            decided = await wait_for(
                handle,
                lambda p: (
                    next(s for s in p.steps if s.name == "agent_decision").status
                    not in ("pending", "running")
                ),
                "the decision",
            )
            try:
                await handle.result()
            except WorkflowFailureError:
                # The Experiment child (agent_eval) needs UpdateTaskQueueConfig, which
                # the time-skipping server lacks; the decision under test came before.
                pass
            final = await progress_of(handle)
            history = await handle.fetch_history()
    row = next(s for s in decided.steps if s.name == "agent_decision")
    assert row.status == "pass"
    assert f"no answer within {APPROVAL_TIMEOUT.total_seconds():.0f} s, hold" in row.detail
    assert decided.decision == "HOLD" and decided.pending_approval is None
    assert decided.champion_run_id == waiting.pending_approval.champion_run_id  # type: ignore[union-attr]
    failed = [s.name for s in final.steps if s.status == "fail"]
    assert failed in ([], ["agent_eval"]), final.steps
    timers = [e for e in history.events if e.HasField("timer_started_event_attributes")]
    assert any(
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta() == APPROVAL_TIMEOUT
        for e in timers
    )
    assert_invariant(final, await alias_run_id(app_pool))


# --- artifacts and the CLI -------------------------------------------------------------


async def test_artifact_hash_is_verified_on_load(app_pool: asyncpg.Pool) -> None:
    uri = f"demo/sessions/test-{uuid.uuid4().hex[:8]}/data/x.json"
    async with tenant_transaction(app_pool, "demo") as conn:
        digest = await registry.store_artifact(conn, "demo", uri, b'{"a": 1}')
        assert await registry.load_artifact(conn, "demo", uri, digest) == b'{"a": 1}'
        with pytest.raises(registry.ArtifactIntegrityError, match="registered hash"):
            await registry.load_artifact(conn, "demo", uri, "0" * 64)
        await conn.execute(
            "update registry_artifacts set data = $2 where tenant_id = 'demo' and uri = $1",
            uri,
            b'{"a": 2}',
        )
        with pytest.raises(registry.ArtifactIntegrityError, match="stored hash"):
            await registry.load_artifact(conn, "demo", uri)
        await registry.delete_artifacts(conn, "demo", uri)


async def test_a_vanished_run_fails_the_regression_check_without_retries(
    app_pool: asyncpg.Pool,
) -> None:
    """The run the trial swap put live is gone: NotFound, which is never retried."""
    swap_move_id, gone = f"test-{uuid.uuid4().hex}", uuid.uuid4()
    async with tenant_transaction(app_pool, "demo") as conn:
        await conn.execute(
            "insert into registry_alias_history (tenant_id, alias, to_run_id, reason, move_id)"
            " values ('demo', 'test-vanished', $1, 'test', $2)",
            gone,
            swap_move_id,
        )
    champion = RegisteredRun(
        run_id=str(uuid.uuid4()),
        name="c",
        model="naive",
        wape=0.1,
        artifact_uri="",
        artifact_sha256="",
    )
    check = RegressionCheckInput(
        step="safer_promote",
        session_prefix="demo/sessions/test/",
        alias="test-vanished",
        champion=champion,
        swap_move_id=swap_move_id,
    )
    with pytest.raises(NotFound, match=str(gone)) as raised:
        await ActivityEnvironment().run(DemoRegistryActivities(app_pool).check_regression, check)
    # What the worker's interceptor hands Temporal for it.
    assert to_application_error(raised.value).non_retryable


async def test_a_changed_artifact_fails_verify_and_the_run_compensates(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    """A real (not injected) failure: the champion's bytes change under the run."""
    handle = await start(client, worker, demo_input(scenario="showcase_rich", approval="manual"))
    waiting = await wait_for(handle, lambda p: p.pending_approval is not None, "approval")
    assert waiting.pending_approval is not None
    champion = waiting.pending_approval.champion_run_id
    async with tenant_transaction(app_pool, "demo") as conn:
        run = await registry.get_run(conn, "demo", champion)
        original = await registry.load_artifact(conn, "demo", run.artifact_uri or "")
        await conn.execute(
            "update registry_artifacts set data = $2 where tenant_id = 'demo' and uri = $1",
            run.artifact_uri,
            original + b" ",
        )
    try:
        await handle.signal(DemoCascade.reject)
        error = await failure_of(handle)
    finally:
        async with tenant_transaction(app_pool, "demo") as conn:
            await conn.execute(
                "update registry_artifacts set data = $2 where tenant_id = 'demo' and uri = $1",
                run.artifact_uri,
                original,
            )
    assert isinstance(error, ApplicationError)
    assert error.type == "ArtifactIntegrityError" and "stored hash" in error.message
    progress = await progress_of(handle)
    rows = {s.name: s for s in progress.steps}
    assert rows["verify"].status == "fail" and rows["cleanup"].status == "skip"
    assert rows["safer_promote"].status == "pass"  # its swap was rolled back in the step
    assert all(c.status == "pass" for c in progress.compensations)
    assert progress.champion_run_id == champion
    assert_invariant(progress, await alias_run_id(app_pool))


async def test_registry_cli_shows_runs_aliases_and_history(
    client: Client, worker: str, environ: dict[str, str]
) -> None:
    result = await (await start(client, worker, demo_input())).result()

    def cli(*args: str) -> str:
        done = konstruct(environ, *args, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    runs = json.loads(cli("registry", "runs", "--json"))
    assert result.champion_run_id in {r["run_id"] for r in runs}
    aliases = {a["alias"]: a for a in json.loads(cli("registry", "aliases", "--json"))}
    assert aliases[DEMO_ALIAS]["run_id"] == result.champion_run_id
    history = json.loads(cli("registry", "history", DEMO_ALIAS, "--json"))
    mine = [m for m in history if m["workflow_run_id"] == result.workflow_run_id]
    assert mine and mine[0]["to_run_id"] == result.champion_run_id
    text = cli("registry", "history", DEMO_ALIAS)
    assert result.workflow_id in text


async def test_demo_cli_runs_and_shows_progress(worker: str, environ: dict[str, str]) -> None:
    env = dict(environ, KONSTRUCT_TASK_QUEUE=worker)
    workflow_id = f"demo-cli-{uuid.uuid4().hex[:8]}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return konstruct(env, "demo", *args)

    ran = await asyncio.to_thread(
        cli, "run", "--scenario", "demo_minimal", "--id", workflow_id, "--json"
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout[ran.stdout.index("{") :])
    assert result["overall_status"] == "pass" and result["workflow_id"] == workflow_id
    shown = await asyncio.to_thread(cli, "progress", workflow_id, "--json")
    assert shown.returncode == 0, shown.stderr
    progress = json.loads(shown.stdout)
    assert progress["status"] == "completed"
    assert [s["status"] for s in progress["steps"]] == ["pass"] * len(MINIMAL_STEPS)
    failed = await asyncio.to_thread(
        cli, "run", "--scenario", "demo_minimal", "--fail-at", "promote"
    )
    assert failed.returncode == 1
    assert "InjectedFailure: injected failure at step 'promote'" in failed.stderr
    assert "compensation pass" in failed.stdout


def test_every_step_is_named_once() -> None:
    assert len(set(STEP_NAMES)) == len(STEP_NAMES)
    assert MINIMAL_STEPS == [
        "precheck",
        "reset",
        "seed_data",
        "features",
        "train_baselines",
        "backtest",
        "register_runs",
        "promote",
        "verify",
        "cleanup",
    ]
    assert timedelta(seconds=90) == APPROVAL_TIMEOUT
