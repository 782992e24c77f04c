"""`konstruct send`: start HandleMessage and print the reply."""

from __future__ import annotations

import argparse
import sys
import uuid

from temporalio.client import WorkflowFailureError

from konstruct.cli.common import client_of, failure_message, print_json, run_async, settings_of
from workflows.handle_message import HandleMessage


def register(commands: argparse._SubParsersAction) -> None:
    send = commands.add_parser("send", help="send a message to an agent and print the reply")
    send.add_argument("tenant")
    send.add_argument("agent")
    send.add_argument("text")
    send.add_argument("--thread", default="cli", help="thread id (default: cli)")
    send.add_argument("--message-id", help="default: a new random id")
    send.add_argument("--sender", default="cli-user")
    send.add_argument("--json", action="store_true", help="print the whole result")
    send.set_defaults(handler=cmd_send)


def message_workflow_id(tenant_id: str, message_id: str) -> str:
    return f"msg-{tenant_id}-{message_id}"


async def _send(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    client = await client_of(settings)
    message = {
        "message_id": args.message_id or uuid.uuid4().hex[:12],
        "tenant_id": args.tenant,
        "agent_id": args.agent,
        "thread_id": args.thread,
        "channel": "cli",
        "sender": args.sender,
        "text": args.text,
    }
    try:
        result = await client.execute_workflow(
            HandleMessage.run,
            message,
            id=message_workflow_id(args.tenant, message["message_id"]),
            task_queue=settings.temporal.task_queue,
            static_summary=f"{args.tenant}/{args.agent}: {args.text[:60]}",
        )
    except WorkflowFailureError as exc:
        print(f"error: {failure_message(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print(result.response)
        if result.degraded:
            print("(degraded: no provider answered)", file=sys.stderr)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    return run_async(_send(args))
