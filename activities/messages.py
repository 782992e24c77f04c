"""HandleMessage's database steps: thin wrappers over `konstruct.agents.store.agents`.

UnknownTenant and UnknownAgent raised by the store become non-retryable
ApplicationErrors in the worker's error interceptor.
"""

from __future__ import annotations

import asyncpg
from temporalio import activity

from konstruct.agents.models import (
    AgentContext,
    HandleMessageResult,
    LoadAgentInput,
    StoreTurnInput,
)
from konstruct.agents.store import agents
from konstruct.platform.db import tenant_transaction


class MessageActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="load_agent_context")
    async def load_agent_context(self, input: LoadAgentInput) -> AgentContext:
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await agents.load_agent_context(conn, input)

    @activity.defn(name="store_turn")
    async def store_turn(self, input: StoreTurnInput) -> HandleMessageResult:
        """Store the turn once; a redelivery gets the turn that was stored first."""
        async with tenant_transaction(self.pool, input.message.tenant_id) as conn:
            return await agents.store_turn(conn, input)
