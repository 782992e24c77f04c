"""A tenant's MCP servers as its agent's tools, end to end.

A real MCP server written with the official `mcp` package (streamable HTTP, served
by uvicorn in this process), registered with the real CLI (a subprocess), its tools
called by an agent on a real worker through the simulator's scripted tool calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from temporalio.client import Client

from activities.agent import TOOL_ATTEMPTS
from konstruct.agents.tools import AddressPolicy
from konstruct.agents.tools.mcp_servers import McpServer, list_server_tools, mcp_tool_name
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import ToolError
from tests.support import WorkerProcess
from tests.test_agent_tools import (
    body,
    make_agent,
    new_tenant,
    rows,
    send,
    send_across_a_kill,
    start,
    tool_calls,
    turns,
)
from tests.test_cli import assert_one_line_error, konstruct
from workflows.handle_message import TOOL_HEARTBEAT

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

SECRET_ENV = "KONSTRUCT_TEST_MCP_KEY"
SECRET = "mcp-secret-" + uuid.uuid4().hex[:8]


def calculator_server() -> MCPServer:
    server = MCPServer("calc")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("the tool broke")

    @server.tool()
    async def slow(seconds: float) -> str:
        """Answer after `seconds`."""
        await asyncio.sleep(seconds)
        return f"slept {seconds:g} s"

    return server


@dataclass
class Served:
    url: str
    # The headers of every POST the server received.
    posts: list[dict[str, str]] = field(default_factory=list)


def recording(app: Any, posts: list[dict[str, str]]) -> Callable[..., Awaitable[None]]:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            posts.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    return asgi


class MalformedSchemaServer(MCPServer):
    """Lists one more tool, whose input schema is not an object's."""

    async def list_tools(self) -> list[Any]:
        tools = await super().list_tools()
        bad = tools[0].model_copy(update={"name": "broken", "input_schema": {"type": "string"}})
        return [*tools, bad]


@asynccontextmanager
async def serving(
    posts: list[dict[str, str]], server: MCPServer | None = None
) -> AsyncIterator[str]:
    """The calculator server (or `server`) on a free port of 127.0.0.1 while the block
    runs; its URL."""
    app = recording((server or calculator_server()).streamable_http_app(), posts)
    http = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(http.serve())
    for _ in range(600):  # the server sets `started` once it listens
        if http.started or task.done():
            break
        await asyncio.sleep(0.05)
    assert http.started, "the MCP server did not start"
    try:
        yield f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}/mcp"
    finally:
        http.should_exit = True
        await task


@pytest.fixture
async def mcp_server() -> AsyncIterator[Served]:
    served = Served("")
    async with serving(served.posts) as url:
        served.url = url
        yield served


