"""The model registry's SQL: runs, aliases and their history, and the artifact store.

Over 600 lines for one reason: the alias moves, their undo and their history are one
locking protocol, read best in one file.

Alias moves are serialised by a row lock on the alias (`select ... for update`),
so two workflows moving the same alias queue up instead of interleaving. Every
move writes a history row naming the workflow run that made it and the
`move_id` its caller chose beforehand: a retried activity finds its move
already made, and an undo can name exactly the move it reverses.

Artifacts are content-hashed: the sha256 is stored next to the bytes and
checked again on every load. Each function takes a connection in a transaction
the caller scoped to the tenant (`db.tenant_transaction`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from konstruct.platform.errors import ArtifactIntegrityError, ArtifactMissing, NotFound
from konstruct.platform.rows import fetch_all, fetch_one, from_row, row_count
from konstruct.registry.models import (
    AliasMove,
    AliasMoveResult,
    AliasState,
    DiscardRunsInput,
    DiscardRunsResult,
    MoveAliasInput,
    NewRun,
    RegistryAlias,
    RegistryRun,
    SettleAliasInput,
    UndoAliasMoveInput,
)

# A move waits this long for another workflow's move of the same alias; beyond
# it the attempt fails (retryably) instead of piling up connections.
ALIAS_LOCK_TIMEOUT_MS = 3000
# Taken by every transaction that writes runs or deletes demo rows, so a demo
# reset never deletes an artifact another run is registering at that moment.
_REGISTRY_WRITE_LOCK = "konstruct-registry-write:"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


async def lock_registry_writes(conn: asyncpg.Connection, tenant_id: str) -> None:
    await conn.execute(
        "select pg_advisory_xact_lock(hashtext($1))", _REGISTRY_WRITE_LOCK + tenant_id
    )


# --- artifact store ---------------------------------------------------------


async def store_artifact(conn: asyncpg.Connection, tenant_id: str, uri: str, data: bytes) -> str:
    """Write (or overwrite) the artifact at `uri`; returns its sha256."""
    digest = sha256_hex(data)
    await conn.execute(
        "insert into registry_artifacts (tenant_id, uri, sha256, data) values ($1, $2, $3, $4)"
        " on conflict (tenant_id, uri) do update"
        " set sha256 = excluded.sha256, data = excluded.data, created_at = now()",
        tenant_id,
        uri,
        digest,
        data,
    )
    return digest


async def load_artifact(
    conn: asyncpg.Connection, tenant_id: str, uri: str, expected_sha256: str | None = None
) -> bytes:
    """The artifact's bytes, after checking them against the stored (and expected) hash."""
    row = await conn.fetchrow(
        "select sha256, data from registry_artifacts where tenant_id = $1 and uri = $2",
        tenant_id,
        uri,
    )
    if row is None:
        raise ArtifactMissing(
            f"artifact {uri!r} is not in the artifact store of tenant {tenant_id!r}; "
            "register the run again to rewrite it"
        )
    data = bytes(row["data"])
    actual = sha256_hex(data)
    for label, wanted in (("stored", row["sha256"]), ("registered", expected_sha256)):
        if wanted is not None and actual != wanted:
            raise ArtifactIntegrityError(
                f"artifact {uri!r} has sha256 {actual[:12]}… but its {label} hash is "
                f"{wanted[:12]}…: the bytes were changed after they were written; "
                "retrain and register the model again"
            )
    return data


async def delete_artifacts(conn: asyncpg.Connection, tenant_id: str, prefix: str) -> int:
    result = await conn.execute(
        "delete from registry_artifacts where tenant_id = $1 and starts_with(uri, $2)",
        tenant_id,
        prefix,
    )
    return row_count(result)


# --- runs ---------------------------------------------------------------------


def _run(row: asyncpg.Record) -> RegistryRun:
    return from_row(RegistryRun, row, ids=("run_id",), docs=("params", "metrics"))


