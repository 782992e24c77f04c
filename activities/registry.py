"""Registry activities: undo an alias move, settle an alias, discard runs.

DemoCascade schedules them to roll back and compensate its changes; each is a
thin wrapper over `konstruct.registry.store` that names the calling workflow
run, so every alias move is traceable to the workflow that made it. Each
outlasts an outage of PostgreSQL, and gives up on any other failure after
`COMPENSATION_ATTEMPTS` (the workflow reports it).
"""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities.base import ActivityClass, outlasting_outages
from activities.demo_step import COMPENSATION_ATTEMPTS
from konstruct.platform.db import tenant_transaction
from konstruct.registry import store as registry
from konstruct.registry.models import (
    AliasMoveResult,
    DiscardRunsInput,
    DiscardRunsResult,
    SettleAliasInput,
    UndoAliasMoveInput,
)


def _caller() -> tuple[str | None, str | None]:
    info = activity.info()
    return info.workflow_id, info.workflow_run_id


class RegistryActivities(ActivityClass):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="registry_undo_alias_move")
    @outlasting_outages(COMPENSATION_ATTEMPTS)
    async def undo_alias_move(self, input: UndoAliasMoveInput) -> AliasMoveResult:
        """Reverse one move, if it was made and nobody has moved the alias since."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await registry.undo_move(conn, input, *_caller())

    @activity.defn(name="registry_settle_alias")
    @outlasting_outages(COMPENSATION_ATTEMPTS)
    async def settle_alias(self, input: SettleAliasInput) -> AliasMoveResult:
        """Put the alias on the target, unless another workflow run moved it after ours."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await registry.settle_alias(conn, input, *_caller())

    @activity.defn(name="registry_discard_runs")
    @outlasting_outages(COMPENSATION_ATTEMPTS)
    async def discard_runs(self, input: DiscardRunsInput) -> DiscardRunsResult:
        """Delete runs (and artifacts no other run uses), except kept or aliased ones."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await registry.discard_runs(conn, input)
