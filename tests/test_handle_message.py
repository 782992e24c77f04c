"""HandleMessage end to end: real dev server, real PostgreSQL, the simulator through litellm."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from konstruct.agents.models import AgentProfile, HandleMessageResult
from konstruct.agents.store.agents import put_agent
from konstruct.platform.db import tenant_transaction
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import SIMULATOR_TEST_KEY, TAKEOVER_TASK_TIMEOUT, WorkerRelay, call_in_flight
from workflows.handle_message import HandleMessage


def message(**overrides: Any) -> dict[str, Any]:
    body = {
        "message_id": f"m-{uuid.uuid4().hex[:8]}",
        "tenant_id": "demo",
        "agent_id": "assistant",
        "thread_id": f"t-{uuid.uuid4().hex[:6]}",
        "channel": "cli",
        "sender": "user-1",
        "text": "What are you?",
    }
    body.update(overrides)
    return body


async def send(client: Client, task_queue: str, body: dict[str, Any]) -> HandleMessageResult:
    return await client.execute_workflow(
        HandleMessage.run,
        body,
        id=f"msg-{body.get('tenant_id')}-{body.get('message_id')}-{uuid.uuid4().hex[:4]}",
        task_queue=task_queue,
    )


async def turns(pool: asyncpg.Pool, tenant: str, message_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('konstruct.tenant_id', $1, true)", tenant)
        return await conn.fetch(
            "select * from message_turns where tenant_id = $1 and message_id = $2",
            tenant,
            message_id,
        )


async def test_reply_has_the_contract_shape_and_says_it_is_an_ai(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    body = message()
    result = await send(client, worker, body)
    assert set(result.model_dump()) == {
        "message_id",
        "tenant_id",
        "agent_id",
        "thread_id",
        "response",
        "model_group",
        "model",
        "fallback_used",
        "degraded",
        "usage",
        "steps",
        "tool_calls",
    }
    assert result.degraded is False and result.fallback_used is False
    assert (result.steps, result.tool_calls) == (1, 0)
    assert result.model_group == "fast" and "sim-fast" in result.model
    assert "AI" in result.response
    assert result.usage.total_tokens > 0
    stored = await turns(app_pool, "demo", body["message_id"])
    assert len(stored) == 1 and stored[0]["reply_text"] == result.response
    assert (await sim.model_stats("sim-fast"))["ok"] == 1


async def put_expert(pool: asyncpg.Pool, fallback_reply: str) -> None:
    """Agent acme/expert, answering from the quality group."""
    async with tenant_transaction(pool, "acme") as conn:
        await put_agent(
            conn,
            "acme",
            AgentProfile(
                agent_id="expert",
                name="Ada",
                role="an expert",
                model_group="quality",
                fallback_reply=fallback_reply,
            ),
        )


async def test_quality_falls_back_to_fast_when_quality_providers_fail(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await put_expert(app_pool, fallback_reply="Ada is unavailable.")
    await sim.set_profile("sim-quality", outage=True)
    result = await send(client, worker, message(tenant_id="acme", agent_id="expert"))
    assert result.fallback_used is True
    assert result.model_group == "fast"
    assert "sim-fast" in result.model
    assert result.degraded is False
    assert (await sim.model_stats("sim-quality"))["outage"] >= 1


async def test_polite_fallback_when_every_provider_fails(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    await put_expert(app_pool, fallback_reply="Ada is unavailable, please try later.")
    await sim.set_profile("sim-quality", outage=True)
    await sim.set_profile("sim-fast", outage=True)
    body = message(tenant_id="acme", agent_id="expert")
    result = await send(client, worker, body)
    assert result.degraded is True
    assert result.response == "Ada is unavailable, please try later."
    assert result.model == "none"
    stored = await turns(app_pool, "acme", body["message_id"])
    assert len(stored) == 1 and stored[0]["degraded"] is True
    # Three Temporal attempts, each trying quality then fast once: no multiplied retries.
    assert (await sim.model_stats("sim-quality"))["requests"] == 3
    assert (await sim.model_stats("sim-fast"))["requests"] == 3


async def test_duplicate_delivery_stores_one_turn_and_returns_the_same_reply(
    client: Client, worker: str, sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    body = message(text="Tell me something about 3 + 4")
    workflow_id = f"msg-demo-{body['message_id']}"
    first = await client.execute_workflow(
        HandleMessage.run, body, id=workflow_id, task_queue=worker
    )
    # Same workflow id again (a new run), then a different workflow id for the same message.
    again = await client.execute_workflow(
        HandleMessage.run, body, id=workflow_id, task_queue=worker
    )
    other = await send(client, worker, body)
    assert first == again == other
    assert len(await turns(app_pool, "demo", body["message_id"])) == 1
    assert (await sim.model_stats("sim-fast"))["ok"] == 1


async def test_concurrent_duplicates_store_one_turn(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    body = message()
    results = await asyncio.gather(*(send(client, worker, body) for _ in range(4)))
    assert len({r.response for r in results}) == 1
    assert len(await turns(app_pool, "demo", body["message_id"])) == 1


async def failure_of(client: Client, task_queue: str, body: dict[str, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as info:
        await send(client, task_queue, body)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": ""}, "text"),
        ({"tenant_id": "Not A Tenant!"}, "tenant_id"),
        ({"colour": "blue"}, "colour"),
        ({"message_id": None}, "message_id"),
    ],
)
async def test_bad_input_fails_at_once_naming_the_field(
    client: Client, worker: str, change: dict[str, Any], field: str
) -> None:
    body = message()
    body.update(change)
    error = await failure_of(client, worker, body)
    assert error.type == "InvalidInput"
    assert error.non_retryable
    assert field in error.message


async def test_missing_field_is_named(client: Client, worker: str) -> None:
    body = message()
    del body["sender"]
    error = await failure_of(client, worker, body)
    assert error.type == "InvalidInput" and "sender" in error.message


async def test_unknown_tenant_and_agent_get_clear_errors(client: Client, worker: str) -> None:
    tenant_error = await failure_of(client, worker, message(tenant_id="nobody"))
    assert tenant_error.type == "UnknownTenant" and "nobody" in tenant_error.message
    agent_error = await failure_of(client, worker, message(agent_id="ghost"))
    assert agent_error.type == "UnknownAgent" and "ghost" in agent_error.message


async def test_killed_worker_mid_message_is_finished_by_another(
    client: Client, relay: WorkerRelay, task_queue: str, app_pool: asyncpg.Pool
) -> None:
    await relay.start_slow("sim-fast", latency_ms=3000)
    body = message(text="Slow question for a doomed worker")
    handle = await client.start_workflow(
        HandleMessage.run,
        body,
        id=f"msg-demo-{body['message_id']}",
        task_queue=task_queue,
        task_timeout=TAKEOVER_TASK_TIMEOUT,
    )
    if not await call_in_flight(relay.sim, "sim-fast", polls=200):
        pytest.fail("the provider call never started")
    await relay.hand_over(latency_ms=5)
    result: HandleMessageResult = await handle.result()
    assert result.degraded is False
    stored = await turns(app_pool, "demo", body["message_id"])
    assert len(stored) == 1 and stored[0]["reply_text"] == result.response


async def test_tenant_a_cannot_read_or_write_tenant_b(app_pool: asyncpg.Pool) -> None:
    async with tenant_transaction(app_pool, "tenant-a") as conn:
        await put_agent(
            conn,
            "tenant-a",
            AgentProfile(agent_id="secret", name="A", role="r", fallback_reply="x"),
        )
    async with app_pool.acquire() as conn:
        role = await conn.fetchrow(
            "select rolsuper, rolbypassrls from pg_roles where rolname = current_user"
        )
        assert role["rolsuper"] is False and role["rolbypassrls"] is False
        async with conn.transaction():
            await conn.execute("select set_config('konstruct.tenant_id', 'tenant-b', true)")
            # No WHERE clause: only the policy stands between B and A's rows.
            assert await conn.fetch("select * from agents") == []
            assert await conn.fetch("select * from tenants where tenant_id = 'tenant-a'") == []
            updated = await conn.execute("update agents set name = 'pwned'")
            assert updated == "UPDATE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute("select set_config('konstruct.tenant_id', 'tenant-b', true)")
                await conn.execute(
                    "insert into agents (tenant_id, agent_id, name, role) "
                    "values ('tenant-a', 'planted', 'x', 'y')"
                )
        # Outside any tenant transaction nothing is visible at all, and the
        # setting does not leak from an earlier transaction on this connection.
        assert await conn.fetch("select * from agents") == []
    async with app_pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('konstruct.tenant_id', 'tenant-a', true)")
        names = [r["name"] for r in await conn.fetch("select name from agents")]
        assert names == ["A"]


async def test_no_secret_reaches_workflow_history(client: Client, worker: str) -> None:
    body = message(text="Is my key safe?")
    await send(client, worker, body)
    await failure_of(client, worker, message(agent_id="ghost"))
    scanned = 0
    async for execution in client.list_workflows("WorkflowType = 'HandleMessage'"):
        history = await client.get_workflow_handle(
            execution.id, run_id=execution.run_id
        ).fetch_history()
        text = json.dumps(history.to_json_dict())
        assert SIMULATOR_TEST_KEY not in text
        assert "api_key" not in text
        scanned += 1
    assert scanned >= 2


async def test_spans_link_workflow_activity_and_provider_call(
    span_exporter: Any, client: Client, worker: str
) -> None:
    span_exporter.clear()
    await send(client, worker, message())
    spans = span_exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    provider = next(s for s in spans if s.name == "llm.completion")
    chain = [provider.name]
    parent = provider.parent
    while parent is not None and parent.span_id in by_id:
        span = by_id[parent.span_id]
        chain.append(span.name)
        parent = span.parent
    # The interceptor parents workflow-side spans on the StartWorkflow context.
    assert chain == [
        "llm.completion",
        "RunActivity:agent_step",
        "StartActivity:agent_step",
        "StartWorkflow:HandleMessage",
    ]
    trace_id = provider.context.trace_id
    names_in_trace = {s.name for s in spans if s.context.trace_id == trace_id}
    assert {
        "RunWorkflow:HandleMessage",
        "RunActivity:agent_step",
    } <= names_in_trace