async def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, off this event loop (which serves the MCP server)."""
    return await asyncio.to_thread(konstruct, {**environ, SECRET_ENV: SECRET}, *args)


async def registered(environ: dict[str, str], pool: asyncpg.Pool, url: str) -> str:
    """A new tenant with the server registered as `calc`, its agent offered all its tools."""
    tenant = new_tenant()
    await make_agent(pool, tenant, [])
    done = await cli(
        environ, "tools", "mcp", "add", tenant, "calc", "--url", url,
        "--secret-header", "X-Mcp-Key", "--secret-env", SECRET_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 tools: calc__add, calc__fail, calc__slow" in done.stdout, done.stdout
    await make_agent(pool, tenant, ["calc"])
    return tenant


@pytest.fixture
async def tenant(environ: dict[str, str], app_pool: asyncpg.Pool, mcp_server: Served) -> str:
    os.environ[SECRET_ENV] = SECRET  # the in-process worker reads the secret from here
    return await registered(environ, app_pool, mcp_server.url)


async def test_a_servers_tools_are_listed_and_an_agent_calls_them(
    client: Client, worker: str, app_pool: asyncpg.Pool, environ: dict[str, str], tenant: str,
    mcp_server: Served,
) -> None:  # fmt: skip
    listed = await cli(environ, "tools", "list", tenant, "--json")
    tools = {t["name"]: t for t in json.loads(listed.stdout)}
    add = tools["calc__add"]
    assert add["kind"] == "mcp" and add["mcp_server"] == "calc" and add["remote_name"] == "add"
    assert set(add["parameters"]["properties"]) == {"a", "b"}
    assert add["description"] == "Add two integers."
    assert SECRET not in listed.stdout

    mcp_server.posts.clear()
    message = body(tenant, '/tool calc__add {"a": 2, "b": 3}')
    result = await send(client, worker, message)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["result"]) == ("ok", "5")
    assert result.response == "Tool calc__add returned: 5"
    # Every request of the call carried its id as the idempotency key, and the secret.
    assert mcp_server.posts
    assert {p["idempotency-key"] for p in mcp_server.posts} == {call["call_id"]}
    assert {p["x-mcp-key"] for p in mcp_server.posts} == {SECRET}
    removed = await cli(environ, "tools", "mcp", "remove", tenant, "calc")
    assert "removed with its tools: calc__add, calc__fail, calc__slow" in removed.stdout
    listed = await cli(environ, "tools", "list", tenant, "--json")
    assert not [t for t in json.loads(listed.stdout) if t["kind"] == "mcp"]


async def test_a_failing_tool_is_told_to_the_model_and_a_slow_one_heartbeats(
    client: Client, worker: str, app_pool: asyncpg.Pool, tenant: str
) -> None:
    failing = body(tenant, "/tool calc__fail {}")
    told = await send(client, worker, failing)
    [call] = await tool_calls(app_pool, tenant, failing["message_id"])
    # The tool ran and said it failed: not run again.
    assert (call["status"], call["attempts"]) == ("error", 1)
    assert "MCP tool calc__fail" in call["result"] and "fail" in call["result"]
    assert told.response.startswith("Tool calc__fail returned: error:")
    # Longer than the activity's heartbeat timeout: only its heartbeats keep it alive.
    seconds = TOOL_HEARTBEAT.total_seconds() + 2
    slow = body(tenant, f'/tool calc__slow {{"seconds": {seconds}}}')
    await send(client, worker, slow)
    [call] = await tool_calls(app_pool, tenant, slow["message_id"])
    assert (call["status"], call["attempts"], call["result"]) == ("ok", 1, f"slept {seconds:g} s")


async def test_a_server_that_is_down_is_a_clear_error_for_the_operator_and_the_model(
    client: Client,
    worker: str,
    app_pool: asyncpg.Pool,
    environ: dict[str, str],
) -> None:
    os.environ[SECRET_ENV] = SECRET
    async with serving([]) as url:
        tenant = await registered(environ, app_pool, url)
    # The operator: refresh says the server cannot be reached, in one line.
    done = await cli(environ, "tools", "mcp", "refresh", tenant, "calc")
    assert done.returncode == 1
    assert_one_line_error(done, "MCP server calc: could not reach it")
    # The model: told after the tool's attempts, and the message ends.
    message = body(tenant, '/tool calc__add {"a": 1, "b": 1}')
    result = await send(client, worker, message)
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["attempts"]) == ("error", TOOL_ATTEMPTS)
    assert "MCP server calc: could not reach it" in call["result"]
    assert result.response.startswith("Tool calc__add returned: error: MCP server calc")


async def test_bad_registrations_are_refused_naming_what(
    environ: dict[str, str], app_pool: asyncpg.Pool, mcp_server: Served
) -> None:
    tenant = new_tenant()
    await make_agent(app_pool, tenant, [])
    for args, words in [
        (["calc__x", "--url", mcp_server.url], "NAME 'calc__x' must be 1-24 letters"),
        (["calc", "--url", "ftp://h/mcp"], "--url: must be an http:// or https:// URL"),
        (["calc", "--url", "http://10.0.0.5/mcp"], "--url: host '10.0.0.5' is a private address"),
        (["calc", "--url", mcp_server.url, "--secret-env", SECRET_ENV], "go together"),
    ]:
        done = await cli(environ, "tools", "mcp", "add", tenant, *args)
        assert done.returncode == 2, done.stderr
        assert_one_line_error(done, words)
    done = await cli(environ, "tools", "mcp", "refresh", tenant, "ghost")
    assert_one_line_error(done, "has no MCP server 'ghost'", "tools mcp add")
    done = await cli(environ, "tools", "mcp", "remove", tenant, "ghost")
    assert_one_line_error(done, "has no MCP server 'ghost'")


async def test_the_client_lists_and_names_as_the_readme_says(mcp_server: Served) -> None:
    server = McpServer("calc", mcp_server.url)
    listed = await list_server_tools(server, policy=AddressPolicy.allowing(["loopback"]))
    assert [t.remote_name for t in listed] == ["add", "fail", "slow"]
    # Loopback refused: nothing is sent.
    mcp_server.posts.clear()
    with pytest.raises(ToolError) as refused:
        await list_server_tools(server, policy=AddressPolicy())
    assert "loopback" in refused.value.message and not refused.value.retryable
    assert mcp_server.posts == []
    # By name: each request goes to the address checked as it is sent, the name kept
    # in the Host header (a DNS answer that changes after the check is never used).
    mcp_server.posts.clear()
    by_name = McpServer("calc", mcp_server.url.replace("127.0.0.1", "localhost"))
    assert await list_server_tools(by_name, policy=AddressPolicy.allowing(["loopback"]))
    port = mcp_server.url.split(":")[2].split("/")[0]
    assert mcp_server.posts and {p["host"] for p in mcp_server.posts} == {f"localhost:{port}"}
    with pytest.raises(ToolError) as refused:
        await list_server_tools(by_name, policy=AddressPolicy())
    assert "'localhost' resolves to" in refused.value.message
    assert mcp_tool_name("docs", "search.v2") == "docs__search_v2"
    with pytest.raises(ValueError, match="over 64 characters"):
        mcp_tool_name("docs", "x" * 60)


async def test_a_malformed_schema_is_a_clear_error(
    environ: dict[str, str], app_pool: asyncpg.Pool
) -> None:
    server = MalformedSchemaServer("bad")

    @server.tool()
    def fine() -> str:
        """A tool with a proper schema."""
        return "ok"

    tenant = new_tenant()
    await make_agent(app_pool, tenant, [])
    async with serving([], server) as url:
        done = await cli(environ, "tools", "mcp", "add", tenant, "bad", "--url", url)
    # The package's own server will not send it (it checks what it answers): the
    # operator reads that; a server that sends one is refused by the client's check.
    assert done.returncode == 1
    assert_one_line_error(done, "MCP server bad answered with an error", "invalid result")
    listed = await cli(environ, "tools", "list", tenant, "--json")
    assert not [t for t in json.loads(listed.stdout) if t["kind"] == "mcp"]  # nothing stored


async def test_kill_9_mid_call_runs_the_tool_once_more_with_the_same_key_and_one_turn(
    client: Client,
    app_pool: asyncpg.Pool,
    environ: dict[str, str],
    task_queue: str,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []
    server = MCPServer("desk")

    @server.tool()
    async def book(x: int) -> str:
        """Book x; the first call hangs until the test lets it go."""
        calls.append("started")
        if len(calls) == 1:
            arrived.set()
            await asyncio.wait_for(release.wait(), 120)
        return f"booked {x}"

    posts: list[dict[str, str]] = []
    async with serving(posts, server) as url:
        tenant = new_tenant()
        await make_agent(app_pool, tenant, [])
        done = await cli(environ, "tools", "mcp", "add", tenant, "desk", "--url", url)
        assert done.returncode == 0, done.stderr
        await make_agent(app_pool, tenant, ["desk"])
        message = body(tenant, '/tool desk__book {"x": 7}')
        result = await send_across_a_kill(client, task_queue, worker_process, message, arrived)
        release.set()
    [call] = await tool_calls(app_pool, tenant, message["message_id"])
    assert (call["status"], call["attempts"], call["result"]) == ("ok", 2, "booked 7")
    assert result.response == "Tool desk__book returned: booked 7"
    # Both attempts' requests carried the call's id: the server can tell the retry.
    tool_posts = [p for p in posts if "idempotency-key" in p]
    assert tool_posts and {p["idempotency-key"] for p in tool_posts} == {call["call_id"]}
    assert len(calls) == 2
    assert await turns(app_pool, tenant, message["message_id"]) == 1


async def test_a_20_step_turn_of_mcp_calls_keeps_history_as_small_as_built_in_tools(
    client: Client, worker: str, app_pool: asyncpg.Pool, tenant: str
) -> None:
    """History per step: an MCP tool's call carries ids, as a built-in's does; its
    arguments, result and schema stay in PostgreSQL (README quotes the figures)."""
    sizes: dict[str, float] = {}
    for tool, arguments in (
        ("calculator", '{"expression": "1+2"}'),
        ("calc__add", '{"a": 1, "b": 2}'),
    ):
        await make_agent(app_pool, tenant, [tool], max_steps=20)
        message = body(tenant, f"/tool {tool} {arguments}\n/tool-repeat")
        handle = await start(client, worker, message)
        result = await handle.result()
        assert (result.steps, result.tool_calls) == (20, 19), result
        history = await handle.fetch_history()
        sizes[tool] = sum(e.ByteSize() for e in history.events) / result.steps
    print(
        f"history bytes per step: built-in {sizes['calculator']:.0f}, MCP {sizes['calc__add']:.0f}"
    )
    # The tool's name is the only difference in what a step records.
    assert sizes["calc__add"] <= sizes["calculator"] * 1.05, sizes


async def age_listing(pool: asyncpg.Pool, tenant: str, hours: int) -> None:
    """Make the stored listing of the tenant's `calc` server `hours` old."""
    async with tenant_transaction(pool, tenant) as conn:
        await conn.execute(
            "update tools set updated_at = now() - make_interval(hours => $1)"
            " where tenant_id = $2 and mcp_server = 'calc'",
            hours,
            tenant,
        )


