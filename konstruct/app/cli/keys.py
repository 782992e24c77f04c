"""`konstruct keys create | list | revoke`: a tenant's API keys for the HTTP gateway."""

from __future__ import annotations

import sys
from datetime import datetime

import click

from konstruct.app.cli.common import (
    CliState,
    Query,
    in_tenant,
    json_option,
    listing,
    pass_state,
    tenant_argument,
)


@click.group("keys")
def group() -> None:
    """Manage a tenant's API keys (for `konstruct gateway`)."""


@group.command("create")
@tenant_argument
@click.option("--label", default="", help="what the key is for (shown by `keys list`)")
@json_option("print {key_id, tenant_id, key, label} as JSON")
@pass_state
def create(state: CliState, tenant: str, label: str, as_json: bool) -> int:
    """Make a key for the tenant and print it (once: only its hash is stored)."""
    from konstruct.agents.store.keys import create_key
    from konstruct.app.cli.output import print_json

    key_id, key = in_tenant(state.settings, tenant, lambda conn: create_key(conn, tenant, label))
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
    ["key", "label", "created", "last used", "revoked"],
    lambda k: (k.key_id, k.label, _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at)),
)
def list_(tenant: str) -> Query:
    """List a tenant's keys (never the keys themselves)."""
    from konstruct.agents.store.keys import list_keys

    return lambda conn: list_keys(conn, tenant)


@group.command("revoke")
@tenant_argument
@click.argument("key_id")
@pass_state
def revoke(state: CliState, tenant: str, key_id: str) -> int:
    """Revoke a key: the gateway refuses it from the next request on."""
    from konstruct.agents.store.keys import revoke_key

    if in_tenant(state.settings, tenant, lambda conn: revoke_key(conn, tenant, key_id)):
        print(f"key {key_id} of tenant {tenant!r} revoked")
        return 0
    print(f"error: tenant {tenant!r} has no key {key_id!r} that is not revoked", file=sys.stderr)
    return 1
