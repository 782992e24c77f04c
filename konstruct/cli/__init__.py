"""The `konstruct` command line. Each module registers one group of subcommands."""

from __future__ import annotations

import argparse
import sys

from konstruct.cli import agents, demo, experiments, messages, registry, stack
from konstruct.errors import KonstructError

__all__ = ["main"]

COMMAND_GROUPS = [stack, agents, messages, experiments, demo, registry]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="konstruct", description="LLM agents and LLM evaluations on Temporal."
    )
    parser.add_argument("--config", help="config file (default: ./temporal-dev.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KonstructError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
