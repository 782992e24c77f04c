"""What the Experiment workflow shows: its progress, its status search attribute, its details.

`progress` answers the query of that name; `current_details` is the text the
Web UI shows, written at every change of status and every monitor sample.
"""

from __future__ import annotations

from temporalio import workflow

from workflows.experiment._options import STATUS_ON_ROW, db_call
from workflows.experiment._state import ExperimentState

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from konstruct.experiments.models import (
        ExperimentProgress,
        ExperimentStatus,
        LatencyStats,
        StatusInput,
        usd,
    )
    from konstruct.experiments.progress_text import budget_line
    from konstruct.platform.temporal.search_attributes import STATUS


def current_details(progress: ExperimentProgress, note: str = "") -> str:
    """The workflow's current details: counts, cost, budget, providers, last refusal."""
    lines = [
        f"**{progress.status}** {progress.evaluated + progress.failed}/{progress.total} done"
        f" ({progress.failed} failed), {progress.in_flight} in flight,"
        f" {progress.items_per_s:.1f} items/s"
        + (f", ETA {progress.eta_s:.0f} s" if progress.eta_s is not None else "")
    ]
    if note:
        lines.append(note)
    if progress.paused_reason:
        lines.append(f"paused: {progress.paused_reason}")
    if progress.cost_usd or progress.cache_hits or not progress.cost_known:
        lines.append(
            f"cost {usd(progress.cost_usd)}"
            + ("" if progress.cost_known else " (some calls of unknown price, counted 0)")
            + (
                f", {progress.cache_hits} cache hits saved {usd(progress.cost_saved_usd)}"
                if progress.cache_hits
                else ""
            )
        )
    budget = budget_line(progress.budget)
    if budget is not None:
        lines.append(budget)
    for p in progress.providers:
        lines.append(
            f"- `{p.provider}`: rate {p.rate_rps:.1f}/s, ok {p.ok_per_s:.1f}/s,"
            f" 429 {p.throttled_per_s:.1f}/s, breaker {p.breaker}"
            f" ({p.breaker_trips} trips)"
        )
    if progress.last_refusal is not None:
        r = progress.last_refusal
        lines.append(f"last refused {r.action}: {r.reason}")
    # The Web UI renders details as Markdown with math: `$0.01 … $0.02` would read as a
    # formula. A backslash-escaped dollar is a plain dollar in every CommonMark renderer.
    return "\n\n".join(lines).replace("$", "\\$")


class Publishing(ExperimentState):
    def _progress(self) -> ExperimentProgress:
        inp, carry = self._input, self._carry
        if inp is None:
            return ExperimentProgress(experiment_id="", tenant_id="", name="", status="running")
        total = carry.prepared.total if carry else 0
        done = (carry.evaluated + carry.failed) if carry else 0
        refusals = [t for t in (carry.toggles if carry else []) if not t.accepted]
        eta = None
        # Only a running experiment gets closer to its end: no ETA while paused or stopped.
        if self._status == "running" and self._items_per_s > 0 and total:
            eta = round((total - done) / self._items_per_s, 1)
        return ExperimentProgress(
            experiment_id=inp.experiment_id,
            tenant_id=inp.tenant_id,
            name=inp.name or inp.experiment_id,
            status=self._status,
            paused_reason=self._paused_reason,
            paused_kind=(self._pause_kind or "breaker") if self._status == "paused" else None,
            total=total,
            completed=carry.completed if carry else 0,
            failed=carry.failed if carry else 0,
            in_flight=len(self._in_flight),
            evaluated=carry.evaluated if carry else 0,
            max_concurrency=inp.max_concurrency,
            slot_utilisation=round(len(self._in_flight) / inp.max_concurrency, 3),
            items_per_s=round(self._items_per_s, 2),
            eta_s=eta,
            providers=self._providers,
            latency=self._monitor.latency if self._monitor else LatencyStats(),
            prompt_tokens=carry.prompt_tokens if carry else 0,
            completion_tokens=carry.completion_tokens if carry else 0,
            cost_usd=round(carry.cost_usd, 9) if carry else 0.0,
            cost_known=carry.cost_known if carry else True,
            cache_hits=carry.cache_hits if carry else 0,
            cost_saved_usd=round(carry.cost_saved_usd, 9) if carry else 0.0,
            budget=self._budget,
            run_index=carry.run_index if carry else 0,
            toggles=list(carry.toggles) if carry else [],
            last_refusal=refusals[-1] if refusals else None,
            error=self._error,
            unfinished=self._unfinished,
            incomplete_reason=self._unrecorded if self._status == "incomplete" else None,
        )

    def _set_status(self, status: ExperimentStatus) -> None:
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([STATUS.value_set(status)])
        if status != "paused":
            self._paused_reason = None
        self._publish()

    async def _record_status(self) -> None:
        """Give the experiment's row the status every other surface shows (once it
        differs from what the row was given)."""
        inp = self._input
        if inp is None or self._status == self._status_on_row:
            return
        if not workflow.patched(STATUS_ON_ROW):
            return
        # One write at a time, the last one of the status as it is then: two writes
        # in flight together could land in either order.
        await workflow.wait_condition(lambda: not self._writing_status)
        self._writing_status = True
        try:
            while self._status != self._status_on_row:
                status = self._status
                await db_call(
                    ExperimentActivities.record_status,
                    StatusInput(
                        tenant_id=inp.tenant_id, experiment_id=inp.experiment_id, status=status
                    ),
                )
                self._status_on_row = status
        finally:
            self._writing_status = False

    def _publish(self, note: str = "") -> None:
        workflow.set_current_details(current_details(self._progress(), note))