async def insert_runs(
    conn: asyncpg.Connection,
    tenant_id: str,
    runs: list[NewRun],
    workflow_id: str | None,
    workflow_run_id: str | None,
) -> list[RegistryRun]:
    """Insert each run once (by its id); a run's artifact must be stored, hash matching."""
    await lock_registry_writes(conn, tenant_id)
    for run in runs:
        if run.artifact_uri is not None:
            data = await load_artifact(conn, tenant_id, run.artifact_uri, run.artifact_sha256)
            if run.artifact_size is not None and run.artifact_size != len(data):
                raise ArtifactIntegrityError(
                    f"artifact {run.artifact_uri!r} has {len(data)} bytes, "
                    f"not the {run.artifact_size} registered for run {run.name!r}"
                )
        await conn.execute(
            "insert into registry_runs (run_id, tenant_id, kind, name, owner, params, metrics,"
            " artifact_uri, artifact_sha256, artifact_size, workflow_id, workflow_run_id)"
            " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            " on conflict (run_id) do nothing",
            uuid.UUID(run.run_id),
            tenant_id,
            run.kind,
            run.name,
            run.owner,
            json.dumps(run.params),
            json.dumps(run.metrics),
            run.artifact_uri,
            run.artifact_sha256,
            run.artifact_size,
            workflow_id,
            workflow_run_id,
        )
    rows = await conn.fetch(
        "select * from registry_runs where tenant_id = $1 and run_id = any($2::uuid[])",
        tenant_id,
        [uuid.UUID(r.run_id) for r in runs],
    )
    by_id = {str(r["run_id"]): _run(r) for r in rows}
    return [by_id[r.run_id] for r in runs]


async def record_run(
    conn: asyncpg.Connection,
    tenant_id: str,
    run: NewRun,
    status: str,
    workflow_id: str | None,
    workflow_run_id: str | None,
) -> None:
    """Insert a run without an artifact, or refresh its status and metrics (an
    experiment finalized again records its latest summary on the same run)."""
    await lock_registry_writes(conn, tenant_id)
    await conn.execute(
        "insert into registry_runs (run_id, tenant_id, kind, name, owner, status, params,"
        " metrics, workflow_id, workflow_run_id) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " on conflict (run_id) do update set status = excluded.status,"
        " metrics = excluded.metrics, workflow_run_id = excluded.workflow_run_id",
        uuid.UUID(run.run_id),
        tenant_id,
        run.kind,
        run.name,
        run.owner,
        status,
        json.dumps(run.params),
        json.dumps(run.metrics),
        workflow_id,
        workflow_run_id,
    )


async def get_run(conn: asyncpg.Connection, tenant_id: str, run_id: str) -> RegistryRun:
    row = await conn.fetchrow(
        "select * from registry_runs where tenant_id = $1 and run_id = $2",
        tenant_id,
        uuid.UUID(run_id),
    )
    if row is None:
        raise NotFound(f"registry run {run_id} does not exist in tenant {tenant_id!r}")
    return _run(row)


async def list_runs(
    conn: asyncpg.Connection, tenant_id: str, limit: int = 200
) -> list[RegistryRun]:
    rows = await conn.fetch(
        "select * from registry_runs where tenant_id = $1 order by created_at desc limit $2",
        tenant_id,
        limit,
    )
    return [_run(r) for r in rows]


async def list_aliases(conn: asyncpg.Connection, tenant_id: str) -> list[RegistryAlias]:
    return await fetch_all(
        conn,
        RegistryAlias,
        "select a.*, r.name as run_name, r.owner as run_owner from registry_aliases a"
        " left join registry_runs r on r.run_id = a.run_id"
        " where a.tenant_id = $1 order by a.alias",
        tenant_id,
        ids=("run_id",),
    )


_MOVE_IDS = ("from_run_id", "to_run_id")


def _move(row: asyncpg.Record) -> AliasMove:
    return from_row(AliasMove, row, ids=_MOVE_IDS)


async def alias_history(
    conn: asyncpg.Connection, tenant_id: str, alias: str, limit: int = 500
) -> list[AliasMove]:
    rows = await conn.fetch(
        "select * from registry_alias_history where tenant_id = $1 and alias = $2"
        " order by id desc limit $3",
        tenant_id,
        alias,
        limit,
    )
    return [_move(r) for r in reversed(rows)]


