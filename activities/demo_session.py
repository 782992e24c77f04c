"""DemoCascade's housekeeping: the session row, precheck, reset, cleanup, compensations' deletes."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities.base import ActivityClass, outlasting_outages
from activities.demo_agent import EMBED_GROUP
from activities.demo_step import COMPENSATION_ATTEMPTS, STEP_ATTEMPTS, caller, demo_step
from konstruct.demo import store as sessions
from konstruct.demo.models import (
    DeletePrefixInput,
    FinishInput,
    OpenSessionInput,
    PrecheckResult,
    ResetResult,
    SessionStart,
    StepInput,
    StepOutput,
)
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import PrecheckFailed
from konstruct.registry import store as registry

REGISTRY_TABLES = ("registry_runs", "registry_aliases", "registry_artifacts")
# The agent asks the first of these groups the router has.
AGENT_GROUPS = ("fast", "quality")
JUDGE_GROUPS = ("judge", "fast")


class DemoSessionActivities(ActivityClass):
    def __init__(self, pool: asyncpg.Pool, groups: set[str]) -> None:
        self.pool = pool
        self.groups = groups

    @activity.defn(name="demo_open_session")
    @outlasting_outages(STEP_ATTEMPTS)
    async def open_session(self, input: OpenSessionInput) -> SessionStart:
        """Record where the alias is as this run begins; a re-run returns the first record."""
        workflow_id, workflow_run_id = caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await sessions.check_session_tables(conn, input.tenant_id)
            state = await registry.alias_state(conn, input.tenant_id, input.alias)
            return await sessions.open_session(
                conn,
                input.tenant_id,
                workflow_id,
                workflow_run_id,
                input.scenario,
                input.seed,
                state,
            )

    @activity.defn(name="demo_precheck")
    @demo_step
    async def precheck(self, input: StepInput) -> PrecheckResult:
        """The registry schema is there; which providers the router has."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            missing = await sessions.missing_tables(conn, REGISTRY_TABLES)
        if missing:
            raise PrecheckFailed(
                f"tables {', '.join(missing)} are missing: run `konstruct migrate`"
            )
        agent_group = next((g for g in AGENT_GROUPS if g in self.groups), None)
        judge_group = next((g for g in JUDGE_GROUPS if g in self.groups), None)
        embed = EMBED_GROUP in self.groups
        return PrecheckResult(
            detail=(
                f"schema ok; chat group {agent_group or '(none)'}, judge {judge_group or '(none)'},"
                f" embeddings {'on' if embed else 'off (no `embed` group)'}"
            ),
            llm_groups=sorted(self.groups),
            embed_available=embed,
            agent_group=agent_group,
            judge_group=judge_group,
        )

    @activity.defn(name="demo_reset")
    @demo_step
    async def reset(self, input: StepInput) -> ResetResult:
        """Delete the demo-owned rows of demo runs that are over; nothing else."""
        _, workflow_run_id = caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            live = await sessions.live_sessions(conn, input.tenant_id, workflow_run_id)
            deleted = await registry.delete_demo_rows(
                conn, input.tenant_id, sorted({*live, workflow_run_id})
            )
            await sessions.prune_sessions(conn, input.tenant_id)
        return ResetResult(
            detail=(
                f"deleted {deleted['runs']} demo runs, {deleted['model_artifacts']} model"
                f" artifacts, {deleted['session_artifacts']} session files of finished demo"
                f" runs; {len(set(live) - {workflow_run_id})} other demo runs live"
            ),
            deleted=deleted,
        )

    @activity.defn(name="demo_cleanup")
    @demo_step
    async def cleanup(self, input: StepInput) -> StepOutput:
        """Delete this run's scratch data and model files; keep runs, scenarios, index."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            data = await registry.delete_artifacts(
                conn, input.tenant_id, input.session_prefix + "data/"
            )
            models = await registry.delete_artifacts(
                conn, input.tenant_id, input.session_prefix + "models/"
            )
        return StepOutput(detail=f"deleted {data} data files and {models} scratch model files")

    @activity.defn(name="demo_finish")
    @outlasting_outages(STEP_ATTEMPTS)
    async def finish(self, input: FinishInput) -> StepOutput:
        _, workflow_run_id = caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await sessions.finish_session(
                conn,
                input.tenant_id,
                workflow_run_id,
                input.status,
                input.champion_run_id,
                input.decision,
            )
        return StepOutput(detail=f"session {input.status}")

    @activity.defn(name="demo_delete_prefix")
    @outlasting_outages(COMPENSATION_ATTEMPTS)
    async def delete_prefix(self, input: DeletePrefixInput) -> StepOutput:
        """A compensation: delete what a step wrote under its prefix."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            count = await registry.delete_artifacts(conn, input.tenant_id, input.prefix)
        return StepOutput(detail=f"deleted {count} files under {input.prefix}")
