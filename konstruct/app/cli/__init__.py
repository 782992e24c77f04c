"""The `konstruct` command line (click + rich). Each module holds one group of commands.

`main` turns every expected failure into one line on stderr: a usage error
(exit 2, naming the argument), a KonstructError (exit 2), an answer from the
Temporal server (exit 1), Ctrl-C (exit 130). Output cut short by its reader
(`| head`) ends quietly.
"""

from __future__ import annotations

import os
import sys

import click
from temporalio.service import RPCError

from konstruct.app.cli import (
    agents,
    approvals,
    budgets,
    demo,
    experiments,
    keys,
    knowledge,
    messages,
    registry,
    stack,
    tools,
)
from konstruct.app.cli.common import CliState
from konstruct.platform.errors import KonstructError

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", metavar="FILE", help="config file (default: ./temporal-dev.yaml)")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """LLM agents and LLM evaluations on Temporal."""
    ctx.obj = CliState(config)


for command in (
    *stack.COMMANDS,
    agents.group,
    messages.send,
    experiments.group,
    demo.group,
    registry.group,
    knowledge.group,
    keys.group,
    tools.group,
    approvals.group,
    budgets.group,
):
    cli.add_command(command)


def _error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


def _quiet_stdout() -> None:
    """The reader went away: send whatever is still buffered nowhere.

    Without this the interpreter's last flush of stdout raises again at exit.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        code = cli.main(args=argv, prog_name="konstruct", standalone_mode=False)
        sys.stdout.flush()
        return int(code or 0)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return 2
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _error(exc.format_message() + hint)
        return 2
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except KonstructError as exc:
        _error(str(exc))
        return 2
    except RPCError as exc:
        _error(f"Temporal answered {exc.status.name}: {exc.message}")
        return 1
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except (click.Abort, KeyboardInterrupt):
        return 130


if __name__ == "__main__":
    sys.exit(main())
