"""The README's shell blocks, run as written on a `konstruct up` stack from a fresh shell.

Each ```bash block of README.md runs in one `bash` (so an `export` reaches the
lines after it, as in a terminal), with no variable but `PATH` (the venv's
`bin` first, as `. .venv/bin/activate` leaves it), `VIRTUAL_ENV` and a `HOME`
of its own, in a copy of the project's files the commands name. A command
fails the test by exiting with another code than its comment states (`(exit
3)`; else 0), by printing a traceback, or by printing something that
contradicts the text beside it (`EXPECTED` below). A block is not run when the
line before its fence says why (`<!-- not run by tests/test_readme.py: … -->`);
the commands the test runs itself (install, start, this suite) are in `OWN`.

The stack uses the README's ports (7233, 8233, 8234, 8780, 8799, 55432): the
commands name them. Where they are taken by another stack the test is skipped,
saying so, except under CI, where nothing else may hold them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!--\s*not run by tests/test_readme\.py:\s*(.+?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
EXIT_CODE = re.compile(r"\(exit (\d+)\b")
PORTS = (7233, 8233, 8234, 8780, 8799, 55432)
BIN = Path(sys.executable).parent

# Commands this test runs itself: the install (done: this is its venv), the stack
# (started once, detached, before the blocks), and the suite (this run).
OWN = ("python3 -m venv", ".venv/bin/python -m pytest", "konstruct up")
# What the text beside a command says it prints: (part of the command, a
# fragment its output must hold).
EXPECTED = [
    ('"What is 12 * 7 + 3?"', "87"),
    ("temporal workflow execute --type HandleMessage", "Result"),
    ("konstruct approvals list demo", "refund"),
    ("curl -s http://127.0.0.1:8780/v1/chat/completions", '"chat.completion"'),
    ("konstruct experiments stop exp-1b", "stop "),
    ("--budget-usd 0.0005 --watch", "budget"),
    ("konstruct experiments compare exp-1 exp-2", "exact_match"),
    ("konstruct registry history demo-production", "promote champion"),
    ("--agent calc --dataset deploy/datasets/agent-calc.jsonl", "completed 3/3"),
    ("konstruct experiments show agent-2 two-turns", "4 model step(s), at most 2 wanted"),
    # Decoded through the codec endpoint: the reply in plain text.
    ("temporal workflow show --workflow-id msg-demo-m-1", "AI assistant"),
]
# What a reader waits for after a command sent to the background, as a shell
# condition: the next line reads what that command brings about.
AWAITS = [
    (
        "konstruct send demo shop",
        "konstruct approvals list demo --json | grep -q call_id",
    ),
]
# Files a command leaves behind, by the part of the command that makes them.
MAKES = [("konstruct experiments report exp-2 --out exp-2.html", "exp-2.html")]
# The project files the commands read, copied beside the config.
PROJECT_FILES = ("temporal-dev.yaml", "deploy", "docs/agents.md")


@dataclass
class Command:
    text: str
    line: int
    comment: str = ""

    @property
    def exit_code(self) -> int:
        found = EXIT_CODE.search(self.comment)
        return int(found.group(1)) if found else 0

    @property
    def background(self) -> bool:
        return self.text.endswith("&")


@dataclass
class Block:
    line: int
    commands: list[Command] = field(default_factory=list)
    not_run: str | None = None


def _split_comment(line: str) -> tuple[str, str]:
    """`command  # comment` → the two parts; a `#` inside quotes is not a comment."""
    quote: str | None = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened or opened.group(2) != "bash":
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.search(before)
        block = Block(line=i + 1, not_run=reason.group(1) if reason else None)
        i += 1
        pending = ""
        start = i + 1
        while i < len(lines) and not FENCE.match(lines[i]):
            raw = lines[i].strip()
            i += 1
            if not pending:
                start = i
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
                continue
            text, comment = _split_comment(pending + raw)
            pending = ""
            if text:
                block.commands.append(Command(text=text, line=start, comment=comment))
        i += 1
        blocks.append(block)
    return blocks


def _taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def fresh_shell_env(home: Path) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(BIN.parent),
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of the files the README's commands name, with a stack up in it."""
    taken = [p for p in PORTS if _taken(p)]
    if taken:
        message = f"the README's ports {taken} are taken by another stack"
        if os.environ.get("CI"):
            pytest.fail(message + " (under CI nothing else may hold them)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("readme")
    work = root / "project"
    work.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    env = fresh_shell_env(root / "home")
    (root / "home").mkdir()
    up = subprocess.run(
        ["konstruct", "up", "--detach"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield work, env
    finally:
        subprocess.run(["konstruct", "down"], cwd=work, env=env, timeout=120)


def _script(block: Block, scratch: Path) -> tuple[str, list[Command]]:
    """One bash script for the block; every command between markers, its exit code after."""
    lines = ["set +e"]
    run: list[Command] = []
    for n, command in enumerate(block.commands):
        if command.text.startswith(OWN):
            continue
        run.append(command)
        marker = f"@@README {n}@@"
        lines.append(f"printf '\\n{marker} start\\n'; printf '\\n{marker} start\\n' >&2")
        if command.background:
            out = scratch / f"background-{n}.out"
            lines.append(f"( {command.text[:-1].strip()} ) > {out} 2>&1 &")
            lines.append(f"echo $! > {out}.pid")
            lines.append("rc=0")
            for part, condition in AWAITS:
                if part in command.text:
                    lines.append(f"for _ in $(seq 900); do {condition} && break; sleep 0.2; done")
        else:
            lines.append(command.text)
            lines.append("rc=$?")
        lines.append(f"printf '\\n{marker} rc=%d\\n' $rc; printf '\\n{marker} end\\n' >&2")
    return "\n".join(lines) + "\n", run


def _part(output: str, n: int) -> str:
    found = re.search(rf"@@README {n}@@ start\n(.*?)\n@@README {n}@@ (?:rc=\d+|end)", output, re.S)
    return found.group(1) if found else ""


def _fill_placeholders(block: Block, project: Path, env: dict[str, str]) -> None:
    """`<message id>` / `<call id>`: what `konstruct approvals list` shows, as a reader
    would copy them (the test asks for JSON to read them without guessing columns)."""
    for command in block.commands:
        if "<message id>" not in command.text and "<call id>" not in command.text:
            continue
        listed = subprocess.run(
            ["konstruct", "approvals", "list", "demo", "--json"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        pending = json.loads(listed.stdout or "[]")
        assert pending, f"README line {command.line}: no pending approval to fill in"
        call = pending[0]
        command.text = command.text.replace("msg-demo-<message id>", call["workflow_id"]).replace(
            "<call id>", call["call_id"]
        )


BLOCKS = readme_blocks()


def test_the_readme_has_blocks_and_says_why_it_skips_one() -> None:
    assert len(BLOCKS) >= 8
    assert all(b.commands for b in BLOCKS)
    for block in BLOCKS:
        if block.not_run is not None:
            assert len(block.not_run) > 10, f"README line {block.line}: say why it is not run"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.not_run is None], ids=lambda b: f"line{b.line}"
)
def test_a_readme_block_runs_as_written(
    block: Block, project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    work, env = project
    if any("<call id>" in c.text for c in block.commands):
        _run_in_two_steps(block, work, env, tmp_path)
        return
    _run(block, block.commands, work, env, tmp_path)


def _run_in_two_steps(block: Block, work: Path, env: dict[str, str], scratch: Path) -> None:
    """Up to the line with placeholders, then the rest once the pending call shows."""
    at = next(i for i, c in enumerate(block.commands) if "<call id>" in c.text)
    first = Block(line=block.line, commands=block.commands[:at])
    _run(block, first.commands, work, env, scratch)
    rest = Block(line=block.line, commands=block.commands[at:])
    _fill_placeholders(rest, work, env)
    _run(block, rest.commands, work, env, scratch)
    for pid_file in scratch.glob("background-*.out.pid"):
        pid = int(pid_file.read_text())
        _wait_for_exit(pid)
        out = Path(str(pid_file)[: -len(".pid")]).read_text()
        assert "Traceback" not in out, out


def _wait_for_exit(pid: int, timeout: float = 180) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass


def _run(
    block: Block, commands: list[Command], work: Path, env: dict[str, str], scratch: Path
) -> None:
    script, run = _script(Block(line=block.line, commands=commands), scratch)
    done = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    for n, command in enumerate(commands):
        if command not in run:
            continue
        out, err = _part(done.stdout, n), _part(done.stderr, n)
        where = f"README line {command.line}: {command.text}\n--- stdout\n{out}\n--- stderr\n{err}"
        code = re.search(rf"@@README {n}@@ rc=(\d+)", done.stdout)
        assert code is not None, where + "\n(the block stopped before this command)"
        assert int(code.group(1)) == command.exit_code, where
        assert "Traceback" not in out + err, where
        for part, fragment in EXPECTED:
            if part in command.text:
                assert fragment in out, f"{where}\n(expected {fragment!r})"
        for part, made in MAKES:
            if part in command.text:
                assert (work / made).is_file(), where
