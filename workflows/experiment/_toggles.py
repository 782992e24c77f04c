"""The Experiment workflow's stop, resume and pause: who may toggle when, and the wait while stopped.

A stop or resume is accepted or refused with a reason (a cooldown, the
experiment loading or finished); a spent quota or budget is a stop the workflow
makes itself, shown as `paused` until someone resumes it.
"""

from __future__ import annotations

from temporalio import workflow

from workflows.experiment._calls import Calls
from workflows.experiment._options import QUEUE_EARLY_TOGGLES, TOGGLE_HISTORY, db_call
from workflows.experiment._publish import Publishing

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from konstruct.experiments.models import (
        PauseKind,
        StopFlagInput,
        StopFlagResult,
        ToggleInput,
        ToggleRecord,
        ToggleResult,
    )


class Toggles(Calls, Publishing):
    def _toggle(self, action: str, input: ToggleInput | None) -> ToggleResult:
        loading = (self._carry is None or self._input is None) and not self._finishing
        if loading and workflow.patched(QUEUE_EARLY_TOGGLES):
            self._early_toggles.append((action, input))
            return ToggleResult(
                accepted=True,
                status=self._status,
                reason=f"{action} queued: applied as soon as the run has loaded",
            )
        now = workflow.now()
        reason = self._refusal(action, now.timestamp())
        accepted = reason is None
        if accepted:
            self._stop_requested = action == "stop"
        if self._carry is not None:
            if accepted:
                self._carry.last_toggle_at = now.timestamp()
            by = f" by {input.by}" if input and input.by else ""
            self._carry.toggles = [
                *self._carry.toggles,
                ToggleRecord(
                    action="stop" if action == "stop" else "resume",
                    accepted=accepted,
                    reason=(reason or "accepted") + by,
                    at=now.isoformat(),
                ),
            ][-TOGGLE_HISTORY:]
        self._publish()
        return ToggleResult(accepted=accepted, status=self._status, reason=reason or "accepted")

    def _refusal(self, action: str, now: float) -> str | None:
        if self._finishing or self._status in ("completed", "failed"):
            return f"the experiment is {self._status}"
        if self._carry is None or self._input is None:
            return "the experiment is still loading its dataset; try again in a moment"
        if action == "stop" and self._stop_requested:
            return f"the experiment is already {self._status}"
        if action == "resume" and not self._stop_requested:
            return f"the experiment is not stopped (it is {self._status})"
        last = self._carry.last_toggle_at
        cooldown = self._input.options.toggle_cooldown_s
        if last is not None and now - last < cooldown:
            return (
                f"too soon: {now - last:.1f} s since the last stop/resume; wait "
                f"{cooldown - (now - last):.1f} s more (cooldown {cooldown:g} s)"
            )
        return None

    def _quota_spent(self, message: str, kind: PauseKind = "quota") -> None:
        """No retry helps a spent quota or budget: pause, and leave the item pending."""
        if self._quota_reason is None:
            self._quota_reason = message
            self._pause_kind = kind
            self._stop_requested = True
            self._publish(f"paused: {kind}: {message}")

    async def _stop_and_wait(self) -> None:
        self._set_status("stopping")
        flagged = await self._set_stop_flag(stopped=True)
        self._status_on_row = "stopping"  # the flag's write said so
        self._cancel_calls(flagged.waiting_activity_ids)
        await workflow.wait_condition(lambda: not self._in_flight)
        if self._quota_reason is not None and self._pause_kind == "budget":
            self._paused_reason = f"budget: {self._quota_reason}"
            self._set_status("paused")
        elif self._quota_reason is not None:
            self._paused_reason = f"quota: {self._quota_reason}; resume once it is raised"
            self._set_status("paused")
        else:
            self._set_status("stopped")
        await self._record_status()
        await workflow.wait_condition(lambda: not self._stop_requested)
        self._quota_reason = None
        self._pause_kind = None
        await self._set_stop_flag(stopped=False)
        self._set_status("running")
        self._status_on_row = "running"  # the flag's write said so

    async def _set_stop_flag(self, stopped: bool) -> StopFlagResult:
        assert self._input is not None
        return await db_call(
            ExperimentActivities.set_stop_flag,
            StopFlagInput(
                tenant_id=self._input.tenant_id,
                experiment_id=self._input.experiment_id,
                stopped=stopped,
                workflow_id=workflow.info().workflow_id,
            ),
        )
