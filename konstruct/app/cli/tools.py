"""`konstruct tools list | put | delete | allow | hosts | mcp`: a tenant's tools, the hosts
its built-in `http_request` tool may reach, and its MCP servers."""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from konstruct.agents.models import BUILTIN_NAMES, ToolSpec
from konstruct.app.cli.common import (
    CliState,
    Query,
    field_option,
    in_tenant,
    listing,
    pass_state,
    tenant_and_argument,
    tenant_argument,
)
from konstruct.platform.errors import InvalidInput, field_problems

if TYPE_CHECKING:
    import asyncpg

# The option (or argument) of `tools put` that sets each ToolSpec field.
OPTION_OF = {
    "name": "NAME",
    "kind": "NAME",
    "description": "--description",
    "parameters": "--parameters",
    "url": "--url",
    "secret_header": "--secret-header",
    "secret_env": "--secret-env",
    "requires_approval": "--requires-approval",
    "timeout_s": "--timeout",
    "approval_timeout_s": "--approval-timeout",
}
# What only a webhook has: refused for a built-in tool's name.
WEBHOOK_ONLY = ("description", "parameters", "url", "secret_header", "secret_env")


def _default(field: str) -> Any:
    return ToolSpec.model_fields[field].default


# The options `tools put` (a webhook or built-in tool) and `tools mcp add` (each of
# the server's tools) share.
_TIMEOUT = field_option(
    ToolSpec, "timeout_s", "--timeout", "timeout_s", help="seconds one call may take"
)


def _requires_approval(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--requires-approval/--no-requires-approval", default=False, show_default=True, help=help
    )


@click.group("tools")
def group() -> None:
    """Manage a tenant's tools and the hosts `http_request` may reach."""


# --- list ------------------------------------------------------------------------


def _entry(spec: ToolSpec, configured: bool) -> dict[str, Any]:
    return {
        **spec.model_dump(mode="json"),
        "builtin": spec.kind == "builtin",
        "configured": configured,
    }


def tool_entries(specs: list[ToolSpec]) -> list[dict[str, Any]]:
    """Every built-in tool (with the tenant's settings when it has them), then its
    webhooks and its MCP servers' tools."""
    from konstruct.agents.tools import BUILTIN_TOOLS

    rows = {spec.name: spec for spec in specs}
    entries = []
    for name in BUILTIN_NAMES:
        builtin = BUILTIN_TOOLS.get(name, {})
        row = rows.get(name)
        spec = ToolSpec(
            name=name,
            kind="builtin",
            description=builtin.get("description", ""),
            parameters=builtin.get("parameters", {"type": "object", "properties": {}}),
            requires_approval=row.requires_approval if row else False,
            timeout_s=row.timeout_s if row else _default("timeout_s"),
            approval_timeout_s=row.approval_timeout_s if row else _default("approval_timeout_s"),
        )
        entries.append(_entry(spec, row is not None))
    entries += [_entry(spec, True) for spec in specs if spec.kind in ("webhook", "mcp")]
    return entries


def _kind(entry: dict[str, Any]) -> str:
    if entry["builtin"]:
        return "built-in"
    return f"mcp ({entry['mcp_server']})" if entry["kind"] == "mcp" else "webhook"


def _secret(entry: dict[str, Any]) -> str | None:
    """The header a webhook's secret goes in and the variable it is read from (never the value)."""
    if not entry["secret_header"]:
        return None
    return f"{entry['secret_header']} from ${entry['secret_env']}"


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no tools",
    ["name", "kind", "approval", "timeout", "approval timeout", "secret", "url"],
    lambda t: (
        t["name"],
        _kind(t),
        "required" if t["requires_approval"] else "no",
        f"{t['timeout_s']:g}s",
        f"{t['approval_timeout_s']:g}s" if t["requires_approval"] else None,
        _secret(t),
        t["url"],
    ),
)
def list_(tenant: str) -> Query:
    """The built-in tools, the tenant's webhooks and MCP tools (secrets by variable name only)."""
    from konstruct.agents.store.tools import list_tools

    async def query(conn: asyncpg.Connection) -> list[Any]:
        return tool_entries(await list_tools(conn, tenant))

    return query


# --- put -------------------------------------------------------------------------


