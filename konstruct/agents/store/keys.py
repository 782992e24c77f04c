"""Per-tenant API keys of the HTTP gateway: only a SHA-256 of each key is stored.

A key is shown once, when it is made. The gateway learns a key's tenant through
the security-definer function `konstruct_key_tenant` (any connection will do);
everything else about keys takes a connection in a transaction the caller scoped
to the tenant.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import BaseModel

from konstruct.agents.store.key_limits import KeyLimits
from konstruct.platform.errors import UnknownTenant
from konstruct.platform.rows import fetch_all, row_count

KEY_PREFIX = "ksk_"
KEY_ID_PREFIX = "key_"


class ApiKey(BaseModel):
    """What is shown about a key: never the key, never its hash."""

    key_id: str
    tenant_id: str
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rpm: int | None = None
    tpm: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(conn: asyncpg.Connection, tenant_id: str, label: str = "") -> tuple[str, str]:
    """A new key for the tenant: (key_id, key). The key itself is not stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = KEY_ID_PREFIX + secrets.token_hex(4)
    if not await conn.fetchval("select 1 from tenants where tenant_id = $1", tenant_id):
        raise UnknownTenant(
            f"tenant {tenant_id!r} does not exist; create it with "
            f"`konstruct agents put {tenant_id} AGENT ...`"
        )
    await conn.execute(
        "insert into api_keys (key_id, tenant_id, key_hash, label) values ($1, $2, $3, $4)",
        key_id,
        tenant_id,
        hash_key(key),
        label,
    )
    return key_id, key


@dataclass(frozen=True)
class KeyOwner:
    """Whose a key is, its id, and its limits."""

    tenant_id: str
    key_id: str
    limits: KeyLimits


async def key_owner(conn: asyncpg.Connection, key: str) -> KeyOwner | None:
    """The owner of a key that exists and is not revoked, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    # One round trip: the function also stamps last_used_at (at most once a minute).
    row = await conn.fetchrow("select * from konstruct_key_tenant($1)", hash_key(key))
    if row is None:
        return None
    limits = KeyLimits(row["rpm"], row["tpm"])
    return KeyOwner(str(row["tenant_id"]), str(row["key_id"]), limits)


async def tenant_for_key(conn: asyncpg.Connection, key: str) -> tuple[str, str] | None:
    """(tenant_id, key_id) of a key that exists and is not revoked, else None."""
    owner = await key_owner(conn, key)
    return None if owner is None else (owner.tenant_id, owner.key_id)


async def list_keys(conn: asyncpg.Connection, tenant_id: str) -> list[ApiKey]:
    return await fetch_all(
        conn,
        ApiKey,
        "select key_id, tenant_id, label, created_at, last_used_at, revoked_at, rpm, tpm"
        " from api_keys where tenant_id = $1 order by created_at, key_id",
        tenant_id,
    )


async def revoke_key(conn: asyncpg.Connection, tenant_id: str, key_id: str) -> bool:
    """Revoke a key of the tenant; False when it has no such key not yet revoked."""
    status = await conn.execute(
        "update api_keys set revoked_at = now()"
        " where tenant_id = $1 and key_id = $2 and revoked_at is null",
        tenant_id,
        key_id,
    )
    return row_count(status) == 1
