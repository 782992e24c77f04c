"""`konstruct send`: start HandleMessage and print the reply."""

from __future__ import annotations

import sys
import uuid

import click
from pydantic import ValidationError

from konstruct.agents.models import HandleMessageInput
from konstruct.app.cli.common import (
    CliState,
    json_option,
    pass_state,
    run_async,
    temporal_client,
    tenant_argument,
)
from konstruct.platform.errors import InvalidInput
from konstruct.platform.naming import message_workflow_id


@click.command("send")
@tenant_argument
@click.argument("agent")
@click.argument("text")
@click.option("--thread", default="cli", show_default=True, help="thread id")
@click.option("--message-id", help="default: a new random id")
@click.option("--sender", default="cli-user", show_default=True)
@json_option("print the whole result")
@pass_state
def send(
    state: CliState,
    tenant: str,
    agent: str,
    text: str,
    thread: str,
    message_id: str | None,
    sender: str,
    as_json: bool,
) -> int:
    """Send a message to an agent and print the reply."""
    settings = state.settings
    message = {
        "message_id": message_id or uuid.uuid4().hex[:12],
        "tenant_id": tenant,
        "agent_id": agent,
        "thread_id": thread,
        "channel": "cli",
        "sender": sender,
        "text": text,
    }
    try:
        # Checked here as the workflow would check it, before anything is started.
        HandleMessageInput.model_validate(message)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("send", exc) from None

    async def execute() -> int:
        from temporalio.client import WorkflowFailureError

        from konstruct.app.cli.output import print_json
        from konstruct.app.failures import failure_message
        from konstruct.platform.temporal.results import workflow_result
        from konstruct.platform.temporal.search_attributes import message_search_attributes
        from workflows.handle_message import HandleMessage

        client = await temporal_client(settings)
        try:
            handle = await client.start_workflow(
                HandleMessage.run,
                message,
                id=message_workflow_id(tenant, message["message_id"]),
                task_queue=settings.temporal.task_queue,
                static_summary=f"{tenant}/{agent}: {text[:60]}",
                search_attributes=message_search_attributes(tenant),
            )
            # A worker without this client's key fails at once, naming the key.
            result = await workflow_result(handle)
        except WorkflowFailureError as exc:
            print(f"error: {failure_message(exc)}", file=sys.stderr)
            return 1
        if as_json:
            print_json(result)
        else:
            print(result.response)
            if result.degraded:
                print("(degraded: no provider answered)", file=sys.stderr)
        return 0

    return run_async(execute())
