"""The `konstruct` command line (click + rich). Each module holds one group of commands.

The root group imports a command's module only when that command is called
(`LazyGroup`): `konstruct --help` and `konstruct status` start without loading
temporalio, asyncpg or litellm, which a command imports where it uses them.

`main` turns every expected failure into one line on stderr: a usage error
(exit 2, naming the argument), a KonstructError (exit 2), an answer from the
Temporal server (exit 1), Ctrl-C (exit 130). Output cut short by its reader
(`| head`) ends quietly.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TypeGuard

import click

from konstruct.app.cli.common import CliState
from konstruct.app.cli.lazy import LazyGroup
from konstruct.platform.errors import KonstructError

if TYPE_CHECKING:
    from temporalio.service import RPCError

__all__ = ["main"]

_STACK = "konstruct.app.cli.stack"
# name -> ("module:command", the command's one-line help for `konstruct --help`);
# tests/test_cli_startup.py checks each line against the command's own help.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": (
        f"{_STACK}:up",
        "Start the whole dev stack (foreground; Ctrl-C or `konstruct down` stops).",
    ),
    "down": (f"{_STACK}:down", "Stop the running stack, detached or in the foreground."),
    "status": (f"{_STACK}:status", "What of the stack is running (exit 3 when it is not)."),
    "worker": (
        f"{_STACK}:worker",
        "Run one worker against the configured Temporal and PostgreSQL.",
    ),
    "migrate": (f"{_STACK}:migrate", "Apply database migrations and create the app role."),
    "codec-server": (
        f"{_STACK}:codec_server",
        "Decode (and encode) payloads for the Web UI and `temporal --codec-endpoint`.",
    ),
    "gateway": (
        f"{_STACK}:gateway",
        "Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models);"
        " hosts a worker for the task queue.",
    ),
    "agents": ("konstruct.app.cli.agents:group", "Manage a tenant's agents."),
    "send": (
        "konstruct.app.cli.messages:send",
        "Send a message to an agent and print the reply.",
    ),
    "experiments": ("konstruct.app.cli.experiments:group", "Run and inspect experiments."),
    "demo": ("konstruct.app.cli.demo:group", "The forecasting registry showcase (DemoCascade)."),
    "registry": ("konstruct.app.cli.registry:group", "Model registry: runs, aliases, history."),
    "knowledge": (
        "konstruct.app.cli.knowledge:group",
        "A tenant's knowledge base: documents its agents can search.",
    ),
    "keys": (
        "konstruct.app.cli.keys:group",
        "Manage a tenant's API keys (for `konstruct gateway`).",
    ),
    "tools": (
        "konstruct.app.cli.tools:group",
        "Manage a tenant's tools and the hosts `http_request` may reach.",
    ),
    "approvals": (
        "konstruct.app.cli.approvals:group",
        "Tool calls waiting for a person: list, approve or reject them.",
    ),
    "budgets": (
        "konstruct.app.cli.budgets:group",
        "A tenant's monthly budget (US dollars) over its experiments' calls.",
    ),
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    metavar="FILE",
    help="config file (default: the nearest temporal-dev.yaml here or above)",
)
@click.option(
    "--state-dir",
    metavar="DIR",
    help="the stack's state directory (default: KONSTRUCT_HOME, else the config's, else"
    " the running stack's, else ~/.local/state/konstruct)",
)
@click.pass_context
def cli(ctx: click.Context, config: str | None, state_dir: str | None) -> None:
    """LLM agents and LLM evaluations on Temporal."""
    ctx.obj = CliState(config, state_dir)


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


def _stacks_on_request() -> None:
    """`kill -USR1 <pid>` writes every thread's Python stack to stderr, and the
    command goes on: what a command that does not end waits for (the tests send
    it to a command that outlived its bound before they kill it)."""
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (ValueError, OSError):
        pass  # stderr is no file: `main` called in-process, its output captured


def main(argv: list[str] | None = None) -> int:
    _stacks_on_request()
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
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except (click.Abort, KeyboardInterrupt):
        return 130
    except Exception as exc:
        if _is_rpc_error(exc):
            _error(f"Temporal answered {exc.status.name}: {exc.message}")
            return 1
        raise


def _is_rpc_error(exc: Exception) -> TypeGuard[RPCError]:
    """Whether `exc` is temporalio's RPCError; never imports temporalio to find out
    (a command that talked to Temporal has loaded it)."""
    service = sys.modules.get("temporalio.service")
    return service is not None and isinstance(exc, service.RPCError)


if __name__ == "__main__":
    sys.exit(main())
