"""Tenants and agents: the SQL of that table family."""

from __future__ import annotations

import asyncpg

from konstruct.db import tenant_transaction
from konstruct.models import AgentProfile


async def put_agent(pool: asyncpg.Pool, tenant_id: str, agent: AgentProfile) -> None:
    """Create or update an agent, creating its tenant on first use."""
    async with tenant_transaction(pool, tenant_id) as conn:
        await conn.execute(
            "insert into tenants (tenant_id, name) values ($1, $1) on conflict do nothing",
            tenant_id,
        )
        await conn.execute(
            "insert into agents (tenant_id, agent_id, name, role, persona, system_prompt,"
            " model_group, fallback_reply) values ($1, $2, $3, $4, $5, $6, $7, $8)"
            " on conflict (tenant_id, agent_id) do update set name = excluded.name,"
            " role = excluded.role, persona = excluded.persona,"
            " system_prompt = excluded.system_prompt, model_group = excluded.model_group,"
            " fallback_reply = excluded.fallback_reply, updated_at = now()",
            tenant_id,
            agent.agent_id,
            agent.name,
            agent.role,
            agent.persona,
            agent.system_prompt,
            agent.model_group,
            agent.fallback_reply,
        )


async def list_agents(pool: asyncpg.Pool, tenant_id: str) -> list[AgentProfile]:
    async with tenant_transaction(pool, tenant_id) as conn:
        rows = await conn.fetch(
            "select agent_id, name, role, persona, system_prompt, model_group, fallback_reply"
            " from agents where tenant_id = $1 order by agent_id",
            tenant_id,
        )
    return [AgentProfile(**dict(row)) for row in rows]
