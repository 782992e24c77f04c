"""Determinism: recorded HandleMessage histories must replay against today's code.

`tests.support.replay_all` says how to record them again from a fresh run.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowHistory

from konstruct.agents.models import ToolDecision
from konstruct.agents.store.tools import put_tool
from konstruct.config import Settings
from konstruct.platform.db import tenant_transaction
from konstruct.platform.temporal.search_attributes import message_search_attributes
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import Hooks, recorded_histories, replay_all, replayer
from tests.test_agent_tools import (
    body,
    make_agent,
    new_tenant,
    start,
    wait_for,
    webhook,
)
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
    cases: dict[str, dict[str, Any]] = {
        "ok": {"agent_id": "assistant", "text": "What are you?"},
        "unknown_agent": {"agent_id": "ghost", "text": "hello"},
        # As the gateway and `konstruct send` start it: search attributes set at start.
        "started_with_attributes": {"agent_id": "assistant", "text": "What are you?"},
        "degraded": {"agent_id": "assistant", "text": "nobody answers"},
        # Streamed: the live text goes through PostgreSQL, history keeps the flag.
        "streamed": {"agent_id": "assistant", "text": "What are you?", "stream": True},
        # A structured answer repaired once, and one that still does not fit.
        "structured_repaired": {
            "agent_id": "assistant",
            "text": "As JSON please",
            "response_format": {"type": "json_object"},
        },
        "structured_does_not_fit": {
            "agent_id": "assistant",
            "text": "As JSON, never",
            "response_format": {"type": "json_object"},
        },
    }
    histories: dict[str, WorkflowHistory] = {}
    async with build_worker(client, settings, task_queue, max_cached_workflows=0) as worker:
        async with worker:
            for name, fields in cases.items():
                if name == "degraded":
                    await sim.set_profile("sim-fast", outage=True)
                if name.startswith("structured"):
                    await sim.set_profile("sim-fast", outage=False)
                    await sim.reset()  # the forced mismatches count from here
                    mismatches = 1 if name == "structured_repaired" else 2
                    await sim.set_profile("sim-fast", json_mismatch_first=mismatches)
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
                    search_attributes=(
                        message_search_attributes("demo")
                        if name == "started_with_attributes"
                        else None
                    ),
                )
                try:
                    await handle.result()
                except Exception:
                    assert name in ("unknown_agent", "structured_does_not_fit")
                histories[name] = await handle.fetch_history()
    await replay_all(replayer(HandleMessage), histories, record_as="handle_message_agent_")


async def test_fresh_tool_and_approval_runs_replay_without_cache(
    client: Client, settings: Settings, task_queue: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """The agent loop's paths: a tool call, two at once, approve, reject, the step limit."""
    tenant = new_tenant()
    await make_agent(app_pool, tenant, [])
    async with tenant_transaction(app_pool, tenant) as conn:
        await put_tool(
            conn, tenant, webhook("refund", f"{hooks.url}/refund", requires_approval=True)
        )
        await put_tool(conn, tenant, webhook("flaky", f"{hooks.url}/flaky"))
    await make_agent(app_pool, tenant, ["calculator", "refund", "flaky"], max_steps=3)
    cases = {
        "calculator": "What is 6 * 7?",
        "two_calls": '/tool calculator {"expression": "1+2"}\n/tool flaky {"x": 1}',
        "approved": '/tool refund {"x": 1}',
        "rejected": '/tool refund {"x": 2}',
        "step_limit": '/tool calculator {"expression": "1+1"}\n/tool-repeat',
    }
    histories: dict[str, WorkflowHistory] = {}
    async with build_worker(client, settings, task_queue, max_cached_workflows=0) as worker:
        async with worker:
            for name, text in cases.items():
                handle = await start(client, task_queue, body(tenant, text))
                if name in ("approved", "rejected"):
                    waiting = await wait_for(handle, lambda p: bool(p["pending"]), "approval")
                    decision = ToolDecision(call_id=waiting["pending"][0]["call_id"], by="t")
                    update = (
                        HandleMessage.approve_tool
                        if name == "approved"
                        else (HandleMessage.reject_tool)
                    )
                    await handle.execute_update(update, decision)
                await handle.result()
                histories[name] = await handle.fetch_history()
    await replay_all(replayer(HandleMessage), histories, record_as="handle_message_agent_")
