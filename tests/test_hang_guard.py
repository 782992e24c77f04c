"""The hang guard (tests/hang_guard.py): a hung test fails saying where it waits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

HANGS = """
import asyncio


async def a_wait_that_never_ends():
    await asyncio.Event().wait()


async def test_hangs():
    await a_wait_that_never_ends()


def test_the_next_one_runs():
    pass
"""


def test_a_hung_test_fails_with_its_awaits_and_the_next_test_runs(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGS)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_test_loop_scope = session\n"
        "asyncio_default_fixture_loop_scope = session\nhang_guard_s = 1\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hang_guard", "-p", "no:cacheprovider"]
        + ["-p", "no:xdist", "-q", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "hang guard: test_hangs.py::test_hangs after 1 s still running" in out, out
    # The chain of awaits reaches the line that waits, inside the helper.
    assert "in a_wait_that_never_ends\n    await asyncio.Event().wait()" in out, out