async def test_a_listing_older_than_the_refresh_interval_is_listed_again_by_the_worker(
    client: Client, worker: str, app_pool: asyncpg.Pool, environ: dict[str, str]
) -> None:
    server = calculator_server()
    async with serving([], server) as url:
        tenant = await registered(environ, app_pool, url)

        @server.tool()
        def mul(a: int, b: int) -> int:
            """Multiply two integers (added after the server was registered)."""
            return a * b

        # Fresh, the listing stands: the new tool is not offered yet.
        fresh = await send(client, worker, body(tenant, '/tool calc__mul {"a": 6, "b": 7}'))
        assert "calc__mul" not in {c["tool"] for c in await rows(
            app_pool, tenant, "select tool from tool_calls where status = 'ok'")}, fresh  # fmt: skip
        # Older than `tools.mcp_refresh_seconds` (1 h): the next step lists it again.
        await age_listing(app_pool, tenant, 2)
        message = body(tenant, '/tool calc__mul {"a": 6, "b": 7}')
        result = await send(client, worker, message)
        [call] = await tool_calls(app_pool, tenant, message["message_id"])
        assert (call["tool"], call["status"], call["result"]) == ("calc__mul", "ok", "42")
        assert result.response == "Tool calc__mul returned: 42"
    # The server is gone and the listing old again: the step keeps the stored tools,
    # counts the listing fresh for another interval, and the message is answered.
    await age_listing(app_pool, tenant, 2)
    answered = await send(client, worker, body(tenant, "just talk"))
    assert answered.degraded is False
    stale = await rows(
        app_pool,
        tenant,
        "select count(*) as n from tools where mcp_server = 'calc'"
        " and updated_at < now() - interval '1 hour'",
    )
    assert stale[0]["n"] == 0
    names = {r["name"] for r in await rows(app_pool, tenant, "select name from tools")}
    assert {"calc__add", "calc__mul"} <= names


async def test_the_mcp_client_connects_to_the_checked_address_itself() -> None:
    """The request the network gets names the checked address, not the name: the name
    is not resolved again between the check and the connection."""
    import httpx2

    from konstruct.agents.tools.mcp_servers import _CheckedTransport

    sent: list[httpx2.Request] = []

    def network(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200)

    checked = _CheckedTransport("calc", AddressPolicy.allowing(["loopback"]))
    checked.inner = httpx2.MockTransport(network)  # the network, not our code
    async with httpx2.AsyncClient(transport=checked) as http:
        await http.post("http://localhost:9/mcp", content=b"{}")
    [request] = sent
    assert request.url.host in ("127.0.0.1", "::1")
    assert request.headers["host"] == "localhost:9"
