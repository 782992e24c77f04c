"""The Experiment workflow's monitor: sample providers, rates and budgets; pause on an open breaker."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.experiment._options import MONITOR_TIMEOUT
from workflows.experiment._publish import Publishing

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from konstruct.experiments.models import MonitorInput, MonitorResult


class Monitoring(Publishing):
    async def _monitor_loop(self) -> None:
        assert self._input is not None and self._carry is not None
        inp = self._input
        while not self._monitor_off:
            if self._status == "stopped":
                await workflow.wait_condition(
                    lambda: self._monitor_off or self._status != "stopped"
                )
                continue
            sample: MonitorResult | None
            try:
                sample = await workflow.execute_activity_method(
                    ExperimentActivities.monitor,
                    MonitorInput(
                        tenant_id=inp.tenant_id,
                        experiment_id=inp.experiment_id,
                        providers=self._carry.prepared.providers,
                    ),
                    start_to_close_timeout=MONITOR_TIMEOUT,
                    retry_policy=RetryPolicy(maximum_attempts=1),
                )
            except (ActivityError, ApplicationError):
                sample = None  # the database is away: keep the last known state
            self._monitor_tries += 1
            if sample is not None:
                self._absorb(sample)
                # A breaker's pause, and the run again once it closes.
                if self._status in ("running", "paused") and not self._stop_requested:
                    await self._record_status()
            self._publish()
            try:
                await workflow.wait_condition(
                    lambda: self._monitor_off,
                    timeout=timedelta(seconds=inp.options.monitor_interval_s),
                )
            except TimeoutError:
                pass

    def _absorb(self, sample: MonitorResult) -> None:
        assert self._carry is not None
        previous = {p.provider: p for p in (self._monitor.providers if self._monitor else [])}
        elapsed = sample.at - self._monitor.at if self._monitor else 0.0
        providers = []
        for p in sample.providers:
            before = previous.get(p.provider)
            if before is not None and elapsed > 0:
                p.ok_per_s = round((p.ok_total - before.ok_total) / elapsed, 2)
                p.throttled_per_s = round((p.throttled_total - before.throttled_total) / elapsed, 2)
            providers.append(p)
        self._providers = providers
        self._monitor = sample
        self._budget = sample.budget
        done = self._carry.evaluated + self._carry.failed
        if self._last_sample is not None and sample.at > self._last_sample[0]:
            rate = (done - self._last_sample[1]) / (sample.at - self._last_sample[0])
            self._items_per_s = (
                rate if self._items_per_s == 0 else 0.5 * self._items_per_s + 0.5 * rate
            )
        self._last_sample = (sample.at, done)
        unhealthy = [p for p in providers if p.breaker != "closed"]
        if self._status in ("running", "paused") and self._quota_reason is None:
            if unhealthy:
                p = unhealthy[0]
                self._paused_reason = (
                    f"provider {p.provider!r}: circuit {p.breaker.replace('_', '-')} after "
                    f"{p.consecutive_failures} consecutive failures; items wait and resume by "
                    f"themselves (next probe in {p.cooldown_left_s:.0f} s)"
                )
                self._set_status("paused")
            else:
                self._paused_reason = None
                self._set_status("running")
