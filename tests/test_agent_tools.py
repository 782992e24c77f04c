"""Agents that act, end to end: tools as activities, approval, bounded memory.

Real dev server, real PostgreSQL, the simulator over HTTP through litellm (its
scripted tool calls: a line `/tool NAME {json}` in the message is called with
exactly those arguments when the tool is offered), and webhook tools served by
a small aiohttp server in the test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError

from activities.agent import RESULT_CHARS, TOOL_ATTEMPTS, stop_reply
from konstruct.agents.models import AgentProfile, HandleMessageResult, ToolDecision, ToolSpec
from konstruct.agents.store.agents import put_agent
from konstruct.agents.store.knowledge import add_document
from konstruct.agents.store.tools import allow_hosts, put_tool
from konstruct.config import Settings
from konstruct.platform.db import tenant_transaction
from konstruct.providers.router import build_router, load_router_config
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import Hooks, WorkerProcess, time_skipping_server
from workers.main import build_worker
from workflows.handle_message import HandleMessage

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

SECRET_ENV = "KONSTRUCT_TEST_HOOK_SECRET"
SECRET = "s3cret-hook-value-" + uuid.uuid4().hex[:8]


def new_tenant() -> str:
    return f"tools-{uuid.uuid4().hex[:8]}"


async def make_agent(
    pool: asyncpg.Pool, tenant: str, tools: list[str], **fields: Any
) -> AgentProfile:
    profile = AgentProfile(
        agent_id="helper",
        name="Tess",
        role="an assistant that uses tools",
        fallback_reply="Sorry, not now.",
        tools=tools,
        **fields,
    )
    async with tenant_transaction(pool, tenant) as conn:
        await put_agent(conn, tenant, profile)
    return profile


async def new_agent(pool: asyncpg.Pool, tools: list[str], **fields: Any) -> str:
    """A new tenant whose agent may use `tools`; returns the tenant."""
    tenant = new_tenant()
    await make_agent(pool, tenant, tools, **fields)
    return tenant


def body(tenant: str, text: str, thread: str | None = None) -> dict[str, Any]:
    return {
        "message_id": f"m-{uuid.uuid4().hex[:8]}",
        "tenant_id": tenant,
        "agent_id": "helper",
        "thread_id": thread or f"t-{uuid.uuid4().hex[:6]}",
        "channel": "test",
        "sender": "u",
        "text": text,
    }


async def start(
    client: Client, task_queue: str, message: dict[str, Any], *, eager: bool = False
) -> WorkflowHandle:
    return await client.start_workflow(
        HandleMessage.run,
        message,
        id=f"msg-{message['tenant_id']}-{message['message_id']}",
        task_queue=task_queue,
        # The gateway's way: the first workflow task goes straight to this
        # process's worker (the in-process `worker` fixture), saving a round trip.
        request_eager_start=eager,
    )


async def send(client: Client, task_queue: str, message: dict[str, Any]) -> HandleMessageResult:
    return await (await start(client, task_queue, message)).result()


async def rows(pool: asyncpg.Pool, tenant: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async with tenant_transaction(pool, tenant) as conn:
        return await conn.fetch(sql, *args)


async def tool_calls(pool: asyncpg.Pool, tenant: str, message_id: str) -> list[asyncpg.Record]:
    return await rows(
        pool,
        tenant,
        "select * from tool_calls where message_id = $1 order by step, position",
        message_id,
    )


async def turns(pool: asyncpg.Pool, tenant: str, message_id: str) -> int:
    """How many turns are stored for the message."""
    found = await rows(
        pool, tenant, "select 1 from message_turns where message_id = $1", message_id
    )
    return len(found)


async def send_across_a_kill(
    client: Client,
    task_queue: str,
    worker_process: Callable[[str], WorkerProcess],
    message: dict[str, Any],
    arrived: asyncio.Event,
) -> HandleMessageResult:
    """`message` on a worker process that is killed -9 once `arrived` is set (its tool
    call in flight), then finished by a second worker process."""
    first = worker_process("a")
    handle = await start(client, task_queue, message)
    await asyncio.wait_for(arrived.wait(), 60)
    first.kill()
    worker_process("b")
    return await asyncio.wait_for(handle.result(), 120)


async def wait_for(
    handle: WorkflowHandle, ready: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    for _ in range(400):
        progress: dict[str, Any] = await handle.query("progress")
        if ready(progress):
            return progress
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen: {progress}")


async def agent_with_webhook(
    pool: asyncpg.Pool, tenant: str, tool: ToolSpec, *more_tools: str
) -> None:
    """The tenant's agent, allowed `tool` (stored once the agent, hence the tenant, exists)."""
    await make_agent(pool, tenant, [])
    async with tenant_transaction(pool, tenant) as conn:
        await put_tool(conn, tenant, tool)
    await make_agent(pool, tenant, [tool.name, *more_tools])


