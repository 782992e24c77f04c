"""`konstruct agents put | list`."""

from __future__ import annotations

import click
from pydantic import ValidationError

from konstruct.cli.common import CliState, Query, listing, pass_state, tenant_argument, with_pool
from konstruct.errors import InvalidInput
from konstruct.models import AgentProfile
from konstruct.store.agents import list_agents, put_agent

DEFAULT_FALLBACK = "Sorry, I cannot answer right now. Please try again in a few minutes."


@click.group("agents")
def group() -> None:
    """Manage a tenant's agents."""


@group.command("put")
@tenant_argument
@click.argument("agent")
@click.option("--name", required=True)
@click.option("--role", required=True)
@click.option("--persona", default="")
@click.option("--system-prompt", default="")
@click.option("--model-group", type=click.Choice(["fast", "quality"]), default="fast")
@click.option("--fallback-reply", default=DEFAULT_FALLBACK)
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
) -> int:
    """Create or update an agent (creates the tenant if new)."""
    try:
        profile = AgentProfile(
            agent_id=agent,
            name=name,
            role=role,
            persona=persona,
            system_prompt=system_prompt,
            model_group=model_group,  # type: ignore[arg-type]
            fallback_reply=fallback_reply,
        )
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("agents put", exc) from None
    with_pool(state.settings, lambda pool: put_agent(pool, tenant, profile))
    print(f"agent {tenant}/{agent} saved")
    return 0


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no agents",
    ["agent", "name", "model group", "role"],
    lambda a: (a.agent_id, a.name, a.model_group, a.role),
)
def list_(tenant: str) -> Query:
    """List a tenant's agents."""
    return lambda pool: list_agents(pool, tenant)
