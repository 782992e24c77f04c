"""The SQL of `demo_sessions`: one row per DemoCascade run.

A session records where `demo-production` pointed when the run began (so a
re-executed step reads the same answer), the champion the run recorded and its
decision. `reset` uses the rows to tell finished demo runs from live ones.
Each function takes a connection in a transaction the caller scoped to the tenant.
"""

from __future__ import annotations

import uuid

import asyncpg

from konstruct.demo.models import SessionStart
from konstruct.platform.errors import PrecheckFailed
from konstruct.registry.models import AliasState

# Sessions still `running` after this long are treated as abandoned by `reset`.
STALE_DEMO_SESSION_HOURS = 24
# The sessions table is a log of demo runs: `reset` keeps the latest ones.
KEEP_DEMO_SESSIONS = 100


def _uuid(run_id: str | None) -> uuid.UUID | None:
    return None if run_id is None else uuid.UUID(run_id)


async def missing_tables(conn: asyncpg.Connection, tables: tuple[str, ...]) -> list[str]:
    return [t for t in tables if await conn.fetchval("select to_regclass($1)", t) is None]


async def check_session_tables(conn: asyncpg.Connection, tenant_id: str) -> None:
    """The demo's table and tenant exist, or a `PrecheckFailed` says what to run."""
    if await missing_tables(conn, ("demo_sessions",)):
        raise PrecheckFailed("table demo_sessions is missing: run `konstruct migrate`")
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise PrecheckFailed(
            f"tenant {tenant_id!r} does not exist: run `konstruct migrate`, which seeds it"
        )


async def open_session(
    conn: asyncpg.Connection,
    tenant_id: str,
    workflow_id: str,
    workflow_run_id: str,
    scenario: str,
    seed: int,
    state: AliasState,
) -> SessionStart:
    """Record where the alias is (`state`, read in the same transaction) as this run
    begins; a re-run returns the first record."""
    await conn.execute(
        "insert into demo_sessions (tenant_id, workflow_run_id, workflow_id, scenario,"
        " seed, pre_run_alias_run_id, history_mark) values ($1, $2, $3, $4, $5, $6, $7)"
        " on conflict do nothing",
        tenant_id,
        workflow_run_id,
        workflow_id,
        scenario,
        seed,
        _uuid(state.run_id),
        state.history_mark,
    )
    row = await conn.fetchrow(
        "select pre_run_alias_run_id, history_mark from demo_sessions"
        " where tenant_id = $1 and workflow_run_id = $2",
        tenant_id,
        workflow_run_id,
    )
    before = row["pre_run_alias_run_id"]
    return SessionStart(
        pre_run_alias_run_id=None if before is None else str(before),
        history_mark=row["history_mark"],
    )


async def live_sessions(
    conn: asyncpg.Connection, tenant_id: str, workflow_run_id: str
) -> list[str]:
    """The workflow run ids of demo runs still going; stale ones are marked abandoned first."""
    await conn.execute(
        "update demo_sessions set status = 'abandoned', finished_at = now()"
        " where tenant_id = $1 and status = 'running' and workflow_run_id <> $2"
        f" and started_at < now() - interval '{STALE_DEMO_SESSION_HOURS} hours'",
        tenant_id,
        workflow_run_id,
    )
    rows = await conn.fetch(
        "select workflow_run_id from demo_sessions where tenant_id = $1 and status = 'running'",
        tenant_id,
    )
    return [r["workflow_run_id"] for r in rows]


async def prune_sessions(conn: asyncpg.Connection, tenant_id: str) -> None:
    """Keep the latest `KEEP_DEMO_SESSIONS` finished sessions."""
    await conn.execute(
        "delete from demo_sessions where tenant_id = $1 and status <> 'running'"
        " and workflow_run_id not in (select workflow_run_id from demo_sessions"
        " where tenant_id = $1 order by started_at desc limit $2)",
        tenant_id,
        KEEP_DEMO_SESSIONS,
    )


async def record_champion(
    conn: asyncpg.Connection,
    tenant_id: str,
    workflow_run_id: str,
    champion_run_id: str,
    decision: str | None = None,
) -> None:
    """The run's recorded champion (and the decision that made it, if any)."""
    await conn.execute(
        "update demo_sessions set champion_run_id = $3, decision = coalesce($4, decision)"
        " where tenant_id = $1 and workflow_run_id = $2",
        tenant_id,
        workflow_run_id,
        uuid.UUID(champion_run_id),
        decision,
    )


async def finish_session(
    conn: asyncpg.Connection,
    tenant_id: str,
    workflow_run_id: str,
    status: str,
    champion_run_id: str | None,
    decision: str | None,
) -> None:
    await conn.execute(
        "update demo_sessions set status = $3, finished_at = now(),"
        " champion_run_id = $4, decision = coalesce($5, decision)"
        " where tenant_id = $1 and workflow_run_id = $2",
        tenant_id,
        workflow_run_id,
        status,
        _uuid(champion_run_id),
        decision,
    )
