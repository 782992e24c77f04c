"""DemoCascade's saga: how a step runs its activities, pushes their undo first, and how the run unwinds.

Every registry change and every file a step writes pushes its compensation on
the saga *before* the change is made. However the run ends, `_unwind` runs the
compensations in reverse, settles `demo-production` on the recorded champion
(or on where it was before the run) and marks the session finished.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.exceptions import is_cancelled_exception

from workflows.demo_cascade._options import COMPENSATION, STEP, Outcome
from workflows.demo_cascade._state import CascadeState

with workflow.unsafe.imports_passed_through():
    from activities.demo_session import DemoSessionActivities
    from activities.registry import RegistryActivities
    from konstruct.demo import models as dm
    from konstruct.demo.models import DEMO_ALIAS, DEMO_TENANT, StepContext, StepInput
    from konstruct.platform.naming import move_id
    from konstruct.platform.temporal.activity_options import LocalActivityOptions
    from konstruct.platform.temporal.saga import error_text
    from konstruct.registry.models import (
        AliasMoveResult,
        DiscardRunsInput,
        DiscardRunsResult,
        SettleAliasInput,
        UndoAliasMoveInput,
    )

T = TypeVar("T")


class Compensating(CascadeState):
    @property
    def _prefix(self) -> str:
        return f"demo/sessions/{workflow.info().run_id}/"

    async def _local(
        self,
        activity: Callable[..., Awaitable[T]],
        arg: BaseModel,
        options: LocalActivityOptions = STEP,
        summary: str | None = None,
    ) -> T:
        return await options.run(activity, arg, summary)

    async def _step(
        self,
        activity: Callable[..., Awaitable[T]],
        step: StepContext,
        kind: type[StepInput],
        /,
        part: str = "",
        deletes: tuple[str, str] | None = None,
        **fields: Any,
    ) -> T:
        """Run a step's activity on `step.input(kind, **fields)`; its summary is the
        step's name (and which part of it).

        `deletes` is (what, path in the session) the activity writes: its delete is
        pushed on the saga first.
        """
        arg = step.input(kind, **fields)
        if deletes is not None:
            what, path = deletes
            self._push_delete(step.name, what, self._prefix + path)
        return await self._local(
            activity, arg, summary=f"{step.name}: {part}" if part else step.name
        )

    async def _report(
        self,
        activity: Callable[..., Awaitable[dm.StepOutput]],
        step: StepContext,
        kind: type[StepInput],
        /,
        **fields: Any,
    ) -> Outcome:
        """A step whose one activity changes nothing to undo: its output is the outcome."""
        return Outcome.of(await self._step(activity, step, kind, **fields))

    async def _unwind(self, error: BaseException) -> None:
        """Run the compensations in reverse, settle the alias, close the session."""
        cancelled = is_cancelled_exception(error)
        where = f"at {self._current}" if self._current else f"while paused before {self._next_step}"
        self._error = "cancelled" if cancelled else error_text(error)
        self._current = None
        self._set_status("compensating")
        for row in self._steps:
            if row.status == "pending":
                row.status = "skip"
                row.detail = (
                    f"not reached: the run {'was cancelled' if cancelled else 'failed'} {where}"
                )
        await self._saga.unwind()
        if self._alias_touched:
            await self._saga.compensate("(invariant)", "settle demo-production", self._settle_alias)
        try:
            await self._finish("cancelled" if cancelled else "failed", COMPENSATION)
        except Exception:
            workflow.logger.exception("could not mark the demo session finished")
        self._set_status("cancelled" if cancelled else "failed")

    def _move_id(self, what: str) -> str:
        return move_id(workflow.info().run_id, what)

    async def _undo_move(self, what: str, reason: str) -> AliasMoveResult:
        result = await self._local(
            RegistryActivities.undo_alias_move,
            UndoAliasMoveInput(
                tenant_id=DEMO_TENANT,
                alias=DEMO_ALIAS,
                undo_move_id=self._move_id(what),
                move_id=self._move_id(f"undo-{what}"),
                reason=reason,
            ),
            COMPENSATION,
        )
        self._alias_run_id = result.run_id
        return result

    def _push_undo_move(self, step: str, action: str, what: str, reason: str) -> None:
        """Push the undo of the move `what` (its key on the saga too)."""

        async def undo() -> str:
            return (await self._undo_move(what, reason)).detail

        self._saga.push(step, action, what, undo)

    async def _settle_alias(self) -> str:
        target = self._champion.run_id if self._champion else self._pre_run_alias
        result = await self._local(
            RegistryActivities.settle_alias,
            SettleAliasInput(
                tenant_id=DEMO_TENANT,
                alias=DEMO_ALIAS,
                target_run_id=target,
                history_mark=self._history_mark,
                move_id=self._move_id("settle"),
                reason=(
                    "settle on the recorded champion"
                    if self._champion
                    else "settle on the alias before the run (no champion recorded)"
                ),
            ),
            COMPENSATION,
        )
        self._alias_run_id = result.run_id
        return f"{result.detail}: {result.run_id}"

    def _push_delete(self, step: str, what: str, prefix: str) -> None:
        async def delete() -> str:
            output = await self._local(
                DemoSessionActivities.delete_prefix,
                dm.DeletePrefixInput(prefix=prefix),
                COMPENSATION,
            )
            return output.detail

        self._saga.push(step, f"delete {what}", f"{step}:delete", delete)

    def _push_discard(self, step: str, action: str, key: str, run_ids: list[str]) -> None:
        """Push the discard of registry runs; the recorded champion, if any, is kept."""

        async def discard() -> str:
            keep = [self._champion.run_id] if self._champion else []
            result: DiscardRunsResult = await self._local(
                RegistryActivities.discard_runs,
                DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=run_ids, keep=keep),
                COMPENSATION,
            )
            return f"discarded {len(result.deleted)} runs, kept {len(result.kept)}"

        self._saga.push(step, action, key, discard)

    async def _finish(
        self, status: str, options: LocalActivityOptions = STEP, summary: str | None = None
    ) -> None:
        await self._local(
            DemoSessionActivities.finish,
            dm.FinishInput(
                status=status,
                champion_run_id=self._champion.run_id if self._champion else None,
                decision=self._decision,
            ),
            options,
            summary,
        )
