-- A tenant's MCP servers' tools (issue 23): one row per tool of a registered
-- streamable-HTTP MCP server, named SERVER__TOOL, listed when the server is added
-- or refreshed (`konstruct tools mcp add|refresh`), so an agent's step reads the
-- tools it offers from PostgreSQL and never waits on the server to list them.
-- `mcp_server` is the server's name, `remote_name` the tool's name on the server.
alter table tools drop constraint tools_kind_check;
alter table tools add constraint tools_kind_check check (kind in ('builtin', 'webhook', 'mcp'));
alter table tools add column mcp_server text;
alter table tools add column remote_name text;
alter table tools add constraint tools_mcp_check check (
    kind <> 'mcp' or (url is not null and mcp_server is not null and remote_name is not null)
);
create index tools_by_mcp_server on tools (tenant_id, mcp_server) where mcp_server is not null;
