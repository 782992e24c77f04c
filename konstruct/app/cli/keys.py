"""`konstruct keys create | list | limit | revoke`: a tenant's API keys for the HTTP gateway."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click

from konstruct.app.cli.common import (
    CliState,
    Query,
    in_tenant,
    json_option,
    listing,
    pass_state,
    tenant_and_argument,
    tenant_argument,
)


@click.group("keys")
def group() -> None:
    """Manage a tenant's API keys (for `konstruct gateway`)."""


_RPM = click.option(
    "--rpm", type=click.IntRange(min=1), help="requests per minute it may send (default: no limit)"
)
_TPM = click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="tokens per minute its answers may use (default: no limit)",
)


@group.command("create")
@tenant_argument
@click.option("--label", default="", help="what the key is for (shown by `keys list`)")
@_RPM
@_TPM
@json_option("print {key_id, tenant_id, key, label} as JSON")
@pass_state
def create(
    state: CliState, tenant: str, label: str, rpm: int | None, tpm: int | None, as_json: bool
) -> int:
    """Make a key for the tenant and print it (once: only its hash is stored)."""
    from konstruct.agents.store.key_limits import KeyLimits, set_limits
    from konstruct.agents.store.keys import create_key
    from konstruct.app.cli.output import print_json

    async def work(conn: Any) -> tuple[str, str]:
        key_id, key = await create_key(conn, tenant, label)
        await set_limits(conn, tenant, key_id, KeyLimits(rpm, tpm))
        return key_id, key

    key_id, key = in_tenant(state.settings, tenant, work)
    if as_json:
        print_json({"key_id": key_id, "tenant_id": tenant, "key": key, "label": label})
    else:
        print(key)
        print(
            f"key {key_id} for tenant {tenant!r}: it is not shown again; store it now"
            f" (revoke with `konstruct keys revoke {tenant} {key_id}`)",
            file=sys.stderr,
        )
    return 0


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


@group.command("list")
@tenant_argument
@listing(
    "tenant {tenant!r} has no API keys",
    ["key", "label", "rpm", "tpm", "created", "last used", "revoked"],
    lambda k: (
        k.key_id,
        k.label,
        k.rpm,
        k.tpm,
        _when(k.created_at),
        _when(k.last_used_at),
        _when(k.revoked_at),
    ),
)
def list_(tenant: str) -> Query:
    """List a tenant's keys (never the keys themselves)."""
    from konstruct.agents.store.keys import list_keys

    return lambda conn: list_keys(conn, tenant)


@group.command("limit")
@tenant_argument
@click.argument("key_id")
@_RPM
@_TPM
@pass_state
def limit(state: CliState, tenant: str, key_id: str, rpm: int | None, tpm: int | None) -> int:
    """Set a key's limits per minute (an option left out: no limit), enforced by every
    gateway; a key over one is answered 429 with Retry-After."""
    from konstruct.agents.store.key_limits import KeyLimits, set_limits

    limits = KeyLimits(rpm, tpm)
    if in_tenant(state.settings, tenant, lambda conn: set_limits(conn, tenant, key_id, limits)):
        said = ", ".join(f"{n} {k}" for k, n in (("rpm", rpm), ("tpm", tpm)) if n) or "no limit"
        print(f"key {key_id} of tenant {tenant!r}: {said}")
        return 0
    print(f"error: tenant {tenant!r} has no key {key_id!r}", file=sys.stderr)
    return 1


@group.command("revoke")
@tenant_and_argument("key_id")
def revoke(state: CliState, tenant: str, key_id: str) -> int:
    """Revoke a key: the gateway refuses it from the next request on."""
    from konstruct.agents.store.keys import revoke_key

    if in_tenant(state.settings, tenant, lambda conn: revoke_key(conn, tenant, key_id)):
        print(f"key {key_id} of tenant {tenant!r} revoked")
        return 0
    print(f"error: tenant {tenant!r} has no key {key_id!r} that is not revoked", file=sys.stderr)
    return 1
