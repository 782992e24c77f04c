"""`konstruct send`: start HandleMessage and print the reply."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from konstruct.agents.streaming import Shown


@click.command("send")
@tenant_argument
@click.argument("agent")
@click.argument("text")
@click.option("--thread", default="cli", show_default=True, help="thread id")
@click.option("--message-id", help="default: a new random id")
@click.option("--sender", default="cli-user", show_default=True)
@click.option(
    "--stream",
    is_flag=True,
    help="print the reply as the model writes it (tool calls on stderr)",
)
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
    stream: bool,
    as_json: bool,
) -> int:
    """Send a message to an agent and print the reply."""
    settings = state.settings
    message_id = message_id or uuid.uuid4().hex[:12]
    message: dict[str, Any] = {
        "message_id": message_id,
        "tenant_id": tenant,
        "agent_id": agent,
        "thread_id": thread,
        "channel": "cli",
        "sender": sender,
        "text": text,
        **({"stream": True} if stream else {}),
    }
    try:
        # Checked here as the workflow would check it, before anything is started.
        HandleMessageInput.model_validate(message)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("send", exc) from None

    async def execute() -> int:
        from temporalio.client import WorkflowFailureError

        from konstruct.agents.streaming import StreamView
        from konstruct.app.cli.output import print_json
        from konstruct.app.failures import failure_message
        from konstruct.app.notices import Notices, events_until
        from konstruct.platform import db
        from konstruct.platform.temporal.results import workflow_result
        from konstruct.platform.temporal.search_attributes import message_search_attributes
        from workflows.handle_message import HandleMessage

        client = await temporal_client(settings)
        notices: Notices | None = None
        if stream and not as_json:  # --json prints the result only
            notices = Notices(db.app_url(settings))
            await notices.connect()
        workflow_id = message_workflow_id(tenant, message_id)
        try:
            # Subscribed before the start: no live event can come before we listen.
            queue = notices.subscribe(workflow_id) if notices is not None else None
            handle = await client.start_workflow(
                HandleMessage.run,
                message,
                id=workflow_id,
                task_queue=settings.temporal.task_queue,
                static_summary=f"{tenant}/{agent}: {text[:60]}",
                search_attributes=message_search_attributes(tenant),
            )
            # A worker without this client's key fails at once, naming the key.
            answering = asyncio.ensure_future(workflow_result(handle))
            view = StreamView()
            if queue is not None:
                async for event in events_until(queue, answering):
                    for shown in view.feed(event):
                        _print_live(shown)
            result = await answering
        except WorkflowFailureError as exc:
            print(f"error: {failure_message(exc)}", file=sys.stderr)
            return 1
        finally:
            if notices is not None:
                await notices.stop()
        if as_json:
            print_json(result)
        elif stream:
            for shown in view.finish(result.response, max(0, result.steps - 1)):
                _print_live(shown)
            print()
        else:
            print(result.response)
        if result.degraded and not as_json:
            print("(degraded: no provider answered)", file=sys.stderr)
        return 0

    return run_async(execute())


def _print_live(shown: Shown) -> None:
    """A live piece of the reply on stdout, as it comes; a tool call on stderr."""
    if shown.event is None:
        print(shown.text, end="", flush=True)
        return
    event = shown.event
    if event["type"] == "tool_call.started":
        print(f"[{event['tool']} ...]", file=sys.stderr, flush=True)
    elif event["type"] == "tool_call.ended":
        print(f"[{event['tool']}: {event['status']}]", file=sys.stderr, flush=True)
    elif event["type"] == "step_restarted":
        print("\n[the step ran again and wrote otherwise; the stored reply:]", flush=True)
