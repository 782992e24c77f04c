"""Determinism: DemoCascade and BatchSweep histories must replay against today's code.

`tests.support.replay_all` says how to record them again from fresh runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.common import WorkflowIDReusePolicy
from temporalio.worker import Worker

from konstruct.config import Settings
from konstruct.demo.models import DemoProgress
from tests.support import recorded_histories, replay_all, replayer
from workers.main import build_worker
from workflows.batch_sweep import BatchSweep
from workflows.demo_cascade import DemoCascade

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)


async def test_recorded_histories_replay() -> None:
    histories = recorded_histories("demo_cascade_*.json", "batch_sweep_*.json")
    assert any(n.startswith("demo_cascade_") for n in histories), "no recorded DemoCascade"
    assert any(n.startswith("batch_sweep_") for n in histories), "no recorded BatchSweep"
    await replay_all(replayer(DemoCascade, BatchSweep), histories)


async def _until(handle: Any, check: Any) -> None:
    for _ in range(600):
        progress: DemoProgress = await handle.query(DemoCascade.progress)
        if check(progress):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out: {await handle.query(DemoCascade.progress)}")


async def _run_case(client: Client, task_queue: str, name: str, fields: dict[str, Any]) -> Any:
    handle = await client.start_workflow(
        DemoCascade.run,
        {"seed": 7, **fields},
        # The file stem is the workflow id on replay, and child ids derive from it.
        id=f"demo_cascade_{name}",
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        task_queue=task_queue,
    )
    if fields.get("approval") == "manual":
        await _until(handle, lambda p: p.pending_approval is not None)
        if name == "rich_cancelled":
            await handle.cancel()
        else:
            await handle.signal(DemoCascade.approve)
    try:
        await handle.result()
        succeeded = True
    except WorkflowFailureError:
        succeeded = False
    assert succeeded == name.endswith("_ok"), name
    return handle


async def test_fresh_runs_replay_without_cache(
    client: Client, settings: Settings, task_queue: str, worker: str
) -> None:
    """Every workflow task replays from scratch (no cache), then each whole history replays.

    The cases cover the paths with different commands: success, a failure with
    compensations, a manual approval by signal, a cancel, and the sweep child.
    The full showcase (with its Experiment child, whose calls need the provider
    queues of a regular worker) runs on the `worker` fixture's queue.
    """
    cases: dict[str, dict[str, Any]] = {
        "minimal_ok": {"scenario": "demo_minimal"},
        "minimal_fail_at_verify": {"scenario": "demo_minimal", "fail_at": "verify"},
        "rich_approved_fail_at_decision": {
            "scenario": "showcase_rich",
            "approval": "manual",
            "fail_at": "agent_decision",
        },
        "rich_cancelled": {"scenario": "showcase_rich", "approval": "manual"},
    }
    histories: dict[str, WorkflowHistory] = {}
    # A worker built only for its configuration, on a queue nobody uses.
    async with build_worker(client, settings, f"{task_queue}-template") as template:
        config = template.config()
        config["task_queue"] = no_cache_queue = f"{task_queue}-no-cache"
        config["max_cached_workflows"] = 0
        async with Worker(**config):
            for name, fields in cases.items():
                handle = await _run_case(client, no_cache_queue, name, fields)
                histories[f"demo_cascade_{name}"] = await handle.fetch_history()
                if name == "rich_approved_fail_at_decision":
                    sweep = client.get_workflow_handle(f"{handle.id}-sweep")
                    histories["batch_sweep_ok"] = await sweep.fetch_history()
    handle = await _run_case(client, worker, "rich_ok", {"scenario": "showcase_rich"})
    histories["demo_cascade_rich_ok"] = await handle.fetch_history()
    await replay_all(replayer(DemoCascade, BatchSweep), histories, record_as="")
