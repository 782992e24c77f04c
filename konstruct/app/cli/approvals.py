"""`konstruct approvals list | approve | reject`: tool calls waiting for a person."""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from konstruct.agents.models import ToolDecision
from konstruct.app.cli.common import (
    CliState,
    Query,
    listing,
    pass_state,
    run_async,
    temporal_client,
    tenant_argument,
    workflow_id_value,
)
from konstruct.platform.errors import InvalidInput

if TYPE_CHECKING:
    import asyncpg
    from temporalio.service import RPCError

    from konstruct.config import Settings

# The arguments shown in the table, at most (`--json` has them whole).
ARGUMENTS_CHARS = 80
# How long approve/reject wait for the workflow's worker to take the decision.
UPDATE_WAIT_S = 30.0


@click.group("approvals")
def group() -> None:
    """Tool calls waiting for a person: list, approve or reject them."""


def shorten(text: str, limit: int = ARGUMENTS_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _waiting(row: asyncpg.Record, now: datetime) -> dict[str, Any]:
    created: datetime = row["created_at"]
    return {
        "workflow_id": row["workflow_id"],
        "call_id": row["call_id"],
        "tool": row["tool"],
        "arguments": json.loads(row["arguments"]),
        "agent_id": row["agent_id"],
        "thread_id": row["thread_id"],
        "message_id": row["message_id"],
        "created_at": created.isoformat(timespec="seconds"),
        "waiting": _age(created, now),
    }


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no tool calls waiting for approval",
    ["workflow", "call", "tool", "agent", "waiting since", "arguments"],
    lambda w: (
        w["workflow_id"],
        w["call_id"],
        w["tool"],
        w["agent_id"],
        f"{w['created_at']} ({w['waiting']})",
        shorten(json.dumps(w["arguments"], ensure_ascii=False)),
    ),
)
def list_(tenant: str) -> Query:
    """The tenant's tool calls waiting for approval, oldest first."""
    from konstruct.agents.store.steps import awaiting

    async def query(conn: asyncpg.Connection) -> list[Any]:
        rows = await awaiting(conn, tenant)
        now = datetime.now(UTC)
        return [_waiting(row, now) for row in rows]

    return query


def _user() -> str:
    try:
        return getpass.getuser() or "cli"
    except Exception:  # no USER/LOGNAME and no passwd entry
        return "cli"


def _error(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 1


async def _not_found(settings: Settings, workflow_id: str, exc: RPCError) -> str:
    """Why an update found no workflow to take it: none by that id, or it has ended."""
    from temporalio.service import RPCError

    client = await temporal_client(settings)
    try:
        status = (await client.get_workflow_handle(workflow_id).describe()).status
    except RPCError:
        return (
            f"no workflow {workflow_id!r} ({exc.message}); see"
            " `konstruct approvals list TENANT` for the calls that wait"
        )
    word = status.name.lower() if status is not None else "closed"
    return f"workflow {workflow_id!r} is {word}: it waits for no approval"


def decide(settings: Settings, workflow_id: str, approve: bool, decision: ToolDecision) -> int:
    """Send the update; print `approved CALL_ID` / `rejected CALL_ID` or one line of error."""
    import asyncio

    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.exceptions import ApplicationError
    from temporalio.service import RPCError, RPCStatusCode

    from workflows.handle_message import HandleMessage

    update = HandleMessage.approve_tool if approve else HandleMessage.reject_tool

    async def run() -> int:
        client = await temporal_client(settings)
        handle = client.get_workflow_handle(workflow_id)
        try:
            await asyncio.wait_for(handle.execute_update(update, decision), UPDATE_WAIT_S)
        except WorkflowUpdateFailedError as exc:
            # The workflow's validator refused it (NotPending lists the calls that wait).
            cause = exc.cause
            text = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
            return _error(text)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return _error(await _not_found(settings, workflow_id, exc))
        except TimeoutError:
            return _error(
                f"workflow {workflow_id!r} did not take the decision within {UPDATE_WAIT_S:g} s:"
                " is a worker running? (`konstruct status`)"
            )
        print(f"{'approved' if approve else 'rejected'} {decision.call_id}")
        return 0

    return run_async(run())


def _decision(call_id: str, by: str, reason: str = "") -> ToolDecision:
    try:
        return ToolDecision(call_id=call_id, by=by, reason=reason)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("approvals", exc) from None


workflow_id_argument = click.argument("workflow_id", callback=workflow_id_value)
call_id_argument = click.argument("call_id")
by_option = click.option(
    "--by",
    default=_user,
    show_default="your user name",
    help="who decided (recorded with the call)",
)


@group.command("approve")
@workflow_id_argument
@call_id_argument
@by_option
@pass_state
def approve(state: CliState, workflow_id: str, call_id: str, by: str) -> int:
    """Approve a waiting tool call: the workflow runs it."""
    return decide(state.settings, workflow_id, True, _decision(call_id, by))


@group.command("reject")
@workflow_id_argument
@call_id_argument
@click.option("--reason", default="", help="told to the model with the rejection")
@by_option
@pass_state
def reject(state: CliState, workflow_id: str, call_id: str, reason: str, by: str) -> int:
    """Reject a waiting tool call: it is not run and the model is told."""
    return decide(state.settings, workflow_id, False, _decision(call_id, by, reason))
