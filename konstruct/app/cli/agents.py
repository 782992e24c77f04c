"""`konstruct agents put | list`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from konstruct.agents.models import BUILTIN_NAMES, TOOL_NAME, AgentProfile
from konstruct.app.cli.common import (
    CliState,
    Query,
    field_option,
    in_tenant,
    listing,
    pass_state,
    tenant_argument,
)
from konstruct.platform.errors import InvalidInput

if TYPE_CHECKING:
    import asyncpg

DEFAULT_FALLBACK = "Sorry, I cannot answer right now. Please try again in a few minutes."


@click.group("agents")
def group() -> None:
    """Manage a tenant's agents."""


def tool_names(tools: tuple[str, ...]) -> list[str]:
    """The --tool names, each once, in order; InvalidInput naming --tool for a bad one."""
    chosen = list(dict.fromkeys(tools))
    for name in chosen:
        if not re.match(TOOL_NAME, name):
            raise InvalidInput(
                f"agents put: --tool {name!r} is not a tool name"
                " (1-64 letters, digits, '_' or '-')",
                ["--tool"],
            )
    limit = AgentProfile.model_fields["tools"].metadata[0].max_length
    if len(chosen) > limit:
        raise InvalidInput(f"agents put: --tool: at most {limit} tools", ["--tool"])
    return chosen


async def check_tools(conn: asyncpg.Connection, tenant: str, tools: list[str]) -> None:
    """Each name is a built-in tool, one of the tenant's, or one of its MCP servers (all of
    that server's tools); InvalidInput naming --tool otherwise."""
    from konstruct.agents.store.tools import list_tools

    unknown = [name for name in tools if name not in BUILTIN_NAMES]
    if not unknown:
        return
    specs = await list_tools(conn, tenant)
    own = [spec.name for spec in specs if spec.kind in ("webhook", "mcp")]
    # An MCP server's name stands for all of its tools.
    own += sorted({spec.mcp_server for spec in specs if spec.mcp_server})
    missing = [name for name in unknown if name not in own]
    if missing:
        raise InvalidInput(
            f"agents put: --tool {missing[0]!r}: no such tool; built in: {', '.join(BUILTIN_NAMES)};"
            f" tenant {tenant!r} has: {', '.join(own) or 'none'}; define it first with"
            f" `konstruct tools put {tenant} {missing[0]} --url URL`",
            ["--tool"],
        )


@group.command("put")
@tenant_argument
@click.argument("agent")
@click.option("--name", required=True)
@click.option("--role", required=True)
@click.option("--persona", default="")
@click.option("--system-prompt", default="")
@click.option("--model-group", type=click.Choice(["fast", "quality"]), default="fast")
@click.option("--fallback-reply", default=DEFAULT_FALLBACK)
@click.option(
    "--tool",
    "tools",
    multiple=True,
    metavar="NAME",
    help=f"a tool the agent may call (repeatable): built in ({', '.join(BUILTIN_NAMES)})"
    " or one the tenant defined with `konstruct tools put`",
)
@field_option(AgentProfile, "max_steps", "--max-steps", help="model steps one message may take")
@field_option(
    AgentProfile,
    "history_turns",
    "--history-turns",
    help="earlier turns of the thread the prompt may hold",
)
@field_option(
    AgentProfile,
    "memory_tokens",
    "--memory-tokens",
    help="token budget of those turns; older turns are folded into a summary",
)
@click.option(
    "--response-schema",
    type=click.Path(dir_okay=False, path_type=Path),
    help="a JSON schema file: the agent's final answer must be JSON that fits it"
    " (one repair step, then the message fails)",
)
@click.option(
    "--response-json",
    is_flag=True,
    help="the final answer must be a JSON object (any shape)",
)
@pass_state
def put(
    state: CliState,
    tenant: str,
    agent: str,
    name: str,
    role: str,
    persona: str,
    system_prompt: str,
    model_group: str,
    fallback_reply: str,
    tools: tuple[str, ...],
    max_steps: int,
    history_turns: int,
    memory_tokens: int,
    response_schema: Path | None,
    response_json: bool,
) -> int:
    """Create or update an agent (creates the tenant if new).

    A put replaces the whole profile: an option left out takes its default, so
    give every --tool the agent should keep (without --tool it has none).
    """
    from konstruct.agents.store.agents import put_agent

    chosen = tool_names(tools)
    response_format = _response_format(agent, response_schema, response_json)
    try:
        profile = AgentProfile(
            agent_id=agent,
            name=name,
            role=role,
            persona=persona,
            system_prompt=system_prompt,
            model_group=model_group,  # type: ignore[arg-type]
            fallback_reply=fallback_reply,
            max_steps=max_steps,
            history_turns=history_turns,
            memory_tokens=memory_tokens,
            tools=chosen,
            response_format=response_format,
        )
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("agents put", exc) from None

    async def save(conn: asyncpg.Connection) -> None:
        await check_tools(conn, tenant, chosen)
        await put_agent(conn, tenant, profile)

    in_tenant(state.settings, tenant, save)
    print(f"agent {tenant}/{agent} saved" + (f" (tools: {', '.join(chosen)})" if chosen else ""))
    return 0


def _response_format(agent: str, schema: Path | None, any_json: bool) -> dict[str, Any] | None:
    """The agent's `response_format` from --response-schema or --response-json."""
    if schema is not None and any_json:
        raise InvalidInput(
            "agents put: give --response-schema or --response-json, not both",
            ["--response-schema"],
        )
    if any_json:
        return {"type": "json_object"}
    if schema is None:
        return None
    try:
        document = json.loads(schema.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"agents put: --response-schema {schema}: not a readable JSON file ({exc})",
            ["--response-schema"],
        ) from None
    if not isinstance(document, dict):
        raise InvalidInput(
            f"agents put: --response-schema {schema}: a JSON schema is an object",
            ["--response-schema"],
        )
    return {"type": "json_schema", "json_schema": {"name": agent, "schema": document}}


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no agents",
    ["agent", "name", "model group", "tools", "steps", "role"],
    lambda a: (a.agent_id, a.name, a.model_group, ", ".join(a.tools) or None, a.max_steps, a.role),
)
def list_(tenant: str) -> Query:
    """List a tenant's agents."""
    from konstruct.agents.store.agents import list_agents

    return lambda conn: list_agents(conn, tenant)
