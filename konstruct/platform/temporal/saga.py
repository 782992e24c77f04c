"""A saga's compensations, for workflows: push one before each change, unwind in reverse.

Deterministic (workflows import it). A compensation is pushed *before* its
change is made, so a change whose activity committed but never reported back
is still undone; a step that settles its change drops its entry by key. The
unwind runs every compensation to its end even while a cancel request is
pending, and one that fails is logged and reported, never raised: the error
the workflow fails with stays the original one (`failure_of`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError, is_cancelled_exception

from konstruct.platform.errors import innermost_application_error, workflow_failure

Undo = Callable[[], Awaitable[str]]
# Told of each compensation run: (step, action, passed, detail or error text).
Report = Callable[[str, str, bool, str], None]


@dataclass
class Compensation:
    step: str
    action: str
    # Identifies the entry, so a step that settles its change can drop it.
    key: str
    run: Undo


class Saga:
    def __init__(self, report: Report) -> None:
        self._stack: list[Compensation] = []
        self._report = report

    def push(self, step: str, action: str, key: str, run: Undo) -> None:
        self._stack.append(Compensation(step=step, action=action, key=key, run=run))

    def drop(self, key: str) -> None:
        self._stack = [c for c in self._stack if c.key != key]

    def clear(self) -> None:
        self._stack.clear()

    async def unwind(self) -> None:
        """Run the compensations pushed so far, last first."""
        while self._stack:
            entry = self._stack.pop()
            await self.compensate(entry.step, entry.action, entry.run)

    async def compensate(self, step: str, action: str, run: Undo) -> None:
        """Run one compensation to its end; a failure is logged and reported, not raised."""
        try:
            detail = await _shielded(run)
        except Exception as error:
            workflow.logger.exception("compensation %r of step %s failed", action, step)
            self._report(step, action, False, error_text(error))
            return
        self._report(step, action, True, detail)


async def _shielded(run: Undo) -> str:
    """Run a compensation to its end even if a cancel request arrives meanwhile."""
    task = asyncio.ensure_future(run())
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            # The cancel hit our await, not the compensation: keep waiting for it.


def error_text(error: BaseException) -> str:
    """The innermost message of an error chain, with its type."""
    innermost = innermost_application_error(error)
    if innermost is not None:
        return f"{innermost.type or 'ApplicationError'}: {innermost.message}"
    cause: BaseException | None = error
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{type(cause).__name__}: {cause}"


def failure_of(error: BaseException) -> BaseException:
    """What the workflow fails with: the first error, unwrapped to its own type and message."""
    if is_cancelled_exception(error):
        return error
    if innermost_application_error(error) is not None:
        return workflow_failure(error)
    kind = type(error).__name__
    if isinstance(error, FailureError):
        return ApplicationError(error_text(error), type=kind, non_retryable=True)
    # A bug in the workflow: fail the run (compensated) rather than retry the task forever.
    return ApplicationError(f"{kind}: {error}", type=kind, non_retryable=True)
