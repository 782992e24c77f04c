"""`konstruct registry runs | aliases | history ALIAS`: what the model registry holds."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from konstruct import db
from konstruct.cli.common import print_json, run_async, settings_of
from konstruct.store.registry import alias_history, list_aliases, list_runs

T = TypeVar("T")


def register(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser("registry", help="model registry: runs, aliases, history")
    sub = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    runs = sub.add_parser("runs", help="registered runs, newest first")
    runs.add_argument("--limit", type=int, default=200)
    aliases = sub.add_parser("aliases", help="aliases and the run each points at")
    history = sub.add_parser("history", help="every move of one alias, oldest first")
    history.add_argument("alias")
    for parser in (runs, aliases, history):
        parser.add_argument("--tenant", default="demo", help="tenant (default: demo)")
        parser.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(handler=cmd_runs)
    aliases.set_defaults(handler=cmd_aliases)
    history.set_defaults(handler=cmd_history)


def _query(args: argparse.Namespace, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    async def run() -> T:
        settings = settings_of(args)
        pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=2)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return run_async(run())


def _short(value: Any) -> str:
    return "-" if value is None else str(value)[:8]


def cmd_runs(args: argparse.Namespace) -> int:
    runs = _query(args, lambda pool: list_runs(pool, args.tenant, args.limit))
    if args.json:
        print_json(runs)
        return 0
    if not runs:
        print(f"tenant {args.tenant!r} has no registered runs")
    for r in runs:
        wape = r.metrics.get("wape")
        metric = f"wape {wape:.4f}" if wape is not None else ""
        print(
            f"{r.run_id}  {r.kind:<10} {r.owner:<5} {r.name:<28} {metric:<12}"
            f" {r.artifact_uri or ''}"
        )
    return 0


def cmd_aliases(args: argparse.Namespace) -> int:
    aliases = _query(args, lambda pool: list_aliases(pool, args.tenant))
    if args.json:
        print_json(aliases)
        return 0
    if not aliases:
        print(f"tenant {args.tenant!r} has no aliases")
    for a in aliases:
        target = f"{a.run_id} ({a.run_name}, {a.run_owner})" if a.run_id else "(nothing)"
        print(f"{a.alias:<24} v{a.version:<4} -> {target}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    moves = _query(args, lambda pool: alias_history(pool, args.tenant, args.alias))
    if args.json:
        print_json(moves)
        return 0
    if not moves:
        print(f"alias {args.alias!r} of tenant {args.tenant!r} has never moved")
    for m in moves:
        when = m.moved_at.isoformat(timespec="seconds") if m.moved_at else "?"
        print(
            f"#{m.id:<5} {when}  {_short(m.from_run_id)} -> {_short(m.to_run_id)}"
            f"  by {m.workflow_id} (run {m.workflow_run_id or '-'})  {m.reason}"
        )
    return 0
