"""Structured answers for agents: a gateway request's `response_format` (chat and
Responses API) and an agent's response schema (`agents put --response-schema`); an
answer that does not fit gets one repair step, then the message fails clearly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import openai
import pytest
from temporalio.client import Client

from konstruct.config import Settings
from konstruct.platform.db import tenant_transaction
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import gateway_process, konstruct

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confident": {"type": "boolean"}},
    "required": ["answer", "confident"],
    "additionalProperties": False,
}
FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
}


@pytest.fixture(scope="module")
async def gateway(client: Client, settings: Settings) -> AsyncIterator[str]:
    async with gateway_process(client, settings) as (url, _gateway):
        yield url


async def turns(app_pool: asyncpg.Pool, tenant: str) -> list[str]:
    async with tenant_transaction(app_pool, tenant) as conn:
        return [r["reply_text"] for r in await conn.fetch("select reply_text from message_turns")]


async def test_a_request_json_schema_is_answered_with_json_that_fits(
    gateway: str, talker_tenant: tuple[str, str]
) -> None:
    name, key = talker_tenant
    oc = openai.AsyncOpenAI(base_url=gateway, api_key=key, max_retries=0)
    reply = await oc.chat.completions.create(
        model=f"{name}/talker",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format=FORMAT,
    )
    document = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(document, SCHEMA)
    any_object = await oc.chat.completions.create(
        model=f"{name}/talker",
        messages=[{"role": "user", "content": "Anything as JSON"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)
    # The Responses API's shape of the same: text.format.
    response = await oc.responses.create(
        model=f"{name}/talker",
        input="Is grass green?",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


async def test_an_answer_that_does_not_fit_is_repaired_once(
    gateway: str, talker_tenant: tuple[str, str], sim: SimulatorAdmin, app_pool: asyncpg.Pool
) -> None:
    name, key = talker_tenant
    await sim.set_profile("sim-fast", json_mismatch_first=1)
    before = (await sim.model_stats("sim-fast"))["ok"]
    oc = openai.AsyncOpenAI(base_url=gateway, api_key=key, max_retries=0)
    reply = await oc.chat.completions.create(
        model=f"{name}/talker",
        messages=[{"role": "user", "content": "Is water wet?"}],
        response_format=FORMAT,
    )
    text = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), SCHEMA)
    # Two model calls: the answer that did not fit, and the repair.
    assert (await sim.model_stats("sim-fast"))["ok"] - before == 2
    assert await turns(app_pool, name) == [text]


async def test_an_answer_still_wrong_after_the_repair_fails_the_message_clearly(
    gateway: str,
    talker_tenant: tuple[str, str],
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    client: Client,
) -> None:
    name, key = talker_tenant
    await sim.set_profile("sim-fast", json_mismatch_first=2)
    oc = openai.AsyncOpenAI(base_url=gateway, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as failed:
        await oc.chat.completions.with_raw_response.create(
            model=f"{name}/talker",
            messages=[{"role": "user", "content": "Is fire hot?"}],
            response_format={"type": "json_object"},
            extra_headers={"Idempotency-Key": "never-fits"},
        )
    assert failed.value.status_code == 502
    assert "does not fit the response format, after one repair step" in str(failed.value)
    assert "not JSON" in str(failed.value)
    assert await turns(app_pool, name) == []  # no reply stood in for it
    description = await client.get_workflow_handle(f"msg-{name}-never-fits").describe()
    assert description.status is not None and description.status.name == "FAILED"


async def test_a_bad_response_format_is_a_400_naming_it(
    gateway: str, talker_tenant: tuple[str, str]
) -> None:
    name, key = talker_tenant
    oc = openai.AsyncOpenAI(base_url=gateway, api_key=key, max_retries=0)
    bad: list[Any] = [
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
    ]
    for response_format in bad:
        with pytest.raises(openai.BadRequestError) as refused:
            await oc.chat.completions.create(
                model=f"{name}/talker",
                messages=[{"role": "user", "content": "hi"}],
                response_format=response_format,
            )
        assert refused.value.param == "response_format", refused.value


async def test_an_agent_response_schema_from_the_cli_shapes_every_answer(
    environ: dict[str, str],
    worker: str,
    talker_tenant: tuple[str, str],
    tmp_path: Path,
) -> None:
    name, _key = talker_tenant
    schema_file = tmp_path / "verdict.json"
    schema_file.write_text(json.dumps(SCHEMA))
    env = dict(environ, KONSTRUCT_TASK_QUEUE=worker)
    put = ["agents", "put", name, "judge", "--name", "Jo", "--role", "a judge"]
    done = await asyncio.to_thread(konstruct, env, *put, "--response-schema", str(schema_file))
    assert done.returncode == 0, done.stderr
    sent = await asyncio.to_thread(konstruct, env, "send", name, "judge", "Is the sea salty?")
    assert sent.returncode == 0, sent.stderr
    jsonschema.validate(json.loads(sent.stdout), SCHEMA)
    # A file that is not a schema, or both options: refused before anything is saved.
    schema_file.write_text('{"type": "bogus"}')
    bad = await asyncio.to_thread(konstruct, env, *put, "--response-schema", str(schema_file))
    assert bad.returncode == 2 and "response_format" in bad.stderr, bad.stderr
    both = await asyncio.to_thread(
        konstruct, env, *put, "--response-schema", str(schema_file), "--response-json"
    )
    assert both.returncode == 2 and "--response-schema" in both.stderr, both.stderr