async def delete_demo_rows(
    conn: asyncpg.Connection, tenant_id: str, live_workflow_run_ids: list[str]
) -> dict[str, int]:
    """Delete demo-owned runs and artifacts of demo runs that are over.

    Never a user's run, never a run an alias points at (so an alias is never
    emptied by a reset), never the rows of a demo run still going
    (`live_workflow_run_ids`).
    """
    await lock_registry_writes(conn, tenant_id)
    deleted_runs = await conn.fetch(
        "delete from registry_runs r where r.tenant_id = $1 and r.owner = 'demo'"
        " and not (coalesce(r.params->>'demo_workflow_run_id', r.workflow_run_id, '')"
        "          = any($2::text[]))"
        " and not exists (select 1 from registry_aliases a"
        "                 where a.tenant_id = r.tenant_id and a.run_id = r.run_id)"
        " returning r.run_id",
        tenant_id,
        live_workflow_run_ids,
    )
    # Model artifacts are content-addressed and may be shared by several runs:
    # delete one only when no run refers to it any more.
    model_artifacts = await conn.execute(
        "delete from registry_artifacts a where a.tenant_id = $1 and starts_with(a.uri, 'demo/')"
        " and not starts_with(a.uri, 'demo/sessions/')"
        " and not exists (select 1 from registry_runs r"
        "                 where r.tenant_id = a.tenant_id and r.artifact_uri = a.uri)",
        tenant_id,
    )
    session_artifacts = await conn.execute(
        "delete from registry_artifacts a where a.tenant_id = $1"
        " and starts_with(a.uri, 'demo/sessions/')"
        " and not (split_part(a.uri, '/', 3) = any($2::text[]))",
        tenant_id,
        live_workflow_run_ids,
    )
    return {
        "runs": len(deleted_runs),
        "model_artifacts": row_count(model_artifacts),
        "session_artifacts": row_count(session_artifacts),
    }


async def adopt_demo_run(
    conn: asyncpg.Connection, tenant_id: str, run_id: str, demo_workflow_run_id: str
) -> bool:
    """Hand a run another workflow registered (an Experiment child's) to the demo run.

    It becomes demo-owned, so a later demo reset deletes it like the demo's own.
    """
    result = await conn.execute(
        "update registry_runs set owner = 'demo',"
        " params = params || jsonb_build_object('demo_workflow_run_id', $3::text)"
        " where tenant_id = $1 and run_id = $2",
        tenant_id,
        uuid.UUID(run_id),
        demo_workflow_run_id,
    )
    return row_count(result) == 1


# --- aliases --------------------------------------------------------------------


async def find_move(conn: asyncpg.Connection, tenant_id: str, move_id: str) -> AliasMove | None:
    return await fetch_one(
        conn,
        AliasMove,
        "select * from registry_alias_history where tenant_id = $1 and move_id = $2",
        tenant_id,
        move_id,
        ids=_MOVE_IDS,
    )


@dataclass(frozen=True)
class LockedAlias:
    """An alias row held by `lock_alias` until the transaction ends."""

    exists: bool
    run_id: str | None


async def lock_alias(conn: asyncpg.Connection, tenant_id: str, alias: str) -> LockedAlias:
    """Lock the alias row (a move of it by another workflow waits); it may not exist yet."""
    await conn.execute(f"set local lock_timeout = {ALIAS_LOCK_TIMEOUT_MS}")
    row = await conn.fetchrow(
        "select run_id, version from registry_aliases where tenant_id = $1 and alias = $2"
        " for update",
        tenant_id,
        alias,
    )
    return LockedAlias(exists=row is not None, run_id=None if row is None else _str(row["run_id"]))


async def run_exists(conn: asyncpg.Connection, tenant_id: str, run_id: str | None) -> bool:
    """Whether an alias may point at `run_id` (None, an empty alias, always may)."""
    if run_id is None:
        return True
    return bool(
        await conn.fetchval(
            "select 1 from registry_runs where tenant_id = $1 and run_id = $2",
            tenant_id,
            uuid.UUID(run_id),
        )
    )


async def latest_move(conn: asyncpg.Connection, tenant_id: str, alias: str) -> AliasMove | None:
    return await fetch_one(
        conn,
        AliasMove,
        "select * from registry_alias_history where tenant_id = $1 and alias = $2"
        " order by id desc limit 1",
        tenant_id,
        alias,
        ids=_MOVE_IDS,
    )


# What a move names: the alias, why, and the id its caller chose for it.
AliasChange = MoveAliasInput | UndoAliasMoveInput | SettleAliasInput


