"""The CLI starts at once: `--help`, `status` and every command's `--help` load no client library.

Each probe runs the CLI in a fresh interpreter and reads back which modules it
loaded, so the checks are by module name, not by time. The root group and
`experiments` list their commands from stored one-line help (`LazyGroup`);
the tests below check that each stored line is the command's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from konstruct.app.cli import cli, stack
from konstruct.app.cli.experiments import group as experiments
from konstruct.app.cli.lazy import LazyGroup
from tests.support import ROOT, konstruct

# What no `--help` and no `status` may load: each takes from 0.05 to 0.3 s to import.
CLIENT_LIBRARIES = (
    "temporalio",
    "asyncpg",
    "litellm",
    "pyarrow",
    "matplotlib",
    "openai",
    "workflows",
    "activities",
    "starlette",
    "uvicorn",
    "konstruct.providers.router",
)

# Runs `main` once per argument list given as JSON; prints the exit codes, the
# output and every module loaded by then.
_PROBE = """
import contextlib, io, json, sys
from konstruct.app.cli import main
runs = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        runs.append({"argv": argv, "code": main(argv), "output": out.getvalue()})
print(json.dumps({"runs": runs, "modules": sorted(sys.modules)}))
"""


def probe(
    *argvs: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> tuple[list[dict[str, object]], set[str]]:
    """Run the CLI on each argument list in one fresh interpreter: its runs and modules."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["runs"], set(result["modules"])


def loaded(modules: set[str], prefixes: tuple[str, ...] = CLIENT_LIBRARIES) -> list[str]:
    """The modules of `prefixes` among `modules` (a package and its submodules)."""
    return sorted(
        name for name in modules for p in prefixes if name == p or name.startswith(p + ".")
    )


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[list[str]]:
    """`command`'s path and those of all its subcommands (groups are walked)."""
    paths = [list(path)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            paths += command_paths(sub, (*path, name))
    return paths


def test_root_help_imports_no_command() -> None:
    [run], modules = probe(["--help"])
    assert run["code"] == 0
    for name in cli.lazy:
        assert f"  {name} " in str(run["output"]), name
    assert not loaded(modules), loaded(modules)
    commands = tuple(target.split(":")[0] for target, _ in cli.lazy.values())
    assert not loaded(modules, commands), "--help imported a command's module"


def test_status_loads_no_client_library(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONSTRUCT_")}
    env["KONSTRUCT_HOME"] = str(tmp_path / "state")
    [help_run, run], modules = probe(["status", "--help"], ["status"], cwd=tmp_path, env=env)
    assert help_run["code"] == 0
    assert run["code"] in (0, 3), run
    assert "stack " in str(run["output"]), run["output"]
    assert not loaded(modules), loaded(modules)


@pytest.mark.parametrize("name", sorted(cli.lazy))
def test_every_help_loads_no_client_library(name: str) -> None:
    """`konstruct NAME --help` and the `--help` of each of its subcommands, in one interpreter."""
    paths = [[name, *path, "--help"] for path in command_paths(cli.load(name))]
    runs, modules = probe(*paths)
    assert [run["code"] for run in runs] == [0] * len(paths), runs
    assert not loaded(modules), loaded(modules)


def test_experiments_start_help_loads_its_module_only() -> None:
    [run], modules = probe(["experiments", "start", "--help"])
    assert run["code"] == 0 and "--dataset" in str(run["output"])
    others = [f"konstruct.app.cli.{m}" for m in ("experiment_watch", "experiment_reports")]
    assert not loaded(modules, (*CLIENT_LIBRARIES, *others)), loaded(modules)


LAZY_GROUPS = {"konstruct": cli, "konstruct experiments": experiments}


@pytest.mark.parametrize(
    ("group", "name"),
    [(label, name) for label, group in LAZY_GROUPS.items() for name in sorted(group.lazy)],
)
def test_stored_help_is_the_commands_own(group: str, name: str) -> None:
    """The line `--help` lists for a command not yet loaded is what click makes of its help."""
    lazy = LAZY_GROUPS[group]
    assert isinstance(lazy, LazyGroup)
    command = lazy.load(name)
    stored = click.Command(name, help=lazy.lazy[name][1])
    assert command.name == name
    assert not command.hidden and not command.deprecated
    for limit in (20, 45, 60, 80, 10_000):
        assert stored.get_short_help_str(limit) == command.get_short_help_str(limit), limit


def test_root_lists_every_stack_command() -> None:
    in_stack = {
        name for name, (target, _) in cli.lazy.items() if target.startswith(stack.__name__ + ":")
    }
    assert in_stack == {command.name for command in stack.COMMANDS}


def test_temporal_error_is_one_line(environ: dict[str, str]) -> None:
    """An RPCError reaches `main` with temporalio loaded by the command: one line, exit 1."""
    done = konstruct(environ, "demo", "progress", "no-such-demo-run")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: Temporal answered NOT_FOUND"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_command_asked_for_its_stacks_writes_them_and_goes_on() -> None:
    # What a test sends a command that outlived its bound before killing it
    # (tests/test_stack.py's `run`): every thread's stack on stderr.
    script = (
        "import os, signal, sys\n"
        "from konstruct.app.cli import main\n"
        "main(['--help'])\n"
        "def waiting_here():\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    print('went on', flush=True)\n"
        "waiting_here()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "went on" in done.stdout
    assert "in waiting_here" in done.stderr, done.stderr
