"""The Experiment workflow's in-memory state, shared by all its parts.

Dispatching, batches, stop and resume, continue-as-new and the monitor all read
and write the same counters and in-flight set: each part is a mixin over this
one state rather than an object the state is passed around to.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

from workflows.experiment._options import BATCHES_IN_FLIGHT_BEFORE

with workflow.unsafe.imports_passed_through():
    from konstruct.experiments.models import (
        BudgetProgress,
        ExperimentCarry,
        ExperimentInput,
        ExperimentStatus,
        MonitorResult,
        PauseKind,
        ProviderProgress,
        ToggleInput,
    )


class ExperimentState:
    def __init__(self) -> None:
        self._input: ExperimentInput | None = None
        self._carry: ExperimentCarry | None = None
        self._status: ExperimentStatus = "running"
        # The status the experiment's row was last given by this run (a first run
        # starts `running`; a run after continue-as-new does not know: None), and the
        # stop flag's writes set `stopping` and `running`.
        self._status_on_row: ExperimentStatus | None = "running"
        self._writing_status = False
        self._paused_reason: str | None = None
        self._error: str | None = None
        self._stop_requested = False
        self._early_toggles: list[tuple[str, ToggleInput | None]] = []
        self._in_flight: dict[str, Any] = {}
        self._handles: dict[str, Any] = {}
        self._dispatched = 0
        self._done_this_run = 0
        self._monitor: MonitorResult | None = None
        # The monitor's samples tried this run, whether or not one came back.
        self._monitor_tries = 0
        self._providers: list[ProviderProgress] = []
        self._items_per_s = 0.0
        self._last_sample: tuple[float, int] | None = None
        self._finishing = False
        self._monitor_off = False
        # Set when a provider said its quota is spent, or a budget is: the experiment
        # pauses (a stop made by the workflow itself) until someone resumes it.
        self._quota_reason: str | None = None
        self._pause_kind: PauseKind | None = None
        # The experiment's and its tenant's budget at the last monitor sample.
        self._budget: BudgetProgress | None = None
        # Items found without a result at the end, and the last reason one was left so.
        self._unfinished = 0
        self._unrecorded: str | None = None
        # Set once per run (`BATCH_CALLS`); task activities dispatched this run.
        self._batching = False
        # Batches that fit in `max_concurrency` at once (set once per run).
        self._batches_in_flight = BATCHES_IN_FLIGHT_BEFORE
        # Batches on the workflow's own queue (`BATCHES_ON_WORKFLOW_QUEUE`; set once per run).
        self._batches_on_own_queue = False
        # A batch's failed call counts as an attempt (`FAILED_BATCH_CALL_IS_AN_ATTEMPT`).
        self._batch_failures_count = False
        self._calls_this_run = 0