async def record_move(
    conn: asyncpg.Connection,
    change: AliasChange,
    locked: LockedAlias,
    to_run_id: str | None,
    workflow_id: str | None,
    workflow_run_id: str | None,
    detail: str = "",
) -> AliasMoveResult:
    """Point the locked alias at `to_run_id` and append the move to its history."""
    to_uuid = None if to_run_id is None else uuid.UUID(to_run_id)
    if locked.exists:
        await conn.execute(
            "update registry_aliases set run_id = $3, version = version + 1, updated_at = now()"
            " where tenant_id = $1 and alias = $2",
            change.tenant_id,
            change.alias,
            to_uuid,
        )
    else:
        await conn.execute(
            "insert into registry_aliases (tenant_id, alias, run_id) values ($1, $2, $3)",
            change.tenant_id,
            change.alias,
            to_uuid,
        )
    history_id: int = await conn.fetchval(
        "insert into registry_alias_history (tenant_id, alias, from_run_id, to_run_id, reason,"
        " move_id, workflow_id, workflow_run_id) values ($1, $2, $3, $4, $5, $6, $7, $8)"
        " returning id",
        change.tenant_id,
        change.alias,
        None if locked.run_id is None else uuid.UUID(locked.run_id),
        to_uuid,
        change.reason,
        change.move_id,
        workflow_id,
        workflow_run_id,
    )
    return AliasMoveResult(
        alias=change.alias,
        moved=True,
        from_run_id=locked.run_id,
        to_run_id=to_run_id,
        run_id=to_run_id,
        history_id=history_id,
        detail=detail,
    )


def made_before(alias: str, done: AliasMove, detail: str) -> AliasMoveResult:
    """The result of a move an earlier attempt already made (found by its move id)."""
    return AliasMoveResult(
        alias=alias,
        moved=True,
        from_run_id=done.from_run_id,
        to_run_id=done.to_run_id,
        run_id=done.to_run_id,
        history_id=done.id,
        detail=detail,
    )


def _left_as_is(
    alias: str, locked: LockedAlias, detail: str, by: str | None = None
) -> AliasMoveResult:
    return AliasMoveResult(
        alias=alias, moved=False, run_id=locked.run_id, superseded_by=by, detail=detail
    )


async def alias_state(conn: asyncpg.Connection, tenant_id: str, alias: str) -> AliasState:
    row = await conn.fetchrow(
        "select run_id, version from registry_aliases where tenant_id = $1 and alias = $2",
        tenant_id,
        alias,
    )
    mark = await conn.fetchval(
        "select coalesce(max(id), 0) from registry_alias_history"
        " where tenant_id = $1 and alias = $2",
        tenant_id,
        alias,
    )
    return AliasState(
        alias=alias,
        run_id=None if row is None else _str(row["run_id"]),
        version=0 if row is None else row["version"],
        history_mark=mark,
    )


async def move_alias(
    conn: asyncpg.Connection,
    input: MoveAliasInput,
    workflow_id: str | None = None,
    workflow_run_id: str | None = None,
) -> AliasMoveResult:
    """Point the alias at `to_run_id` (a no-op when it is there already)."""
    done = await find_move(conn, input.tenant_id, input.move_id)
    if done is not None:
        return made_before(input.alias, done, "move already made by an earlier attempt")
    if not await run_exists(conn, input.tenant_id, input.to_run_id):
        raise NotFound(
            f"cannot point alias {input.alias!r} at run {input.to_run_id}: no such run "
            f"in tenant {input.tenant_id!r}; see `konstruct registry runs`"
        )
    locked = await lock_alias(conn, input.tenant_id, input.alias)
    if locked.exists and locked.run_id == input.to_run_id:
        return _left_as_is(input.alias, locked, "already there")
    return await record_move(conn, input, locked, input.to_run_id, workflow_id, workflow_run_id)


async def undo_move(
    conn: asyncpg.Connection,
    input: UndoAliasMoveInput,
    workflow_id: str | None,
    workflow_run_id: str | None,
) -> AliasMoveResult:
    """Reverse one move, if it was made and nobody has moved the alias since."""
    done = await find_move(conn, input.tenant_id, input.move_id)
    if done is not None:
        return made_before(input.alias, done, "undo already made by an earlier attempt")
    target = await find_move(conn, input.tenant_id, input.undo_move_id)
    if target is None:
        state = await alias_state(conn, input.tenant_id, input.alias)
        return AliasMoveResult(
            alias=input.alias,
            moved=False,
            run_id=state.run_id,
            detail="nothing to undo: the move was never made",
        )
    locked = await lock_alias(conn, input.tenant_id, input.alias)
    latest = await latest_move(conn, input.tenant_id, input.alias)
    if latest is not None and latest.id != target.id:
        if latest.workflow_run_id != workflow_run_id:
            detail = f"alias moved again since (by {latest.workflow_id}); left as is"
            return _left_as_is(input.alias, locked, detail, by=latest.workflow_id)
        return _left_as_is(input.alias, locked, "alias moved again since by this run; left as is")
    back_to = target.from_run_id
    note = ""
    if not await run_exists(conn, input.tenant_id, back_to):
        note = f" (run {back_to} no longer exists: alias emptied)"
        back_to = None
    return await record_move(
        conn, input, locked, back_to, workflow_id, workflow_run_id, detail="undone" + note
    )