def parse_parameters(value: str) -> dict[str, Any]:
    """--parameters: a JSON schema given inline, or as @FILE."""
    where = "--parameters"
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        where = f"--parameters {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInput(
                f"tools put: {where}: cannot read it ({exc.strerror or exc})", ["--parameters"]
            ) from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"tools put: {where}: not valid JSON: {exc.msg} at line {exc.lineno}"
            f" column {exc.colno} (char {exc.pos})",
            ["--parameters"],
        ) from None
    if not isinstance(schema, dict):
        raise InvalidInput(
            f'tools put: {where}: must be a JSON schema with "type": "object"', ["--parameters"]
        )
    return schema


def _invalid(error: ValidationError) -> InvalidInput:
    """A ToolSpec error as the options of `tools put` name it."""
    problems = []
    for field, text in field_problems(error):
        top = field.split(".", 1)[0]
        problems.append((OPTION_OF.get(top, field), text.removeprefix("Value error, ")))
    return InvalidInput(
        "tools put: " + "; ".join(f"{option}: {text}" for option, text in problems),
        [option for option, _ in problems],
    )


def build_spec(name: str, **given: Any) -> ToolSpec:
    """The ToolSpec `tools put` stores; InvalidInput naming the option otherwise."""
    builtin = name in BUILTIN_NAMES
    if builtin:
        extra = [OPTION_OF[f] for f in WEBHOOK_ONLY if given.get(f) is not None]
        if extra:
            raise InvalidInput(
                f"tools put: {name!r} is a built-in tool: only --requires-approval, --timeout"
                f" and --approval-timeout apply to it (not {', '.join(extra)})",
                extra,
            )
    else:
        if not given.get("url"):
            raise InvalidInput(
                f"tools put: --url is required: {name!r} is not a built-in tool"
                f" ({', '.join(BUILTIN_NAMES)}), so it is a webhook",
                ["--url"],
            )
        if (given.get("secret_header") is None) != (given.get("secret_env") is None):
            raise InvalidInput(
                "tools put: --secret-header and --secret-env go together (the header the"
                " secret is sent in, and the worker's environment variable holding it)",
                ["--secret-header", "--secret-env"],
            )
    fields = {k: v for k, v in given.items() if v is not None}
    if "parameters" in fields:
        fields["parameters"] = parse_parameters(fields["parameters"])
    try:
        spec = ToolSpec(name=name, kind="builtin" if builtin else "webhook", **fields)
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        return spec.check_kind()
    except ValueError as exc:
        raise InvalidInput(f"tools put: {exc}") from None


@group.command("put")
@tenant_argument
@click.argument("name")
@click.option("--description", help="what the tool does, as the model reads it (webhook)")
@click.option(
    "--parameters",
    metavar="JSON|@FILE",
    help='the arguments\' JSON schema, "type": "object" (webhook; default: no arguments)',
)
@click.option("--url", help="the http:// or https:// URL the call is POSTed to (webhook)")
@click.option("--secret-header", metavar="HEADER", help="header carrying the secret (webhook)")
@click.option(
    "--secret-env",
    metavar="VAR",
    help="the worker's environment variable holding the secret; the value is never stored",
)
@_requires_approval("each call waits for `konstruct approvals approve`")
@_TIMEOUT
@field_option(
    ToolSpec,
    "approval_timeout_s",
    "--approval-timeout",
    "approval_timeout_s",
    help="seconds a call waits for a person before it counts as rejected",
)
@pass_state
def put(state: CliState, tenant: str, name: str, **given: Any) -> int:
    """Define a webhook tool, or set the tenant's settings for a built-in one.

    NAME a built-in tool's name (calculator, http_request, knowledge_search) sets
    only its approval and timeouts; any other NAME is a webhook and needs --url.
    A put replaces the whole tool: an option left out takes its default.
    """
    from konstruct.agents.store.tools import put_tool

    spec = build_spec(name, **given)
    refused = spec.url and state.settings.tools.address_policy().refused_literal(spec.url)
    if refused:
        raise InvalidInput(f"tools put: --url: {refused}", ["--url"])
    in_tenant(state.settings, tenant, lambda conn: put_tool(conn, tenant, spec))
    what = "settings of built-in tool" if spec.kind == "builtin" else "webhook tool"
    approval = ", requires approval" if spec.requires_approval else ""
    print(f"{what} {tenant}/{name} saved{approval}")
    return 0


# --- delete ----------------------------------------------------------------------


