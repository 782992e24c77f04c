"""PostgreSQL access: pools, the tenant-transaction helper and migrations.

Tenant data is only touched inside `tenant_transaction`, which sets
`konstruct.tenant_id` for that transaction alone (`set_config(..., true)`), so a
pooled connection never carries one tenant's scope into another's work.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from konstruct.platform.errors import ConfigError
from konstruct.platform.settings import DatabaseSettings as Settings
from konstruct.platform.settings import deploy_dir

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same for every migrator.
_MIGRATION_LOCK_KEY = 0x6B6F6E73
# A header line of a migration that needs an extension the server may not have:
# `-- requires-extension: NAME [(PACKAGE)] [for FEATURE]`.
_REQUIRES_EXTENSION = re.compile(
    r"^--\s*requires-extension:\s*(?P<name>[A-Za-z0-9_-]+)"
    r"(?:\s*\((?P<package>[^)]*)\))?(?:\s+for\s+(?P<feature>.+?))?\s*$"
)

log = logging.getLogger("konstruct.platform.db")


def embedded_owner_url(settings: Settings) -> str:
    return f"postgresql://postgres@127.0.0.1:{settings.postgres.port}/{settings.postgres.database}"


def owner_url(settings: Settings) -> str:
    return settings.postgres.url or embedded_owner_url(settings)


def app_url(settings: Settings) -> str:
    """The URL of the non-superuser application role."""
    if settings.postgres.app_url:
        return settings.postgres.app_url
    parts = urlsplit(owner_url(settings))
    if not parts.hostname:
        raise ConfigError("postgres.url (KONSTRUCT_DATABASE_URL) must name a host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = f":{parts.port}" if parts.port else ""
    password, _ = settings.app_db_password()
    credentials = f"{quote(settings.postgres.app_role)}:{quote(password)}"
    return urlunsplit((parts.scheme, f"{credentials}@{host}{port}", parts.path, parts.query, ""))


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 20, wait_s: float = 0.0
) -> asyncpg.Pool:
    """A connection pool; a server that refuses connections or is still starting up
    is waited for, up to `wait_s` (a worker started while PostgreSQL restarts)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        assert pool is not None
        return pool


@asynccontextmanager
async def tenant_transaction(
    pool: asyncpg.Pool, tenant_id: str
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction whose row-level-security scope is `tenant_id`, and only it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select set_config('konstruct.tenant_id', $1, true)", tenant_id)
        yield conn


def migrations_dir() -> Path:
    """The migrations this install ships (`deploy/migrations`)."""
    return deploy_dir() / "migrations"


def migration_files(directory: Path | None = None) -> list[Path]:
    """The migrations in `directory` (default `migrations_dir()`), in order. A folder that
    is missing or holds none is an error naming it: migrating nothing is never silent."""
    directory = migrations_dir() if directory is None else directory
    if not directory.is_dir():
        raise ConfigError(f"the migrations folder {directory} does not exist")
    files = sorted(p for p in directory.glob("*.sql") if _MIGRATION_NAME.match(p.name))
    if not files:
        raise ConfigError(
            f"the migrations folder {directory} holds no migration (NNN_name.sql files)"
        )
    versions = [p.name[:3] for p in files]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a number in {directory}: {versions}")
    return files


def required_extensions(path: Path) -> list[tuple[str, str | None, str | None]]:
    """(extension, package, feature) of each `-- requires-extension:` line of the
    migration's header (its leading comment lines)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith("--"):
            break
        match = _REQUIRES_EXTENSION.match(line)
        if match:
            found.append((match["name"], match["package"], match["feature"]))
    return found


def skipped_migration_message(
    migration: str, extension: str, package: str | None = None, feature: str | None = None
) -> str:
    known_as = f" ({package})" if package else ""
    return (
        f"migration {migration} skipped: this PostgreSQL server has no {extension!r}"
        f" extension{known_as}; {feature or 'what it adds'} is unavailable until it is"
        " installed and `konstruct migrate` runs again"
    )


async def migrate(
    owner: str,
    *,
    app_role: str,
    app_password: str,
    directory: Path | None = None,
    skipped: list[str] | None = None,
) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; grant the app role.

    A migration whose header requires an extension the server does not have is
    not applied (nor recorded: the next run tries it again); the other ones
    are. One sentence per such migration goes to `skipped` when given (the
    caller reports it), else to the log as a warning. Returns the files applied.
    """
    files = migration_files(directory)  # before connecting: a missing folder is named first
    conn = await asyncpg.connect(owner)
    applied_now: list[str] = []
    try:
        await conn.execute("select pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version text primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
        for path in files:
            version = path.name[:3]
            if version in done:
                continue
            missing = await _missing_extension(conn, path)
            if missing is not None:
                if skipped is None:
                    log.warning("%s", missing)
                else:
                    log.info("%s", missing)
                    skipped.append(missing)
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "insert into schema_migrations (version, name) values ($1, $2)",
                    version,
                    path.name,
                )
            applied_now.append(path.name)
        await _ensure_app_role(conn, app_role, app_password)
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
        await conn.close()
    return applied_now


async def _missing_extension(conn: asyncpg.Connection, path: Path) -> str | None:
    """Why `path` cannot be applied on this server, or None when it can."""
    for name, package, feature in required_extensions(path):
        available = await conn.fetchval(
            "select 1 from pg_available_extensions where name = $1", name
        )
        if not available:
            return skipped_migration_message(path.name, name, package, feature)
    return None


async def role_exists(owner: str, role: str) -> bool:
    """Whether the server already has `role` (before `migrate` creates or updates it)."""
    conn = await asyncpg.connect(owner)
    try:
        return bool(await conn.fetchval("select 1 from pg_roles where rolname = $1", role))
    finally:
        await conn.close()


async def _ensure_app_role(conn: asyncpg.Connection, role: str, password: str) -> None:
    exists = await conn.fetchval("select 1 from pg_roles where rolname = $1", role)
    ident = '"' + role.replace('"', '""') + '"'
    literal = "'" + password.replace("'", "''") + "'"
    verb = "alter" if exists else "create"
    # NOBYPASSRLS and NOSUPERUSER are what make the policies bind this role.
    await conn.execute(f"{verb} role {ident} login nosuperuser nobypassrls password {literal}")
    await conn.execute(f"grant usage on schema public to {ident}")
    await conn.execute(
        f"grant select, insert, update, delete on all tables in schema public to {ident}"
    )
    await conn.execute(f"grant usage, select on all sequences in schema public to {ident}")
    # The migrations table is the owner's business.
    await conn.execute(f"revoke all on schema_migrations from {ident}")


async def seed_demo(owner: str) -> None:
    """Tenant `demo` with agent `assistant`; running it again changes nothing."""
    conn = await asyncpg.connect(owner)
    try:
        async with conn.transaction():
            await conn.execute("select set_config('konstruct.tenant_id', 'demo', true)")
            await conn.execute(
                "insert into tenants (tenant_id, name) values ('demo', 'Demo tenant')"
                " on conflict do nothing"
            )
            await conn.execute(
                "insert into agents (tenant_id, agent_id, name, role, persona, system_prompt,"
                " model_group) values ('demo', 'assistant', 'Kay', 'a helpful assistant',"
                " 'Friendly, concise and precise.',"
                " 'You help people with questions about Konstruct and anything else.', 'fast')"
                " on conflict do nothing"
            )
    finally:
        await conn.close()
