"""`konstruct agents put --tool`, `konstruct tools` and `konstruct approvals` as a user
runs them: subprocesses against the session's real PostgreSQL and Temporal dev server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from temporalio.client import Client, WorkflowHandle

from konstruct.app.cli.tools import normalize_host
from konstruct.app.stack import temporal_cli
from konstruct.platform.db import tenant_transaction
from konstruct.platform.temporal.codec_server import codec_app
from tests.support import serve_locally, suite_codec
from tests.test_cli import assert_one_line_error, konstruct
from workflows.handle_message import HandleMessage

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

SECRET_ENV = "KONSTRUCT_TEST_CLI_HOOK_SECRET"
SECRET = "cli-hook-secret-" + uuid.uuid4().hex[:8]


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def new_tenant(env: dict[str, str]) -> str:
    """A fresh tenant, made by putting an agent without tools."""
    tenant = f"cli-tools-{uuid.uuid4().hex[:8]}"
    ok(konstruct(env, "agents", "put", tenant, "plain", "--name", "Pat", "--role", "r"))
    return tenant


def list_json(env: dict[str, str], *command: str) -> Any:
    return json.loads(ok(konstruct(env, *command, "--json")))


# --- agents put --tool -------------------------------------------------------------


def test_agents_put_with_a_builtin_and_a_webhook_tool(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    ok(konstruct(environ, "tools", "put", tenant, "lookup", "--url", "http://127.0.0.1:9/x"))
    saved = konstruct(
        environ,
        "agents",
        "put",
        tenant,
        "helper",
        "--name",
        "Tess",
        "--role",
        "uses tools",
        "--tool",
        "calculator",
        "--tool",
        "lookup",
        "--tool",
        "calculator",
        "--max-steps",
        "4",
        "--history-turns",
        "3",
        "--memory-tokens",
        "500",
    )
    assert ok(saved).strip() == f"agent {tenant}/helper saved (tools: calculator, lookup)"
    agents = {a["agent_id"]: a for a in list_json(environ, "agents", "list", tenant)}
    helper = agents["helper"]
    assert helper["tools"] == ["calculator", "lookup"]
    assert (helper["max_steps"], helper["history_turns"], helper["memory_tokens"]) == (4, 3, 500)
    assert agents["plain"]["tools"] == [] and agents["plain"]["max_steps"] == 8
    table = ok(konstruct(environ, "agents", "list", tenant))
    assert "tools" in table and "calculator, lookup" in table
    # A put replaces the profile: without --tool the agent has none.
    ok(konstruct(environ, "agents", "put", tenant, "helper", "--name", "Tess", "--role", "r"))
    agents = {a["agent_id"]: a for a in list_json(environ, "agents", "list", tenant)}
    assert agents["helper"]["tools"] == []


def test_an_unknown_tool_names_the_option_and_what_exists(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    ok(konstruct(environ, "tools", "put", tenant, "lookup", "--url", "http://127.0.0.1:9/x"))
    done = konstruct(
        environ, "agents", "put", tenant, "helper", "--name", "T", "--role", "r",
        "--tool", "calculator", "--tool", "nosuch",
    )  # fmt: skip
    assert done.returncode == 2
    assert_one_line_error(
        done,
        "--tool 'nosuch'",
        "calculator, http_request, knowledge_search",
        "lookup",
        f"konstruct tools put {tenant} nosuch",
    )
    assert "helper" not in {a["agent_id"] for a in list_json(environ, "agents", "list", tenant)}
    bad = konstruct(environ, "agents", "put", tenant, "h", "--name", "T", "--role", "r",
                    "--tool", "two words")  # fmt: skip
    assert_one_line_error(bad, "--tool 'two words' is not a tool name")
    steps = konstruct(environ, "agents", "put", tenant, "h", "--name", "T", "--role", "r",
                      "--max-steps", "0")  # fmt: skip
    assert steps.returncode == 2
    assert_one_line_error(steps, "'--max-steps'")


# --- tools -------------------------------------------------------------------------


def test_tools_put_list_delete_round_trip(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    env = dict(environ, **{SECRET_ENV: SECRET})
    schema = '{"type": "object", "properties": {"order": {"type": "string"}}}'
    saved = konstruct(
        env, "tools", "put", tenant, "refund",
        "--description", "Refund an order", "--parameters", schema,
        "--url", "https://hooks.example.com/refund",
        "--secret-header", "X-Hook-Secret", "--secret-env", SECRET_ENV,
        "--requires-approval", "--timeout", "12", "--approval-timeout", "300",
    )  # fmt: skip
    assert ok(saved).strip() == f"webhook tool {tenant}/refund saved, requires approval"
    settings = konstruct(env, "tools", "put", tenant, "calculator", "--requires-approval",
                         "--timeout", "5")  # fmt: skip
    assert (
        ok(settings).strip()
        == f"settings of built-in tool {tenant}/calculator saved, requires approval"
    )

    listed = konstruct(env, "tools", "list", tenant, "--json")
    assert SECRET not in listed.stdout + listed.stderr
    tools = {t["name"]: t for t in json.loads(ok(listed))}
    assert list(tools) == ["calculator", "http_request", "knowledge_search", "refund"]
    refund = tools["refund"]
    assert refund["kind"] == "webhook" and refund["builtin"] is False
    assert refund["url"] == "https://hooks.example.com/refund"
    assert (refund["secret_header"], refund["secret_env"]) == ("X-Hook-Secret", SECRET_ENV)
    assert refund["parameters"]["properties"] == {"order": {"type": "string"}}
    assert (refund["requires_approval"], refund["timeout_s"], refund["approval_timeout_s"]) == (
        True, 12.0, 300.0,
    )  # fmt: skip
    calculator = tools["calculator"]
    assert calculator["builtin"] is True and calculator["configured"] is True
    assert (calculator["requires_approval"], calculator["timeout_s"]) == (True, 5.0)
    assert "expression" in calculator["parameters"]["properties"]
    assert tools["http_request"]["configured"] is False
    assert tools["http_request"]["requires_approval"] is False

    table = konstruct(env, "tools", "list", tenant)
    assert SECRET not in table.stdout
    line = next(row for row in ok(table).splitlines() if row.split()[:1] == ["refund"])
    assert f"X-Hook-Secret from ${SECRET_ENV}" in line and "webhook" in line and "required" in line
    assert "built-in" in next(
        r for r in table.stdout.splitlines() if r.split()[:1] == ["calculator"]
    )

    # An agent still listing a deleted tool is pointed out.
    ok(konstruct(env, "agents", "put", tenant, "helper", "--name", "T", "--role", "r",
                 "--tool", "refund"))  # fmt: skip
    deleted = konstruct(env, "tools", "delete", tenant, "refund")
    assert ok(deleted).strip() == f"tool {tenant}/refund deleted"
    assert "helper" in deleted.stderr and "still list 'refund'" in deleted.stderr
    again = konstruct(env, "tools", "delete", tenant, "refund")
    assert again.returncode == 1
    assert_one_line_error(again, f"tenant {tenant!r} has no tool 'refund'")
    reset = konstruct(env, "tools", "delete", tenant, "calculator")
    assert "back to the defaults" in ok(reset)
    names = [t["name"] for t in list_json(env, "tools", "list", tenant)]
    assert names == ["calculator", "http_request", "knowledge_search"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["hook", "--url", "http://h/x", "--parameters", '{"type": "object",}'],
         "--parameters: not valid JSON: Expecting property name enclosed in double quotes"
         " at line 1 column 19"),
        (["hook", "--url", "http://h/x", "--parameters", '{"type": "array"}'],
         '--parameters: must be a JSON schema with "type": "object"'),
        (["hook", "--url", "http://h/x", "--parameters", "@/no/such/schema.json"],
         "--parameters /no/such/schema.json: cannot read it"),
        (["calculator", "--url", "http://h/x"], "'calculator' is a built-in tool"),
        (["http_request", "--secret-env", "X", "--description", "d"],
         "(not --description, --secret-env)"),
        (["hook"], "--url is required"),
        (["hook", "--url", "ftp://h/x"], "--url: must be an http:// or https:// URL"),
        (["hook", "--url", "http://h/x", "--secret-env", "VAR"],
         "--secret-header and --secret-env go together"),
        (["hook", "--url", "http://h/x", "--secret-header", "X", "--secret-env", "1BAD"],
         "--secret-env: String should match pattern"),
        (["bad name", "--url", "http://h/x"], "NAME: String should match pattern"),
        (["hook", "--url", "http://h/x", "--timeout", "0"], "'--timeout'"),
    ],
)  # fmt: skip
def test_tools_put_names_the_bad_option(
    environ: dict[str, str], args: list[str], named: str
) -> None:
    done = konstruct(environ, "tools", "put", "demo", *args)
    assert done.returncode == 2
    assert_one_line_error(done, named)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "is a link-local address"),
        ("http://10.0.0.5/hook", "is a private address"),
        ("http://[fd00::1]/hook", "is a private address"),
    ],
)
def test_tools_put_refuses_a_url_written_with_a_non_public_address(
    environ: dict[str, str], url: str, words: str
) -> None:
    # The dev stack's config allows loopback only; nothing is stored, nothing is sent.
    tenant = new_tenant(environ)
    done = konstruct(environ, "tools", "put", tenant, "hook", "--url", url)
    assert done.returncode == 2
    assert_one_line_error(done, "--url: host", words, "tools.allow_addresses")
    assert [t for t in list_json(environ, "tools", "list", tenant) if t["name"] == "hook"] == []
    # Under a config that forbids loopback too, the dev stack's own example is refused.
    strict = {**environ, "KONSTRUCT_TOOLS_ALLOW_ADDRESSES": "none"}
    done = konstruct(strict, "tools", "put", tenant, "hook", "--url", "http://127.0.0.1:9/x")
    assert done.returncode == 2
    assert_one_line_error(done, "is a loopback address")


def test_tools_put_for_an_unknown_tenant(environ: dict[str, str]) -> None:
    tenant = f"cli-none-{uuid.uuid4().hex[:6]}"
    done = konstruct(environ, "tools", "put", tenant, "hook", "--url", "http://h/x")
    assert_one_line_error(done, f"tenant {tenant!r} does not exist", "konstruct agents put")


def test_parameters_from_a_file(environ: dict[str, str], tmp_path: Any) -> None:
    tenant = new_tenant(environ)
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"q": {"type": "string"}},\n "x": }')
    done = konstruct(environ, "tools", "put", tenant, "hook", "--url", "http://h/x",
                     "--parameters", f"@{schema}")  # fmt: skip
    assert_one_line_error(done, f"--parameters {schema}: not valid JSON", "line 2 column 7")
    schema.write_text('{"type": "object", "properties": {"q": {"type": "string"}}}')
    ok(konstruct(environ, "tools", "put", tenant, "hook", "--url", "http://h/x",
                 "--parameters", f"@{schema}"))  # fmt: skip
    [hook] = [t for t in list_json(environ, "tools", "list", tenant) if t["name"] == "hook"]
    assert hook["parameters"]["properties"] == {"q": {"type": "string"}}


# --- the http_request allow-list ---------------------------------------------------


def test_allow_and_hosts_round_trip(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    empty = ok(konstruct(environ, "tools", "hosts", tenant))
    assert "allows no hosts" in empty and f"konstruct tools allow {tenant} HOST" in empty
    assert list_json(environ, "tools", "hosts", tenant) == []
    added = konstruct(environ, "tools", "allow", tenant, "API.Example.com", "127.0.0.1:8080",
                      "[::1]:81")  # fmt: skip
    assert "api.example.com" in ok(added)
    assert list_json(environ, "tools", "hosts", tenant) == [
        "127.0.0.1:8080", "[::1]:81", "api.example.com",
    ]  # fmt: skip
    removed = konstruct(environ, "tools", "allow", tenant, "--remove", "api.example.com",
                        "other.example.com")  # fmt: skip
    assert "not on the list: other.example.com" in removed.stderr
    assert (
        ok(removed).strip() == f"tenant {tenant!r} allows http_request to: 127.0.0.1:8080, [::1]:81"
    )
    table = ok(konstruct(environ, "tools", "hosts", tenant))
    assert "127.0.0.1:8080" in table and "api.example.com" not in table


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("https://api.example.com", "without a scheme"),
        ("api.example.com/v1", "without a path"),
        ("api.example.com:99999", "port must be a number from 1 to 65535"),
        ("*.example.com", "no wildcards"),
        ("bad_host.com", "not a hostname"),
        ("999.1.1.1", "not an IPv4 address"),
    ],
)
def test_a_bad_host_is_named(environ: dict[str, str], host: str, why: str) -> None:
    done = konstruct(environ, "tools", "allow", "demo", "good.example.com", host)
    assert done.returncode == 2
    assert_one_line_error(done, "'HOST...'", repr(host), why)


def test_hosts_are_normalised() -> None:
    assert normalize_host("Example.COM.") == "example.com"
    assert normalize_host("localhost:8780") == "localhost:8780"
    assert normalize_host("::1") == "::1"
    assert normalize_host("[0:0::1]") == "::1"
    assert normalize_host("10.0.0.1") == "10.0.0.1"


# --- approvals -----------------------------------------------------------------------


def test_approvals_list_is_empty_for_a_fresh_tenant(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    assert list_json(environ, "approvals", "list", tenant) == []
    table = ok(konstruct(environ, "approvals", "list", tenant))
    assert table.strip() == f"tenant {tenant!r} has no tool calls waiting for approval"


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_deciding_on_an_unknown_workflow_is_one_line(environ: dict[str, str], action: str) -> None:
    workflow_id = f"msg-none-{uuid.uuid4().hex[:8]}"
    done = konstruct(environ, "approvals", action, workflow_id, "call-0-0")
    assert done.returncode == 1
    assert_one_line_error(done, f"no workflow {workflow_id!r}", "konstruct approvals list")


@pytest.fixture
async def hook_url() -> AsyncIterator[str]:
    """A webhook answering with what it got."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"result": f"hook got {json.dumps(body['arguments'])}"})

    app = web.Application()
    app.router.add_post("/{name}", handle)
    async with serve_locally(app) as url:
        yield url


