"""`konstruct agents put | list`."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from konstruct import db
from konstruct.cli.common import print_json, run_async, settings_of
from konstruct.errors import InvalidInput
from konstruct.models import AgentProfile
from konstruct.store.agents import list_agents, put_agent

DEFAULT_FALLBACK = "Sorry, I cannot answer right now. Please try again in a few minutes."


def register(commands: argparse._SubParsersAction) -> None:
    agents = commands.add_parser("agents", help="manage a tenant's agents")
    sub = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    put = sub.add_parser("put", help="create or update an agent (creates the tenant if new)")
    put.add_argument("tenant")
    put.add_argument("agent")
    put.add_argument("--name", required=True)
    put.add_argument("--role", required=True)
    put.add_argument("--persona", default="")
    put.add_argument("--system-prompt", default="")
    put.add_argument("--model-group", choices=["fast", "quality"], default="fast")
    put.add_argument("--fallback-reply", default=DEFAULT_FALLBACK)
    put.set_defaults(handler=cmd_put)
    ls = sub.add_parser("list", help="list a tenant's agents")
    ls.add_argument("tenant")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_list)


async def _with_pool(args: argparse.Namespace, work):  # type: ignore[no-untyped-def]
    settings = settings_of(args)
    pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=2)
    try:
        return await work(pool)
    finally:
        await pool.close()


def cmd_put(args: argparse.Namespace) -> int:
    try:
        agent = AgentProfile(
            agent_id=args.agent,
            name=args.name,
            role=args.role,
            persona=args.persona,
            system_prompt=args.system_prompt,
            model_group=args.model_group,
            fallback_reply=args.fallback_reply,
        )
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("agents put", exc) from None
    run_async(_with_pool(args, lambda pool: put_agent(pool, args.tenant, agent)))
    print(f"agent {args.tenant}/{args.agent} saved")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    agents = run_async(_with_pool(args, lambda pool: list_agents(pool, args.tenant)))
    if args.json:
        print_json(agents)
        return 0
    if not agents:
        print(f"tenant {args.tenant!r} has no agents")
    for a in agents:
        print(f"{a.agent_id:<16} {a.name:<16} {a.model_group:<8} {a.role}")
    return 0
