"""Registry activities: thin wrappers over `konstruct.store.registry`.

Each names the workflow run that calls it, so every alias move and registered
run is traceable to the workflow that made it.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from temporalio import activity

from konstruct.db import tenant_transaction
from konstruct.errors import KonstructError, NotFound
from konstruct.models.registry import (
    AliasMoveResult,
    AliasState,
    AliasStateInput,
    DiscardRunsInput,
    DiscardRunsResult,
    MoveAliasInput,
    RegisterRunsInput,
    RegistryRun,
    SettleAliasInput,
    UndoAliasMoveInput,
)
from konstruct.store.registry import (
    _latest_move,
    _lock_alias,
    _made_before,
    _record_move,
    _run_exists,
    _str,
    alias_state,
    find_move,
    insert_runs,
    lock_registry_writes,
    move_alias,
)
from konstruct.validation import to_application_error


class RegistryActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def all(self) -> list[Any]:
        return [
            self.register_runs,
            self.alias_state,
            self.move_alias,
            self.undo_alias_move,
            self.settle_alias,
            self.discard_runs,
        ]

    @staticmethod
    def _caller() -> tuple[str | None, str | None]:
        info = activity.info()
        return info.workflow_id, info.workflow_run_id

    @activity.defn(name="registry_register_runs")
    async def register_runs(self, input: RegisterRunsInput) -> list[RegistryRun]:
        """Insert runs once each; a run's artifact must be in the store with its hash."""
        workflow_id, workflow_run_id = self._caller()
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                return await insert_runs(
                    conn, input.tenant_id, input.runs, workflow_id, workflow_run_id
                )
        except KonstructError as exc:
            raise to_application_error(exc) from exc

    @activity.defn(name="registry_alias_state")
    async def alias_state(self, input: AliasStateInput) -> AliasState:
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await alias_state(conn, input.tenant_id, input.alias)

    @activity.defn(name="registry_move_alias")
    async def move_alias(self, input: MoveAliasInput) -> AliasMoveResult:
        workflow_id, workflow_run_id = self._caller()
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                return await move_alias(conn, input, workflow_id, workflow_run_id)
        except KonstructError as exc:
            raise to_application_error(exc) from exc

    @activity.defn(name="registry_undo_alias_move")
    async def undo_alias_move(self, input: UndoAliasMoveInput) -> AliasMoveResult:
        """Reverse one move, if it was made and nobody has moved the alias since."""
        workflow_id, workflow_run_id = self._caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            done = await find_move(conn, input.tenant_id, input.move_id)
            if done is not None:
                return _made_before(input.alias, done, "undo already made by an earlier attempt")
            target = await find_move(conn, input.tenant_id, input.undo_move_id)
            if target is None:
                state = await alias_state(conn, input.tenant_id, input.alias)
                return AliasMoveResult(
                    alias=input.alias,
                    moved=False,
                    run_id=state.run_id,
                    detail="nothing to undo: the move was never made",
                )
            row = await _lock_alias(conn, input.tenant_id, input.alias)
            current = None if row is None else _str(row["run_id"])
            latest = await _latest_move(conn, input.tenant_id, input.alias)
            if latest is not None and latest.id != target.id:
                other = latest.workflow_run_id != workflow_run_id
                return AliasMoveResult(
                    alias=input.alias,
                    moved=False,
                    run_id=current,
                    superseded_by=latest.workflow_id if other else None,
                    detail=(
                        f"alias moved again since (by {latest.workflow_id}); left as is"
                        if other
                        else "alias moved again since by this run; left as is"
                    ),
                )
            back_to = target.from_run_id
            note = ""
            if not await _run_exists(conn, input.tenant_id, back_to):
                note = f" (run {back_to} no longer exists: alias emptied)"
                back_to = None
            return await _record_move(
                conn,
                tenant_id=input.tenant_id,
                alias=input.alias,
                exists=row is not None,
                from_run_id=current,
                to_run_id=back_to,
                reason=input.reason,
                move_id=input.move_id,
                workflow_id=workflow_id,
                workflow_run_id=workflow_run_id,
                detail="undone" + note,
            )

    @activity.defn(name="registry_settle_alias")
    async def settle_alias(self, input: SettleAliasInput) -> AliasMoveResult:
        """Put the alias on the target, unless another workflow run moved it after ours.

        The last demo run to move the alias wins: a run never overrides a move
        that someone else made after its own.
        """
        workflow_id, workflow_run_id = self._caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            done = await find_move(conn, input.tenant_id, input.move_id)
            if done is not None:
                return _made_before(input.alias, done, "settled by an earlier attempt")
            row = await _lock_alias(conn, input.tenant_id, input.alias)
            current = None if row is None else _str(row["run_id"])
            if current == input.target_run_id:
                return AliasMoveResult(
                    alias=input.alias, moved=False, run_id=current, detail="on target"
                )
            latest = await _latest_move(conn, input.tenant_id, input.alias)
            if (
                latest is not None
                and latest.id > input.history_mark
                and latest.workflow_run_id != workflow_run_id
            ):
                return AliasMoveResult(
                    alias=input.alias,
                    moved=False,
                    run_id=current,
                    superseded_by=latest.workflow_id,
                    detail=f"left where {latest.workflow_id} moved it after this run",
                )
            target = input.target_run_id
            if not await _run_exists(conn, input.tenant_id, target):
                raise to_application_error(
                    NotFound(f"cannot settle {input.alias!r} on run {target}: no such run")
                )
            return await _record_move(
                conn,
                tenant_id=input.tenant_id,
                alias=input.alias,
                exists=row is not None,
                from_run_id=current,
                to_run_id=target,
                reason=input.reason,
                move_id=input.move_id,
                workflow_id=workflow_id,
                workflow_run_id=workflow_run_id,
                detail="settled",
            )

    @activity.defn(name="registry_discard_runs")
    async def discard_runs(self, input: DiscardRunsInput) -> DiscardRunsResult:
        """Delete runs (and artifacts no other run uses), except kept or aliased ones."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
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
