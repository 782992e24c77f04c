"""Determinism: recorded HandleMessage histories must replay against today's code.

`tests.support.replay_all` says how to record them again from a fresh run.
"""

from __future__ import annotations

import uuid

from temporalio.client import Client, WorkflowHistory

from konstruct.config import Settings
from konstruct.simulator_admin import SimulatorAdmin
from tests.support import recorded_histories, replay_all, replayer
from workers.main import build_worker
from workflows.handle_message import HandleMessage


async def test_recorded_histories_replay() -> None:
    histories = recorded_histories("handle_message_*.json")
    assert histories, "no recorded HandleMessage history in tests/histories"
    await replay_all(replayer(HandleMessage), histories)


async def test_fresh_runs_replay_without_cache(
    client: Client, settings: Settings, task_queue: str, sim: SimulatorAdmin
) -> None:
    """Every workflow task replays from scratch (no cache), then the whole history replays."""
    cases = {
        "ok": {"agent_id": "assistant", "text": "What are you?"},
        "unknown_agent": {"agent_id": "ghost", "text": "hello"},
        "degraded": {"agent_id": "assistant", "text": "nobody answers"},
    }
    histories: dict[str, WorkflowHistory] = {}
    async with build_worker(client, settings, task_queue, max_cached_workflows=0) as worker:
        async with worker:
            for name, fields in cases.items():
                if name == "degraded":
                    await sim.set_profile("sim-fast", outage=True)
                body = {
                    "message_id": f"replay-{uuid.uuid4().hex[:8]}",
                    "tenant_id": "demo",
                    "thread_id": "replay",
                    "channel": "test",
                    "sender": "u",
                    **fields,
                }
                handle = await client.start_workflow(
                    HandleMessage.run,
                    body,
                    id=f"replay-{name}-{uuid.uuid4().hex[:6]}",
                    task_queue=task_queue,
                )
                try:
                    await handle.result()
                except Exception:
                    assert name == "unknown_agent"
                histories[name] = await handle.fetch_history()
    await replay_all(replayer(HandleMessage), histories, record_as="handle_message_")