async def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread, so this test's in-process worker keeps running."""
    return await asyncio.to_thread(konstruct, env, *args)


async def approval_agent(env: dict[str, str], hook_url: str) -> str:
    """A tenant whose agent `helper` has the webhook `refund`, which needs approval."""
    tenant = await asyncio.to_thread(new_tenant, env)
    ok(await run(env, "tools", "put", tenant, "refund", "--url", f"{hook_url}/refund",
                 "--requires-approval"))  # fmt: skip
    ok(await run(env, "agents", "put", tenant, "helper", "--name", "Tess", "--role", "r",
                 "--tool", "refund"))  # fmt: skip
    return tenant


async def start_waiting(
    env: dict[str, str], client: Client, task_queue: str, tenant: str, text: str
) -> tuple[WorkflowHandle, dict[str, Any]]:
    """Start HandleMessage; once `approvals list` shows its call, the handle and the call."""
    message_id = f"m-{uuid.uuid4().hex[:8]}"
    body = {
        "message_id": message_id, "tenant_id": tenant, "agent_id": "helper",
        "thread_id": "t-1", "channel": "test", "sender": "u", "text": text,
    }  # fmt: skip
    handle = await client.start_workflow(
        HandleMessage.run, body, id=f"msg-{tenant}-{message_id}", task_queue=task_queue
    )
    waiting: list[dict[str, Any]] = []
    for _ in range(100):
        waiting = json.loads(ok(await run(env, "approvals", "list", tenant, "--json")))
        if waiting:
            break
        await asyncio.sleep(0.2)
    [call] = waiting
    assert (call["workflow_id"], call["message_id"]) == (handle.id, message_id)
    # The step stores the call just before the workflow registers it as pending: an
    # approval is accepted once `progress` shows it.
    for _ in range(100):
        if (await handle.query(HandleMessage.progress))["pending"]:
            break
        await asyncio.sleep(0.1)
    return handle, call


