"""A tenant's tools and the hosts its `http_request` tool may reach.

Each function takes a connection in a transaction the caller scoped to the tenant.
"""

from __future__ import annotations

import json

import asyncpg

from konstruct.agents.models import ToolSpec
from konstruct.platform.errors import UnknownTenant
from konstruct.platform.rows import from_row, row_count

_COLUMNS = (
    "name, kind, description, parameters, url, secret_header, secret_env, requires_approval,"
    " timeout_s, approval_timeout_s, mcp_server, remote_name"
)


async def _require_tenant(conn: asyncpg.Connection, tenant_id: str) -> None:
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise UnknownTenant(
            f"tenant {tenant_id!r} does not exist; create it with "
            f"`konstruct agents put {tenant_id} AGENT ...`"
        )


async def put_tool(conn: asyncpg.Connection, tenant_id: str, spec: ToolSpec) -> None:
    """Create or replace a tool (a webhook, or the tenant's settings for a built-in one)."""
    await _require_tenant(conn, tenant_id)
    await conn.execute(
        f"insert into tools (tenant_id, {_COLUMNS})"
        " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        " on conflict (tenant_id, name) do update set kind = excluded.kind,"
        " description = excluded.description, parameters = excluded.parameters,"
        " url = excluded.url, secret_header = excluded.secret_header,"
        " secret_env = excluded.secret_env, requires_approval = excluded.requires_approval,"
        " timeout_s = excluded.timeout_s, approval_timeout_s = excluded.approval_timeout_s,"
        " mcp_server = excluded.mcp_server, remote_name = excluded.remote_name,"
        " updated_at = now()",
        tenant_id,
        spec.name,
        spec.kind,
        spec.description,
        json.dumps(spec.parameters),
        spec.url,
        spec.secret_header,
        spec.secret_env,
        spec.requires_approval,
        spec.timeout_s,
        spec.approval_timeout_s,
        spec.mcp_server,
        spec.remote_name,
    )


async def select_tools(conn: asyncpg.Connection, tenant_id: str) -> dict[str, ToolSpec]:
    """The tenant's tool rows by name, in a transaction scoped to the tenant."""
    rows = await conn.fetch(
        f"select {_COLUMNS} from tools where tenant_id = $1 order by name", tenant_id
    )
    return {row["name"]: from_row(ToolSpec, row, docs=("parameters",)) for row in rows}


async def list_tools(conn: asyncpg.Connection, tenant_id: str) -> list[ToolSpec]:
    return list((await select_tools(conn, tenant_id)).values())


async def delete_tool(conn: asyncpg.Connection, tenant_id: str, name: str) -> bool:
    status = await conn.execute(
        "delete from tools where tenant_id = $1 and name = $2", tenant_id, name
    )
    return row_count(status) == 1


async def mcp_server_tools(conn: asyncpg.Connection, tenant_id: str, server: str) -> list[ToolSpec]:
    """The tools stored for the tenant's MCP server `server`, by name."""
    rows = await conn.fetch(
        f"select {_COLUMNS} from tools where tenant_id = $1 and mcp_server = $2 order by name",
        tenant_id,
        server,
    )
    return [from_row(ToolSpec, row, docs=("parameters",)) for row in rows]


async def stale_mcp_servers(
    conn: asyncpg.Connection, tenant_id: str, servers: list[str], older_than_s: float
) -> list[ToolSpec]:
    """Of the tenant's MCP `servers`, those whose stored listing is older than
    `older_than_s`: one tool row of each (it names the server and how to reach it)."""
    rows = await conn.fetch(
        f"select distinct on (mcp_server) {_COLUMNS} from tools"
        " where tenant_id = $1 and mcp_server = any($2::text[])"
        " and updated_at < now() - make_interval(secs => $3)"
        " order by mcp_server, name",
        tenant_id,
        servers,
        older_than_s,
    )
    return [from_row(ToolSpec, row, docs=("parameters",)) for row in rows]


async def touch_mcp_server(conn: asyncpg.Connection, tenant_id: str, server: str) -> None:
    """Count the server's listing as fresh (its refresh failed: the next try waits a
    whole refresh interval rather than holding up every step)."""
    await conn.execute(
        "update tools set updated_at = now() where tenant_id = $1 and mcp_server = $2",
        tenant_id,
        server,
    )


async def replace_mcp_tools(
    conn: asyncpg.Connection, tenant_id: str, server: str, specs: list[ToolSpec]
) -> list[str]:
    """Store `specs` as the server's tools, dropping those it no longer lists; the
    names dropped. Refuses a name another tool of the tenant already has."""
    await _require_tenant(conn, tenant_id)
    names = [spec.name for spec in specs]
    taken = await conn.fetch(
        "select name from tools where tenant_id = $1 and name = any($2::text[])"
        " and mcp_server is distinct from $3",
        tenant_id,
        names,
        server,
    )
    if taken:
        clash = ", ".join(row["name"] for row in taken)
        raise ValueError(f"the tenant already has a tool named {clash} that is not {server}'s")
    dropped = await conn.fetch(
        "delete from tools where tenant_id = $1 and mcp_server = $2"
        " and not (name = any($3::text[])) returning name",
        tenant_id,
        server,
        names,
    )
    for spec in specs:
        await put_tool(conn, tenant_id, spec)
    return sorted(row["name"] for row in dropped)


async def delete_mcp_server(conn: asyncpg.Connection, tenant_id: str, server: str) -> list[str]:
    """Delete the server's tools; their names."""
    rows = await conn.fetch(
        "delete from tools where tenant_id = $1 and mcp_server = $2 returning name",
        tenant_id,
        server,
    )
    return sorted(row["name"] for row in rows)


async def allow_hosts(
    conn: asyncpg.Connection, tenant_id: str, add: list[str], remove: list[str]
) -> list[str]:
    """Change the tenant's allow-list of `http_request` hosts; the list after it."""
    await _require_tenant(conn, tenant_id)
    for host in add:
        await conn.execute(
            "insert into tenant_http_hosts (tenant_id, host) values ($1, $2)"
            " on conflict do nothing",
            tenant_id,
            host.lower(),
        )
    if remove:
        await conn.execute(
            "delete from tenant_http_hosts where tenant_id = $1 and host = any($2::text[])",
            tenant_id,
            [h.lower() for h in remove],
        )
    return await select_hosts(conn, tenant_id)


async def select_hosts(conn: asyncpg.Connection, tenant_id: str) -> list[str]:
    rows = await conn.fetch(
        "select host from tenant_http_hosts where tenant_id = $1 order by host", tenant_id
    )
    return [row["host"] for row in rows]