@group.command("delete")
@tenant_and_argument("name")
def delete(state: CliState, tenant: str, name: str) -> int:
    """Delete a webhook tool, or a built-in tool's settings (back to the defaults)."""
    from konstruct.agents.store.agents import list_agents
    from konstruct.agents.store.tools import delete_tool

    async def work(conn: asyncpg.Connection) -> tuple[bool, list[str]]:
        existed = await delete_tool(conn, tenant, name)
        users = [a.agent_id for a in await list_agents(conn, tenant) if name in a.tools]
        return existed, users

    existed, users = in_tenant(state.settings, tenant, work)
    builtin = name in BUILTIN_NAMES
    if not existed:
        what = f"no settings for built-in tool {name!r}" if builtin else f"no tool {name!r}"
        print(
            f"error: tenant {tenant!r} has {what}; see `konstruct tools list {tenant}`",
            file=sys.stderr,
        )
        return 1
    if builtin:
        print(f"settings of built-in tool {tenant}/{name} deleted (back to the defaults)")
        return 0
    print(f"tool {tenant}/{name} deleted")
    if users:
        print(
            f"note: agent(s) {', '.join(users)} still list {name!r} and will not be offered it;"
            f" `konstruct agents put {tenant} AGENT ... --tool ...` without it",
            file=sys.stderr,
        )
    return 0


# --- the http_request allow-list -------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_host(value: str) -> str:
    """An allow-list entry: a hostname or IP address, with an optional :port; lowercase.

    Raises ValueError saying what is wrong ("https://x" has a scheme, "x/y" a path).
    """
    entry = value.strip().lower()
    if "://" in entry:
        raise ValueError("give the host without a scheme (drop the '...://')")
    if any(c in entry for c in "/?#"):
        raise ValueError("give the host without a path")
    if "*" in entry:
        raise ValueError("no wildcards: list each host")
    if not entry or any(c.isspace() or c == "@" for c in entry):
        raise ValueError("not a hostname or IP address")
    port: str | None = None
    v6 = False
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address with a port is written [ADDRESS]:PORT")
        port = rest[1:] if rest else None
        v6 = True
    elif entry.count(":") > 1:
        host, v6 = entry, True
    elif ":" in entry:
        host, _, port = entry.partition(":")
    else:
        host = entry
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"the port must be a number from 1 to 65535, not {port!r}")
    if v6:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError("not an IPv6 address") from None
        return f"[{host}]:{port}" if port else host
    host = host.rstrip(".")
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError("not an IPv4 address") from None
    elif len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("not a hostname (letters, digits and '-' in dot-separated labels)")
    return f"{host}:{port}" if port else host


