"""Model registry: runs, aliases, alias history, and the inputs of its activities."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from konstruct.platform.models import StrictModel

# Who a registry row belongs to: DemoCascade's `reset` only ever deletes `demo` rows.
Owner = Literal["user", "demo"]


class RegistryRun(StrictModel):
    run_id: str
    tenant_id: str
    kind: str
    name: str
    owner: str = "user"
    status: str = "success"
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact_uri: str | None = None
    artifact_sha256: str | None = None
    artifact_size: int | None = None
    workflow_id: str | None = None
    workflow_run_id: str | None = None
    created_at: datetime | None = None


class NewRun(StrictModel):
    """A run to register; its id is chosen by the caller, so a retry registers it once."""

    run_id: str
    kind: str = "model"
    name: str
    owner: Owner = "user"
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact_uri: str | None = None
    artifact_sha256: str | None = None
    artifact_size: int | None = None


class RegistryAlias(StrictModel):
    tenant_id: str
    alias: str
    run_id: str | None
    version: int
    updated_at: datetime | None = None
    run_name: str | None = None
    run_owner: str | None = None


class AliasMove(StrictModel):
    """One row of an alias's history: who moved it, from where, to where, why."""

    id: int
    tenant_id: str
    alias: str
    from_run_id: str | None
    to_run_id: str | None
    reason: str
    move_id: str | None = None
    workflow_id: str | None = None
    workflow_run_id: str | None = None
    moved_at: datetime | None = None


class AliasState(StrictModel):
    alias: str
    run_id: str | None
    version: int = 0
    # Highest history id of this alias now: moves after it were made later.
    history_mark: int = 0


class MoveAliasInput(StrictModel):
    tenant_id: str
    alias: str
    to_run_id: str | None
    reason: str
    # Chosen by the workflow before the move: a retry finds the move already made.
    move_id: str


class UndoAliasMoveInput(StrictModel):
    tenant_id: str
    alias: str
    # The move to undo, and the id of the undoing move itself.
    undo_move_id: str
    move_id: str
    reason: str


class SettleAliasInput(StrictModel):
    """Put the alias on `target_run_id` unless someone else moved it after this run did."""

    tenant_id: str
    alias: str
    target_run_id: str | None
    # The alias's history mark when this workflow run started.
    history_mark: int
    move_id: str
    reason: str


class AliasMoveResult(StrictModel):
    alias: str
    moved: bool
    from_run_id: str | None = None
    to_run_id: str | None = None
    # The current target after the call (moved or not).
    run_id: str | None = None
    history_id: int | None = None
    # Set when the alias was moved by another workflow run after ours, and left there.
    superseded_by: str | None = None
    detail: str = ""


class DiscardRunsInput(StrictModel):
    tenant_id: str
    run_ids: list[str]
    # Runs kept whatever happens (the recorded champion).
    keep: list[str] = Field(default_factory=list)


class DiscardRunsResult(StrictModel):
    deleted: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list)