async def settle_alias(
    conn: asyncpg.Connection,
    input: SettleAliasInput,
    workflow_id: str | None,
    workflow_run_id: str | None,
) -> AliasMoveResult:
    """Put the alias on the target, unless another workflow run moved it after ours.

    The last demo run to move the alias wins: a run never overrides a move
    that someone else made after its own.
    """
    done = await find_move(conn, input.tenant_id, input.move_id)
    if done is not None:
        return made_before(input.alias, done, "settled by an earlier attempt")
    locked = await lock_alias(conn, input.tenant_id, input.alias)
    if locked.run_id == input.target_run_id:
        return _left_as_is(input.alias, locked, "on target")
    latest = await latest_move(conn, input.tenant_id, input.alias)
    if (
        latest is not None
        and latest.id > input.history_mark
        and latest.workflow_run_id != workflow_run_id
    ):
        detail = f"left where {latest.workflow_id} moved it after this run"
        return _left_as_is(input.alias, locked, detail, by=latest.workflow_id)
    if not await run_exists(conn, input.tenant_id, input.target_run_id):
        raise NotFound(f"cannot settle {input.alias!r} on run {input.target_run_id}: no such run")
    return await record_move(
        conn, input, locked, input.target_run_id, workflow_id, workflow_run_id, detail="settled"
    )


async def discard_runs(conn: asyncpg.Connection, input: DiscardRunsInput) -> DiscardRunsResult:
    """Delete runs (and artifacts no other run uses), except kept or aliased ones."""
    await lock_registry_writes(conn, input.tenant_id)
    deleted = await conn.fetch(
        "delete from registry_runs r where r.tenant_id = $1 and r.run_id = any($2::uuid[])"
        " and not (r.run_id = any($3::uuid[]))"
        " and not exists (select 1 from registry_aliases a"
        "                 where a.tenant_id = r.tenant_id and a.run_id = r.run_id)"
        " returning r.run_id, r.artifact_uri",
        input.tenant_id,
        [uuid.UUID(r) for r in input.run_ids],
        [uuid.UUID(r) for r in input.keep],
    )
    uris = [r["artifact_uri"] for r in deleted if r["artifact_uri"]]
    if uris:
        await conn.execute(
            "delete from registry_artifacts a where a.tenant_id = $1"
            " and a.uri = any($2::text[])"
            " and not exists (select 1 from registry_runs r"
            "                 where r.tenant_id = a.tenant_id and r.artifact_uri = a.uri)",
            input.tenant_id,
            uris,
        )
    gone = {str(r["run_id"]) for r in deleted}
    return DiscardRunsResult(
        deleted=[r for r in input.run_ids if r in gone],
        kept=[r for r in input.run_ids if r not in gone],
    )


@dataclass(frozen=True)
class AliasCheck:
    """An alias, the run it points at, and that run's artifact as registered and as stored."""

    alias: str
    run_id: str | None
    run_found: bool
    artifact_uri: str | None
    artifact_sha256: str | None
    stored_sha256: str | None


async def check_aliases(conn: asyncpg.Connection, tenant_id: str) -> list[AliasCheck]:
    rows = await conn.fetch(
        "select a.alias, a.run_id, r.run_id as found, r.artifact_uri, r.artifact_sha256,"
        " (select sha256 from registry_artifacts x where x.tenant_id = a.tenant_id"
        "  and x.uri = r.artifact_uri) as stored_sha"
        " from registry_aliases a left join registry_runs r on r.run_id = a.run_id"
        " where a.tenant_id = $1 order by a.alias",
        tenant_id,
    )
    return [
        from_row(
            AliasCheck,
            r,
            ids=("run_id",),
            columns={"stored_sha256": "stored_sha"},
            run_found=r["found"] is not None,
        )
        for r in rows
    ]
