"""A test that hangs fails, saying where it waits, and the suite goes on.

Every phase of a test (setup, call, teardown) still running after `hang_guard_s`
seconds (an ini option, 420 by default) is taken for hung: this plugin writes,
into that phase's captured stderr, every asyncio task of the test's event loop
with the chain of awaits it is suspended in (`Task.get_stack` shows only the
outermost frame) and every thread's stack, then cancels the tasks the test runs
(those awaiting through a frame of a file in the test's folder), so the phase
fails with that report and the next test runs.

A hang outside an event loop (a blocking call) cannot be cancelled: its stacks
are written and pytest-timeout (`timeout` in pyproject.toml, later) ends the
process. The limit is a hang's, not a deadline: the longest test takes ~80 s
on the 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import traceback
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

HANG_AFTER_S = 420.0  # the default of the ini option `hang_guard_s`


def await_chain(task: asyncio.Task[Any]) -> list[FrameType]:
    """The frames `task` is suspended in, outermost first, through every await."""
    frames: list[FrameType] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        for name in ("cr_frame", "gi_frame", "ag_frame"):
            frame = getattr(awaited, name, None)
            if frame is not None:
                frames.append(frame)
                break
        awaited = next(
            (
                getattr(awaited, name)
                for name in ("cr_await", "gi_yieldfrom", "ag_await")
                if getattr(awaited, name, None) is not None
            ),
            None,
        )
    return frames


def _format(frames: list[FrameType]) -> str:
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
    return "".join(summary.format())


def _running_loop(thread_id: int) -> asyncio.AbstractEventLoop | None:
    """The event loop running in thread `thread_id`, read off its stack."""
    frame: FrameType | None = sys._current_frames().get(thread_id)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, asyncio.AbstractEventLoop) and owner.is_running():
            return owner
        frame = frame.f_back
    return None


def _report_and_cancel(phase: str, folder: str) -> None:
    """In the event loop's thread: write every task's awaits, cancel the test's."""
    lines = [f"\n=== hang guard: {phase} still running ==="]
    hung: list[asyncio.Task[Any]] = []
    for task in asyncio.all_tasks():
        frames = await_chain(task)
        lines.append(f"--- {task.get_name()} awaits:\n{_format(frames)}")
        if any(f.f_code.co_filename.startswith(folder) for f in frames):
            hung.append(task)
    lines.append(_threads())
    print("\n".join(lines), file=sys.stderr, flush=True)
    for task in hung:
        task.cancel(f"hung: {phase} still running (its tasks' awaits are in its stderr)")


def _threads() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


def _on_hang(phase: str, folder: str, thread_id: int) -> None:
    loop = _running_loop(thread_id)
    if loop is None:
        print(
            f"\n=== hang guard: {phase} blocked, no event loop runs it ===\n{_threads()}",
            file=sys.stderr,
            flush=True,
        )
        return
    loop.call_soon_threadsafe(_report_and_cancel, phase, folder)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "hang_guard_s",
        "seconds after which a test's phase is taken for hung (tests/hang_guard.py)",
        default=str(HANG_AFTER_S),
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, f"{item.nodeid} (setup)"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, item.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item, f"{item.nodeid} (teardown)"))


def _guarded(item: pytest.Item, phase: str) -> Generator[None, Any, Any]:
    after_s = float(item.config.getini("hang_guard_s"))
    phase = f"{phase} after {after_s:g} s"
    folder = str(Path(item.path).resolve().parent) + os.sep
    timer = threading.Timer(after_s, _on_hang, (phase, folder, threading.get_ident()))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