async def stored_call(pool: asyncpg.Pool, tenant: str, call_id: str) -> tuple[str, str | None]:
    async with tenant_transaction(pool, tenant) as conn:
        row = await conn.fetchrow(
            "select status, decided_by from tool_calls where call_id = $1", call_id
        )
    return row["status"], row["decided_by"]


async def test_a_call_approved_through_the_cli(
    environ: dict[str, str], client: Client, worker: str, hook_url: str, app_pool: asyncpg.Pool
) -> None:
    tenant = await approval_agent(environ, hook_url)
    handle, call = await start_waiting(environ, client, worker, tenant, '/tool refund {"x": 1}')
    workflow_id = handle.id
    assert (call["tool"], call["arguments"], call["agent_id"]) == ("refund", {"x": 1}, "helper")
    table = ok(await run(environ, "approvals", "list", tenant))
    assert workflow_id in table and call["call_id"] in table and '{"x": 1}' in table

    refused = await run(environ, "approvals", "approve", workflow_id, "nope")
    assert refused.returncode == 1
    assert_one_line_error(refused, "no tool call 'nope' is waiting", call["call_id"])

    approved = await run(environ, "approvals", "approve", workflow_id, call["call_id"],
                         "--by", "ana")  # fmt: skip
    assert ok(approved).strip() == f"approved {call['call_id']}"
    result = await handle.result()
    assert result.response == 'Tool refund returned: hook got {"x": 1}'
    assert (await stored_call(app_pool, tenant, call["call_id"]))[0] == "ok"
    assert json.loads(ok(await run(environ, "approvals", "list", tenant, "--json"))) == []
    # Once the workflow has ended, a decision says so.
    late = await run(environ, "approvals", "reject", workflow_id, call["call_id"])
    assert late.returncode == 1
    assert_one_line_error(late, f"workflow {workflow_id!r} is completed")