def _hosts(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    hosts = []
    for value in values:
        try:
            hosts.append(normalize_host(value))
        except ValueError as exc:
            raise click.BadParameter(
                f"{value!r} is not a host: {exc} (e.g. api.example.com or 127.0.0.1:8080)",
                param=param,
            ) from None
    return list(dict.fromkeys(hosts))


@group.command("allow")
@tenant_argument
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...", callback=_hosts)
@click.option("--remove", is_flag=True, help="take the hosts off the list instead")
@pass_state
def allow(state: CliState, tenant: str, hosts: list[str], remove: bool) -> int:
    """Let `http_request` reach HOST (any port) or HOST:PORT, or stop it with --remove."""
    from konstruct.agents.store.tools import allow_hosts, select_hosts

    async def work(conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
        if not remove:
            return await allow_hosts(conn, tenant, hosts, []), []
        before = await select_hosts(conn, tenant)
        return await allow_hosts(conn, tenant, [], hosts), [h for h in hosts if h not in before]

    after, absent = in_tenant(state.settings, tenant, work)
    if absent:
        print(f"note: not on the list: {', '.join(absent)}", file=sys.stderr)
    print(f"tenant {tenant!r} allows http_request to: {', '.join(after) or 'no host'}")
    return 0


@group.command("hosts")
@tenant_argument
@listing(
    "tenant {tenant!r} allows no hosts: http_request reaches nothing until"
    " `konstruct tools allow {tenant} HOST`",
    ["host"],
    lambda host: (host,),
)
def hosts(tenant: str) -> Query:
    """The hosts `http_request` may reach for the tenant."""
    from konstruct.agents.store.tools import select_hosts

    return lambda conn: select_hosts(conn, tenant)


# --- MCP servers ---------------------------------------------------------------------


@group.group("mcp")
def mcp_group() -> None:
    """A tenant's MCP servers (streamable HTTP): their tools become the tenant's."""


def _listed_specs(state: CliState, server: Any, requires_approval: bool) -> list[ToolSpec]:
    """The server's tools, listed now, as tool rows; a clear error when it cannot say."""
    import asyncio

    from konstruct.agents.tools.mcp_servers import server_specs
    from konstruct.platform.errors import ToolError

    policy = state.settings.tools.address_policy()
    try:
        return asyncio.run(server_specs(server, requires_approval, policy=policy))
    except ToolError as error:
        raise click.ClickException(error.message) from None


def _store_listed(state: CliState, tenant: str, name: str, specs: list[ToolSpec]) -> None:
    from konstruct.agents.store.tools import replace_mcp_tools

    async def work(conn: asyncpg.Connection) -> list[str]:
        return await replace_mcp_tools(conn, tenant, name, specs)

    try:
        dropped = in_tenant(state.settings, tenant, work)
    except ValueError as error:
        raise click.ClickException(f"tools mcp: {error}") from None
    listed = ", ".join(spec.name for spec in specs) or "no tools"
    print(f"MCP server {tenant}/{name}: {len(specs)} tools: {listed}")
    if dropped:
        print(f"no longer listed, removed: {', '.join(dropped)}")


@mcp_group.command("add")
@tenant_argument
@click.argument("name")
@click.option("--url", required=True, help="the server's streamable-HTTP endpoint (…/mcp)")
@click.option("--secret-header", metavar="HEADER", help="header carrying the secret")
@click.option(
    "--secret-env",
    metavar="VAR",
    help="environment variable holding the secret (the worker's, and this command's"
    " to list the tools); the value is never stored",
)
@_requires_approval("each call of its tools waits for `konstruct approvals approve`")
@_TIMEOUT
@pass_state
def mcp_add(
    state: CliState,
    tenant: str,
    name: str,
    url: str,
    secret_header: str | None,
    secret_env: str | None,
    requires_approval: bool,
    timeout_s: float | None,
) -> int:
    """Register an MCP server: list its tools now and store them as NAME__TOOL.

    An agent offers them with --tool NAME (all of them) or --tool NAME__TOOL.
    Adding a NAME again replaces it (a refresh with new settings).
    """
    from konstruct.agents.models import MCP_SERVER_NAME
    from konstruct.agents.tools.mcp_servers import McpServer

    if not re.match(MCP_SERVER_NAME, name):
        raise InvalidInput(
            f"tools mcp add: NAME {name!r} must be 1-24 letters, digits or '-' (its tools"
            " are NAME__TOOL)",
            ["NAME"],
        )
    try:
        ToolSpec(name="check", url=url, secret_header=secret_header, secret_env=secret_env)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if (secret_header is None) != (secret_env is None):
        raise InvalidInput(
            "tools mcp add: --secret-header and --secret-env go together",
            ["--secret-header", "--secret-env"],
        )
    refused = state.settings.tools.address_policy().refused_literal(url)
    if refused:
        raise InvalidInput(f"tools mcp add: --url: {refused}", ["--url"])
    server = McpServer(name, url, secret_header, secret_env, timeout_s or _default("timeout_s"))
    _store_listed(state, tenant, name, _listed_specs(state, server, requires_approval))
    return 0


def _stored_server(state: CliState, tenant: str, name: str) -> list[ToolSpec]:
    from konstruct.agents.store.tools import mcp_server_tools

    async def work(conn: asyncpg.Connection) -> list[ToolSpec]:
        return await mcp_server_tools(conn, tenant, name)

    specs = in_tenant(state.settings, tenant, work)
    if not specs:
        raise click.ClickException(
            f"tenant {tenant!r} has no MCP server {name!r} (with tools);"
            f" add it with `konstruct tools mcp add {tenant} {name} --url URL`"
        )
    return specs


@mcp_group.command("refresh")
@tenant_and_argument("name")
def mcp_refresh(state: CliState, tenant: str, name: str) -> int:
    """List the server's tools again: new ones are added, gone ones removed.

    Workers also list a server again on their own once its listing is older than
    `tools.mcp_refresh_seconds`, when an agent that offers its tools takes a step."""
    from konstruct.agents.tools.mcp_servers import server_of

    first = _stored_server(state, tenant, name)[0]
    _store_listed(
        state, tenant, name, _listed_specs(state, server_of(first), first.requires_approval)
    )
    return 0


@mcp_group.command("remove")
@tenant_and_argument("name")
def mcp_remove(state: CliState, tenant: str, name: str) -> int:
    """Remove the server and its tools (agents that list them are no longer offered them)."""
    from konstruct.agents.store.tools import delete_mcp_server

    _stored_server(state, tenant, name)

    async def work(conn: asyncpg.Connection) -> list[str]:
        return await delete_mcp_server(conn, tenant, name)

    removed = in_tenant(state.settings, tenant, work)
    print(f"MCP server {tenant}/{name} removed with its tools: {', '.join(removed)}")
    return 0