def webhook(name: str, url: str, **fields: Any) -> ToolSpec:
    return ToolSpec(
        name=name,
        kind="webhook",
        description=f"the {name} webhook",
        parameters={"type": "object", "properties": {"x": {"type": "integer"}}},
        url=url,
        **fields,
    ).check_kind()


# --- tools ---------------------------------------------------------------------


async def test_a_calculator_answer_with_the_exact_arguments(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    tenant = await new_agent(app_pool, ["calculator"])
    message = body(tenant, "What is 12 * 7 + 3?")
    result = await send(client, worker, message)
    assert result.response == "The answer is 87."
    assert (result.steps, result.tool_calls, result.degraded) == (2, 1, False)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert call["tool"] == "calculator"
    assert json.loads(call["arguments"]) == {"expression": "12 * 7 + 3"}
    assert (call["status"], call["result"], call["attempts"]) == ("ok", "87", 1)
    [turn] = await rows(
        app_pool, tenant, "select * from message_turns where message_id = $1", message["message_id"]
    )
    assert turn["reply_text"] == "The answer is 87." and turn["tool_calls"] == 1


async def test_two_calls_of_one_step_run_at_once_and_the_webhook_gets_its_key_and_secret(
    client: Client,
    worker: str,
    app_pool: asyncpg.Pool,
    hooks: Hooks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    tenant = new_tenant()
    lookup = webhook(
        "lookup", f"{hooks.url}/lookup", secret_header="X-Hook-Secret", secret_env=SECRET_ENV
    )
    await agent_with_webhook(app_pool, tenant, lookup, "calculator")
    message = body(tenant, '/tool lookup {"x": 1}\n/tool calculator {"expression": "6*7"}')
    handle = await start(client, worker, message)
    result = await handle.result()
    calls = await tool_calls(app_pool, tenant, message["message_id"])
    assert [(c["tool"], json.loads(c["arguments"])) for c in calls] == [
        ("lookup", {"x": 1}),
        ("calculator", {"expression": "6*7"}),
    ]
    assert result.response == (
        'Tool lookup returned: hook /lookup got {"x": 1}\nTool calculator returned: 42'
    )
    [request] = hooks.requests
    assert request["key"] == calls[0]["call_id"] and request["body"]["call_id"] == request["key"]
    assert request["secret"] == SECRET
    history = await handle.fetch_history()
    assert SECRET not in json.dumps(history.to_json_dict())
    # Both tool activities were scheduled before either of them completed.
    kinds = [
        e.WhichOneof("attributes")
        for e in history.events
        if e.WhichOneof("attributes")
        in ("activity_task_scheduled_event_attributes", "activity_task_completed_event_attributes")
    ]
    assert kinds[:2] == ["activity_task_scheduled_event_attributes"] * 2


async def test_a_failing_tool_is_retried_then_the_model_is_told(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = new_tenant()
    await agent_with_webhook(app_pool, tenant, webhook("flaky", f"{hooks.url}/flaky"))
    message = body(tenant, '/tool flaky {"x": 2}')
    result = await send(client, worker, message)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    # Every attempt carried the same idempotency key.
    assert hooks.keys("/flaky") == [call["call_id"]] * TOOL_ATTEMPTS
    assert (call["status"], call["attempts"]) == ("error", TOOL_ATTEMPTS)
    assert "503" in call["result"]
    assert result.response.startswith("Tool flaky returned: error: webhook flaky")
    assert result.degraded is False


async def test_a_long_tool_result_is_cut_before_it_goes_back_to_the_model(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = new_tenant()
    await agent_with_webhook(app_pool, tenant, webhook("big", f"{hooks.url}/big"))
    message = body(tenant, '/tool big {"x": 3}')
    await send(client, worker, message)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert len(call["result"]) == RESULT_CHARS
    assert call["result"].startswith("xxx") and "[cut: " in call["result"]


async def test_http_request_reaches_only_allowed_hosts(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await new_agent(app_pool, ["http_request"])
    page = f"{hooks.url}/page"
    text = f'/tool http_request {{"method": "GET", "url": "{page}"}}'
    refused = await send(client, worker, body(tenant, text))
    assert "not on this tenant's allow-list" in refused.response
    async with tenant_transaction(app_pool, tenant) as conn:
        await allow_hosts(conn, tenant, ["127.0.0.1"], [])
    allowed = await send(client, worker, body(tenant, text))
    assert allowed.response == "Tool http_request returned: HTTP 200 the page says hello"


async def test_a_worker_that_forbids_loopback_sends_no_tool_call_there(
    client: Client, settings: Settings, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    # The webhook's host is a name (so it passes registration) that resolves to
    # loopback; this worker's config allows no non-public address. The model is told
    # why at once (not retried), the message ends, and nothing reaches the hook.
    strict = settings.model_copy(update={"tools": settings.tools.model_copy(
        update={"allow_addresses": []})})  # fmt: skip
    tenant = new_tenant()
    by_name = hooks.url.replace("127.0.0.1", "localhost")
    await agent_with_webhook(app_pool, tenant, webhook("lookup", f"{by_name}/lookup"))
    queue = f"strict-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, strict, queue) as w, w:
        message = body(tenant, '/tool lookup {"x": 1}')
        result = await send(client, queue, message)
        await allow_hosts_for(app_pool, tenant, by_name)
        fetched = await send(client, queue, body(tenant, f'/tool http_request {{"method": "GET", "url": "{by_name}/page"}}'))  # fmt: skip
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["attempts"]) == ("error", 1)
    assert "'localhost' resolves to" in call["result"] and "loopback" in call["result"]
    assert result.response.startswith("Tool lookup returned: error: webhook lookup")
    assert "loopback" in fetched.response
    assert hooks.requests == []


async def allow_hosts_for(pool: asyncpg.Pool, tenant: str, url: str) -> None:
    """`http_request` and `url`'s host on the tenant's agent and allow-list."""
    await make_agent(pool, tenant, ["lookup", "http_request"])
    async with tenant_transaction(pool, tenant) as conn:
        await allow_hosts(conn, tenant, [url.split("//", 1)[1].split("/", 1)[0]], [])


async def test_an_unknown_tool_and_bad_arguments_are_told_to_the_model(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    tenant = await new_agent(app_pool, ["calculator"])
    message = body(tenant, '/tool calculator {"expression": "__import__(\'os\')"}')
    result = await send(client, worker, message)
    assert result.response.startswith("Tool calculator returned: error: calculator refused")


async def test_the_loop_stops_politely_after_max_steps(
    client: Client, worker: str, app_pool: asyncpg.Pool
) -> None:
    tenant = await new_agent(app_pool, ["calculator"], max_steps=3)
    message = body(tenant, '/tool calculator {"expression": "1+1"}\n/tool-repeat')
    result = await send(client, worker, message)
    assert result.response == stop_reply(3)
    # Steps 1 and 2 ran the tool; the calls the third step asked for were not run.
    assert (result.steps, result.tool_calls) == (3, 2)
    calls = await tool_calls(app_pool, tenant, message["message_id"])
    assert [(c["step"], c["status"]) for c in calls] == [(0, "ok"), (1, "ok")]


# --- approval ------------------------------------------------------------------


async def approval_agent(pool: asyncpg.Pool, hooks: Hooks, **fields: Any) -> str:
    tenant = new_tenant()
    refund = webhook("refund", f"{hooks.url}/refund", requires_approval=True, **fields)
    await agent_with_webhook(pool, tenant, refund)
    return tenant


async def start_pending(
    client: Client, task_queue: str, tenant: str, text: str
) -> tuple[dict[str, Any], WorkflowHandle, dict[str, Any]]:
    """Sends `text`; once a tool call awaits approval, the message, handle and progress."""
    message = body(tenant, text)
    handle = await start(client, task_queue, message)
    waiting = await wait_for(handle, lambda p: bool(p["pending"]), "a pending call")
    return message, handle, waiting


async def test_approve_runs_the_tool_and_progress_shows_the_pending_call(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await approval_agent(app_pool, hooks)
    message, handle, waiting = await start_pending(client, worker, tenant, '/tool refund {"x": 30}')
    assert waiting["status"] == "awaiting_approval"
    [pending] = waiting["pending"]
    assert pending["tool"] == "refund" and json.loads(pending["arguments"]) == {"x": 30}
    assert hooks.requests == []
    listed = await rows(
        app_pool, tenant, "select call_id from tool_calls where status = 'awaiting_approval'"
    )
    assert [r["call_id"] for r in listed] == [pending["call_id"]]
    description = await handle.describe()
    assert description.search_attributes.get("KonstructStatus") == ["awaiting_approval"]
    # A call id that is not pending is refused by the validator.
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(HandleMessage.approve_tool, ToolDecision(call_id="nope"))
    assert "is waiting for approval" in str(refused.value.cause)
    answer = await handle.execute_update(
        HandleMessage.approve_tool, ToolDecision(call_id=pending["call_id"], by="ana")
    )
    assert answer == f"approved {pending['call_id']}"
    result = await handle.result()
    assert result.response == 'Tool refund returned: hook /refund got {"x": 30}'
    assert hooks.executed[pending["call_id"]] == 1
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["decided_by"], call["attempts"]) == ("ok", "ana", 1)
    final = await handle.query("progress")
    assert final["status"] == "completed" and final["pending"] == []


async def test_reject_tells_the_model_and_runs_nothing(
    client: Client, worker: str, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    tenant = await approval_agent(app_pool, hooks)
    message, handle, waiting = await start_pending(
        client, worker, tenant, '/tool refund {"x": 999}'
    )
    call_id = waiting["pending"][0]["call_id"]
    await handle.execute_update(
        HandleMessage.reject_tool, ToolDecision(call_id=call_id, by="ana", reason="too much")
    )
    result = await handle.result()
    assert result.response == "Tool refund returned: A person rejected this call: too much"
    assert hooks.requests == []
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["decided_by"], call["attempts"]) == ("rejected", "ana", 0)


async def test_no_answer_within_the_approval_timeout_is_a_rejection(
    settings: Settings, app_pool: asyncpg.Pool, hooks: Hooks
) -> None:
    """On the time-skipping server the 10-minute wait passes at once."""
    tenant = await approval_agent(app_pool, hooks)
    async with time_skipping_server() as env:
        task_queue = f"tq-{uuid.uuid4().hex[:8]}"
        async with build_worker(env.client, settings, task_queue) as worker, worker:
            message = body(tenant, '/tool refund {"x": 5}')
            handle = await start(env.client, task_queue, message)
            result = await handle.result()
            history = await handle.fetch_history()
    assert result.response == (
        "Tool refund returned: No one approved this call within 600 s; it was not run."
    )
    assert hooks.requests == []
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert call["status"] == "timed_out"
    timers = [e for e in history.events if e.HasField("timer_started_event_attributes")]
    assert [
        t.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta() for t in timers
    ] == [timedelta(minutes=10)]


# --- crash mid-tool-call ---------------------------------------------------------


async def test_kill_9_mid_tool_call_gives_one_result_per_call_id_and_one_turn(
    client: Client,
    app_pool: asyncpg.Pool,
    hooks: Hooks,
    task_queue: str,
    worker_process: Callable[[str], WorkerProcess],
) -> None:
    tenant = new_tenant()
    await agent_with_webhook(app_pool, tenant, webhook("slowhook", f"{hooks.url}/slow"))
    hooks.hold_first = True
    message = body(tenant, '/tool slowhook {"x": 7}')
    result = await send_across_a_kill(client, task_queue, worker_process, message, hooks.arrived)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    # The retry carried the same key; the webhook ran the call once.
    assert hooks.keys("/slow") == [call["call_id"]] * 2
    assert hooks.executed == Counter({call["call_id"]: 1})
    assert (call["status"], call["attempts"]) == ("ok", 2)
    assert result.response == 'Tool slowhook returned: hook /slow got {"x": 7}'
    assert await turns(app_pool, tenant, message["message_id"]) == 1


# --- memory ----------------------------------------------------------------------


async def test_a_200_turn_thread_stays_within_its_prompt_budget(
    client: Client, worker: str, app_pool: asyncpg.Pool, sim: SimulatorAdmin
) -> None:
    tenant = new_tenant()
    budget = 300
    await make_agent(app_pool, tenant, [], history_turns=6, memory_tokens=budget)
    thread = "long"
    filler = " ".join(["words"] * 30)
    prompts: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    for turn in range(1, 201):
        message = body(tenant, f"turn {turn:03d}: {filler}", thread=thread)
        handle = await start(client, worker, message, eager=True)
        result = await handle.result()
        prompts.append(result.usage.prompt_tokens)
        if turn in (1, 2, 100, 199, 200):
            history = await handle.fetch_history()
            sizes[turn] = (len(history.events), len(history.to_json()))
    [summary] = await rows(
        app_pool, tenant, "select * from thread_summaries where thread_id = $1", thread
    )
    assert summary["turns"] > 150
    # The simulator counts words; the budget is in estimated tokens (4 characters):
    # the memory part is at most `budget` of them, the summary half of that.
    system_and_message = max(prompts[:1])
    assert max(prompts) <= system_and_message + 2 * budget, prompts
    print(f"prompt tokens: first {prompts[0]}, max {max(prompts)}, last {prompts[-1]}")
    print(f"history (events, bytes) by turn: {sizes}")
    # A message's history does not grow with the thread: same events, same size
    # up to the few bytes of its ids (a turn that also summarised has one more step).
    first_events, first_bytes = sizes[1]
    for events, size in sizes.values():
        assert events <= first_events + 2, sizes
        assert size <= first_bytes + 1500, sizes


# --- knowledge -------------------------------------------------------------------


async def test_knowledge_search_answers_from_the_tenants_own_documents_only(
    client: Client, worker: str, app_pool: asyncpg.Pool, settings: Settings
) -> None:
    router = build_router(load_router_config(settings.path(settings.llm.router_config)))
    tenant_a, tenant_b = new_tenant(), new_tenant()
    await make_agent(app_pool, tenant_a, ["knowledge_search"])
    await make_agent(app_pool, tenant_b, ["knowledge_search"])
    secret_plan = "Project falcon launches on the ninth of March with forty engineers."
    await add_document(app_pool, router, tenant_a, "plans", "Plans", secret_plan, "a.md")
    await add_document(
        app_pool, router, tenant_b, "menu", "Menu", "The canteen serves soup on Fridays.", "b.md"
    )
    asked_a = await send(client, worker, body(tenant_a, "search: when does project falcon launch"))
    assert asked_a.response.startswith("From the knowledge base: [1] Plans (plans#0)")
    assert "ninth of March" in asked_a.response
    # The same question from tenant B finds B's document only (RLS, not a WHERE clause).
    asked_b = await send(client, worker, body(tenant_b, "search: when does project falcon launch"))
    assert "falcon" not in asked_b.response.split("):", 1)[-1]
    assert "canteen" in asked_b.response and "ninth of March" not in asked_b.response