async def test_a_call_rejected_through_the_cli(
    environ: dict[str, str], client: Client, worker: str, hook_url: str, app_pool: asyncpg.Pool
) -> None:
    tenant = await approval_agent(environ, hook_url)
    handle, call = await start_waiting(environ, client, worker, tenant, '/tool refund {"x": 9}')
    rejected = await run(environ, "approvals", "reject", handle.id, call["call_id"],
                         "--reason", "too much", "--by", "bo")  # fmt: skip
    assert ok(rejected).strip() == f"rejected {call['call_id']}"
    result = await handle.result()
    assert result.response == "Tool refund returned: A person rejected this call: too much"
    assert await stored_call(app_pool, tenant, call["call_id"]) == ("rejected", "bo")


@pytest.fixture
async def codec_endpoint() -> AsyncIterator[str]:
    """The codec server with the suite's key, as `konstruct up` runs it (no token)."""
    async with serve_locally(codec_app(suite_codec(), [], None)) as url:
        yield url


async def test_the_documented_temporal_cli_update_approves(
    environ: dict[str, str], client: Client, worker: str, hook_url: str, codec_endpoint: str
) -> None:
    """docs/agents.md: `temporal workflow update execute --name approve_tool ...`
    (the update's answer is encrypted: the CLI needs the codec endpoint to print it)."""
    tenant = await approval_agent(environ, hook_url)
    handle, call = await start_waiting(environ, client, worker, tenant, '/tool refund {"x": 2}')
    # Asynchronously: the codec server answers from this event loop.
    process = await asyncio.create_subprocess_exec(
        temporal_cli(), "workflow", "update", "execute",
        "--address", environ["TEMPORAL_ADDRESS"], "--codec-endpoint", codec_endpoint,
        "--name", "approve_tool", "--workflow-id", handle.id,
        "--input", json.dumps({"call_id": call["call_id"], "by": "ops"}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert f"approved {call['call_id']}" in out.decode()
    result = await handle.result()
    assert result.response == 'Tool refund returned: hook got {"x": 2}'


# --- key limits ----------------------------------------------------------------------


def test_keys_get_limits_when_made_and_later(environ: dict[str, str]) -> None:
    tenant = new_tenant(environ)
    made = json.loads(ok(konstruct(environ, "keys", "create", tenant, "--rpm", "5", "--json")))
    [listed] = list_json(environ, "keys", "list", tenant)
    assert (listed["key_id"], listed["rpm"], listed["tpm"]) == (made["key_id"], 5, None)
    said = ok(konstruct(environ, "keys", "limit", tenant, made["key_id"], "--tpm", "100"))
    assert said.strip() == f"key {made['key_id']} of tenant {tenant!r}: 100 tpm"
    [listed] = list_json(environ, "keys", "list", tenant)
    assert (listed["rpm"], listed["tpm"]) == (None, 100)  # a limit left out is lifted
    missing = konstruct(environ, "keys", "limit", tenant, "key_nothere", "--rpm", "1")
    assert_one_line_error(missing, "has no key 'key_nothere'")
    zero = konstruct(environ, "keys", "create", tenant, "--rpm", "0")
    assert zero.returncode == 2 and "--rpm" in zero.stderr and "Traceback" not in zero.stderr
