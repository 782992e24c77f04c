"""Tenants, agents, threads and message turns: the SQL of that table family.

Each function takes a connection in a transaction the caller scoped to the tenant.
"""

from __future__ import annotations

import json

import asyncpg

from konstruct.agents.models import (
    AgentContext,
    AgentProfile,
    HandleMessageResult,
    LoadAgentInput,
    StoreTurnInput,
)
from konstruct.agents.store.steps import Inbound
from konstruct.platform.errors import UnknownAgent, UnknownTenant
from konstruct.platform.rows import from_row
from konstruct.providers.models import ChatTurn, TokenUsage


async def put_agent(conn: asyncpg.Connection, tenant_id: str, agent: AgentProfile) -> None:
    """Create or update an agent, creating its tenant on first use."""
    await conn.execute(
        "insert into tenants (tenant_id, name) values ($1, $1) on conflict do nothing",
        tenant_id,
    )
    await conn.execute(
        "insert into agents (tenant_id, agent_id, name, role, persona, system_prompt,"
        " model_group, fallback_reply, tools, max_steps, history_turns, memory_tokens,"
        " response_format)"
        " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        " on conflict (tenant_id, agent_id) do update set name = excluded.name,"
        " role = excluded.role, persona = excluded.persona,"
        " system_prompt = excluded.system_prompt, model_group = excluded.model_group,"
        " fallback_reply = excluded.fallback_reply, tools = excluded.tools,"
        " max_steps = excluded.max_steps, history_turns = excluded.history_turns,"
        " memory_tokens = excluded.memory_tokens,"
        " response_format = excluded.response_format, updated_at = now()",
        tenant_id,
        agent.agent_id,
        agent.name,
        agent.role,
        agent.persona,
        agent.system_prompt,
        agent.model_group,
        agent.fallback_reply,
        agent.tools,
        agent.max_steps,
        agent.history_turns,
        agent.memory_tokens,
        None if agent.response_format is None else json.dumps(agent.response_format),
    )


async def _select_agents(
    conn: asyncpg.Connection, tenant_id: str, agent_id: str | None = None
) -> list[AgentProfile]:
    """A tenant's agents by id, or only `agent_id` when given."""
    rows = await conn.fetch(
        "select agent_id, name, role, persona, system_prompt, model_group, fallback_reply,"
        " tools, max_steps, history_turns, memory_tokens, response_format"
        " from agents where tenant_id = $1 and ($2::text is null or agent_id = $2)"
        " order by agent_id",
        tenant_id,
        agent_id,
    )
    return [
        AgentProfile(
            **{
                **dict(row),
                "tools": list(row["tools"]),
                "response_format": None
                if row["response_format"] is None
                else json.loads(row["response_format"]),
            }
        )
        for row in rows
    ]


async def agent_exists(conn: asyncpg.Connection, tenant_id: str, agent_id: str) -> bool:
    """Whether the tenant has the agent, in a transaction already scoped to `tenant_id`."""
    found = await conn.fetchval(
        "select 1 from agents where tenant_id = $1 and agent_id = $2", tenant_id, agent_id
    )
    return found is not None


async def select_agent(conn: asyncpg.Connection, tenant_id: str, agent_id: str) -> AgentProfile:
    """The agent, in a transaction already scoped to `tenant_id`.

    Raises UnknownTenant or UnknownAgent, each saying which command fixes it.
    """
    agents = await _select_agents(conn, tenant_id, agent_id)
    if agents:
        return agents[0]
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise UnknownTenant(
            f"tenant {tenant_id!r} does not exist; create it with "
            f"`konstruct agents put {tenant_id} AGENT ...`"
        )
    raise UnknownAgent(
        f"agent {agent_id!r} does not exist in tenant {tenant_id!r}; "
        f"see `konstruct agents list {tenant_id}`"
    )


async def list_agents(conn: asyncpg.Connection, tenant_id: str) -> list[AgentProfile]:
    return await _select_agents(conn, tenant_id)


def _turn_result(row: asyncpg.Record) -> HandleMessageResult:
    usage = TokenUsage.model_validate(json.loads(row["usage"]))
    return from_row(HandleMessageResult, row, columns={"response": "reply_text"}, usage=usage)


async def _stored_turn(
    conn: asyncpg.Connection, tenant_id: str, message_id: str
) -> HandleMessageResult | None:
    row = await conn.fetchrow(
        "select * from message_turns where tenant_id = $1 and message_id = $2",
        tenant_id,
        message_id,
    )
    return _turn_result(row) if row is not None else None


async def load_agent_context(conn: asyncpg.Connection, input: LoadAgentInput) -> AgentContext:
    """The agent, the thread's last turns, and the stored reply if this message has one.

    Raises UnknownTenant or UnknownAgent, each saying which command fixes it.
    """
    agent = await select_agent(conn, input.tenant_id, input.agent_id)
    existing = await _stored_turn(conn, input.tenant_id, input.message_id)
    rows = await conn.fetch(
        "select user_text, reply_text from message_turns"
        " where tenant_id = $1 and thread_id = $2 and message_id <> $3"
        " order by created_at desc limit $4",
        input.tenant_id,
        input.thread_id,
        input.message_id,
        input.history_turns,
    )
    history: list[ChatTurn] = []
    for row in reversed(rows):
        history.append(ChatTurn(role="user", content=row["user_text"]))
        history.append(ChatTurn(role="assistant", content=row["reply_text"]))
    return AgentContext(agent=agent, history=history, existing=existing)


async def store_turn(conn: asyncpg.Connection, input: StoreTurnInput) -> HandleMessageResult:
    """Store the turn once; a redelivery gets the turn that was stored first."""
    return await insert_turn(conn, input)


async def insert_turn(conn: asyncpg.Connection, input: StoreTurnInput) -> HandleMessageResult:
    """`store_turn` inside a transaction already scoped to the message's tenant."""
    message, result = input.message, input.result
    await conn.execute(
        "insert into threads (tenant_id, thread_id, agent_id, channel)"
        " values ($1, $2, $3, $4) on conflict do nothing",
        message.tenant_id,
        message.thread_id,
        message.agent_id,
        message.channel,
    )
    await conn.execute(
        "insert into message_turns (tenant_id, message_id, thread_id, agent_id, channel,"
        " sender, user_text, reply_text, model_group, model, fallback_used, degraded,"
        " usage, workflow_id, steps, tool_calls)"
        " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        " on conflict (tenant_id, message_id) do nothing",
        message.tenant_id,
        *Inbound.of(message).values(),
        result.response,
        result.model_group,
        result.model,
        result.fallback_used,
        result.degraded,
        result.usage.model_dump_json(),
        input.workflow_id,
        result.steps,
        result.tool_calls,
    )
    stored = await _stored_turn(conn, message.tenant_id, message.message_id)
    # The row was inserted or already there inside this transaction.
    assert stored is not None
    return stored
