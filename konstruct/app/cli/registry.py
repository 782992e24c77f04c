"""`konstruct registry runs | aliases | history ALIAS`: what the model registry holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from konstruct.app.cli.common import Query, listing, tenant_option

if TYPE_CHECKING:
    from konstruct.registry.models import AliasMove, RegistryAlias, RegistryRun


@click.group("registry")
def group() -> None:
    """Model registry: runs, aliases, history."""


def _short(value: Any) -> str:
    return "-" if value is None else str(value)[:8]


def _run_row(r: RegistryRun) -> tuple[Any, ...]:
    wape = r.metrics.get("wape")
    return (
        r.run_id,
        r.kind,
        r.owner,
        r.name,
        "" if wape is None else f"{wape:.4f}",
        r.artifact_uri,
    )


def _alias_row(a: RegistryAlias) -> tuple[Any, ...]:
    return (a.alias, f"v{a.version}", a.run_id or "(nothing)", a.run_name, a.run_owner)


def _move_row(m: AliasMove) -> tuple[Any, ...]:
    when = m.moved_at.isoformat(timespec="seconds") if m.moved_at else "?"
    return (
        m.id,
        when,
        _short(m.from_run_id),
        _short(m.to_run_id),
        m.workflow_id,
        m.workflow_run_id,
        m.reason,
    )


@group.command("runs")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True)
@tenant_option
@listing(
    "tenant {tenant!r} has no registered runs",
    ["run", "kind", "owner", "name", "wape", "artifact"],
    _run_row,
)
def runs(limit: int, tenant: str) -> Query:
    """Registered runs, newest first."""
    from konstruct.registry.store import list_runs

    return lambda conn: list_runs(conn, tenant, limit)


@group.command("aliases")
@tenant_option
@listing(
    "tenant {tenant!r} has no aliases",
    ["alias", "version", "run", "run name", "run owner"],
    _alias_row,
)
def aliases(tenant: str) -> Query:
    """Aliases and the run each points at."""
    from konstruct.registry.store import list_aliases

    return lambda conn: list_aliases(conn, tenant)


@group.command("history")
@click.argument("alias")
@tenant_option
@listing(
    "alias {alias!r} of tenant {tenant!r} has never moved",
    ["#", "moved at", "from", "to", "by workflow", "run", "reason"],
    _move_row,
)
def history(alias: str, tenant: str) -> Query:
    """Every move of one alias, oldest first."""
    from konstruct.registry.store import alias_history

    return lambda conn: alias_history(conn, tenant, alias)
