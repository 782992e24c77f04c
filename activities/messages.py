"""Activities that touch the agents, threads and turns tables."""

from __future__ import annotations

import json

import asyncpg
from temporalio import activity

from konstruct.db import tenant_transaction
from konstruct.errors import UnknownAgent, UnknownTenant
from konstruct.models import (
    AgentContext,
    AgentProfile,
    ChatTurn,
    HandleMessageResult,
    LoadAgentInput,
    StoreTurnInput,
    TokenUsage,
)
from konstruct.validation import to_application_error


def _turn_result(row: asyncpg.Record) -> HandleMessageResult:
    return HandleMessageResult(
        message_id=row["message_id"],
        tenant_id=row["tenant_id"],
        agent_id=row["agent_id"],
        thread_id=row["thread_id"],
        response=row["reply_text"],
        model_group=row["model_group"],
        model=row["model"],
        fallback_used=row["fallback_used"],
        degraded=row["degraded"],
        usage=TokenUsage.model_validate(json.loads(row["usage"])),
    )


class MessageActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="load_agent_context")
    async def load_agent_context(self, input: LoadAgentInput) -> AgentContext:
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            if not await conn.fetchval(
                "select 1 from tenants where tenant_id = $1", input.tenant_id
            ):
                raise to_application_error(
                    UnknownTenant(
                        f"tenant {input.tenant_id!r} does not exist; create it with "
                        f"`konstruct agents put {input.tenant_id} AGENT ...`"
                    )
                )
            agent = await conn.fetchrow(
                "select agent_id, name, role, persona, system_prompt, model_group, fallback_reply"
                " from agents where tenant_id = $1 and agent_id = $2",
                input.tenant_id,
                input.agent_id,
            )
            if agent is None:
                raise to_application_error(
                    UnknownAgent(
                        f"agent {input.agent_id!r} does not exist in tenant {input.tenant_id!r}; "
                        f"see `konstruct agents list {input.tenant_id}`"
                    )
                )
            existing = await conn.fetchrow(
                "select * from message_turns where tenant_id = $1 and message_id = $2",
                input.tenant_id,
                input.message_id,
            )
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
        return AgentContext(
            agent=AgentProfile(**dict(agent)),
            history=history,
            existing=_turn_result(existing) if existing else None,
        )

    @activity.defn(name="store_turn")
    async def store_turn(self, input: StoreTurnInput) -> HandleMessageResult:
        """Store the turn once; a redelivery gets the turn that was stored first."""
        message, result = input.message, input.result
        async with tenant_transaction(self.pool, message.tenant_id) as conn:
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
                " usage, workflow_id)"
                " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " on conflict (tenant_id, message_id) do nothing",
                message.tenant_id,
                message.message_id,
                message.thread_id,
                message.agent_id,
                message.channel,
                message.sender,
                message.text,
                result.response,
                result.model_group,
                result.model,
                result.fallback_used,
                result.degraded,
                result.usage.model_dump_json(),
                input.workflow_id,
            )
            stored = await conn.fetchrow(
                "select * from message_turns where tenant_id = $1 and message_id = $2",
                message.tenant_id,
                message.message_id,
            )
        return _turn_result(stored)
