"""`konstruct registry runs | aliases | history ALIAS`: what the model registry holds."""

from __future__ import annotations

from typing import Any

import click

from konstruct.cli.common import (
    CliState,
    json_option,
    pass_state,
    print_json,
    print_table,
    tenant_option,
    with_pool,
)
from konstruct.store.registry import alias_history, list_aliases, list_runs


@click.group("registry")
def group() -> None:
    """Model registry: runs, aliases, history."""


def _short(value: Any) -> str:
    return "-" if value is None else str(value)[:8]


@group.command("runs")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True)
@tenant_option
@json_option()
@pass_state
def runs(state: CliState, limit: int, tenant: str, as_json: bool) -> int:
    """Registered runs, newest first."""
    found = with_pool(state.settings, lambda pool: list_runs(pool, tenant, limit))
    if as_json:
        print_json(found)
    elif not found:
        print(f"tenant {tenant!r} has no registered runs")
    else:
        print_table(
            ["run", "kind", "owner", "name", "wape", "artifact"],
            [
                (
                    r.run_id,
                    r.kind,
                    r.owner,
                    r.name,
                    f"{r.metrics['wape']:.4f}" if r.metrics.get("wape") is not None else "",
                    r.artifact_uri or "",
                )
                for r in found
            ],
        )
    return 0


@group.command("aliases")
@tenant_option
@json_option()
@pass_state
def aliases(state: CliState, tenant: str, as_json: bool) -> int:
    """Aliases and the run each points at."""
    found = with_pool(state.settings, lambda pool: list_aliases(pool, tenant))
    if as_json:
        print_json(found)
    elif not found:
        print(f"tenant {tenant!r} has no aliases")
    else:
        print_table(
            ["alias", "version", "run", "run name", "run owner"],
            [
                (a.alias, f"v{a.version}", a.run_id or "(nothing)", a.run_name, a.run_owner)
                for a in found
            ],
        )
    return 0


@group.command("history")
@click.argument("alias")
@tenant_option
@json_option()
@pass_state
def history(state: CliState, alias: str, tenant: str, as_json: bool) -> int:
    """Every move of one alias, oldest first."""
    moves = with_pool(state.settings, lambda pool: alias_history(pool, tenant, alias))
    if as_json:
        print_json(moves)
    elif not moves:
        print(f"alias {alias!r} of tenant {tenant!r} has never moved")
    else:
        print_table(
            ["#", "moved at", "from", "to", "by workflow", "run", "reason"],
            [
                (
                    m.id,
                    m.moved_at.isoformat(timespec="seconds") if m.moved_at else "?",
                    _short(m.from_run_id),
                    _short(m.to_run_id),
                    m.workflow_id,
                    m.workflow_run_id or "-",
                    m.reason,
                )
                for m in moves
            ],
        )
    return 0
