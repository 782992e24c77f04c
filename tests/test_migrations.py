"""The migrated schema's tenant isolation: every table that holds a tenant's rows is
under row-level security with the `tenant_isolation` policy, whichever migration
added it."""

from __future__ import annotations

import asyncpg

from konstruct.app.embedded_pg import EmbeddedPostgres
from konstruct.platform import db

# The policy's expression, as PostgreSQL prints it back from pg_policies.
SCOPED = "(tenant_id = current_setting('konstruct.tenant_id'::text, true))"
# Enabled but not forced: `konstruct_key_tenant` runs as the owner and finds a
# key's tenant across tenants.
NOT_FORCED = {"api_keys"}


def test_the_procedure_every_migration_calls_is_defined_first() -> None:
    names = [path.name for path in db.migration_files()]
    assert names[0] == "000_tenant_isolation.sql"
    callers = [
        path.name
        for path in db.migration_files()
        if "call konstruct_isolate_tenant(" in path.read_text()
    ]
    assert callers and "000_tenant_isolation.sql" not in callers


async def test_every_tenant_table_is_isolated_by_row_level_security(
    postgres: EmbeddedPostgres,
) -> None:
    conn = await asyncpg.connect(postgres.owner_url)
    try:
        tables = await conn.fetch(
            "select c.relname, c.relrowsecurity, c.relforcerowsecurity from pg_class c"
            " where c.relkind = 'r' and c.relnamespace = 'public'::regnamespace"
            " and exists (select 1 from pg_attribute a where a.attrelid = c.oid"
            "             and a.attname = 'tenant_id' and not a.attisdropped)"
            " order by 1"
        )
        rows = await conn.fetch(
            "select tablename, policyname, permissive, roles, cmd, qual, with_check"
            " from pg_policies where schemaname = 'public'"
        )
    finally:
        await conn.close()
    names = [t["relname"] for t in tables]
    policies = {r["tablename"]: r for r in rows}
    assert len(policies) == len(rows), "a table has more than one policy"
    # The tables of the foundation, experiments, demo, agents, knowledge and budgets.
    assert {"tenants", "experiments", "demo_sessions", "tools", "knowledge_chunks"} <= set(names)
    assert {"llm_cache", "experiment_retry_seconds", "api_keys"} <= set(names)
    for table in tables:
        name = table["relname"]
        assert table["relrowsecurity"], f"{name}: row-level security is not enabled"
        assert table["relforcerowsecurity"] == (name not in NOT_FORCED), name
        policy = policies.get(name)
        assert policy is not None, f"{name} has no policy"
        assert (policy["policyname"], policy["permissive"], policy["cmd"]) == (
            "tenant_isolation",
            "PERMISSIVE",
            "ALL",
        ), name
        assert list(policy["roles"]) == ["public"], name
        assert policy["qual"] == SCOPED and policy["with_check"] == SCOPED, name
    # No policy on a table without tenant rows (provider state is shared).
    assert set(policies) == set(names)
