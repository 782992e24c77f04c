"""DemoCascade's timeouts and retries, and the values its steps return and hand each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from konstruct.demo import models as dm
    from konstruct.demo.models import (
        BacktestScore,
        DataRef,
        PrecheckResult,
        RegisteredRun,
        SavedPlan,
        TrainedModel,
    )
    from konstruct.platform.temporal.activity_options import (
        OUTAGE,
        LocalActivityOptions,
        retries,
    )

_SECOND = timedelta(seconds=1)
# Errors no retry can fix (ours carry non_retryable) fail the step at once.
# Steps are short: local activities, retried inside the workflow task with no
# attempt limit, so that an outage of PostgreSQL is outlasted; a step gives up
# on any other failure after its attempts (activities.demo_step.STEP_ATTEMPTS).
STEP = LocalActivityOptions(60 * _SECOND, retries(_SECOND / 5, 5 * _SECOND), 60 * _SECOND + OUTAGE)
# A compensation gives up on a failure that is not an outage after a few tries
# (COMPENSATION_ATTEMPTS); it is reported then, not retried forever.
COMPENSATION = dataclasses.replace(STEP, retry_policy=retries(_SECOND / 2, 2 * _SECOND))
# call_llm touches no database: its attempts are the model's.
LLM_CALL = dataclasses.replace(
    STEP, start_to_close=120 * _SECOND, retry_policy=retries(_SECOND, 8 * _SECOND, 3)
)
CHILD_EXECUTION_TIMEOUT = timedelta(minutes=10)
# No answer to a manual approval within this long means hold.
APPROVAL_TIMEOUT = timedelta(seconds=90)
SWEEP_PRESET = "moving_average_windows"
# The v1 models: `promote` picks the champion among them; v2 and the sweep's best
# are the challengers the agent step weighs against it.
BASELINES = ("naive", "seasonal_naive", "moving_average")


@dataclass
class Outcome:
    """How a step ended, for its row in the step table."""

    status: Literal["pass", "skip"] = "pass"
    detail: str = ""
    work_ms: float = 0.0

    @classmethod
    def of(cls, result: dm.StepOutput) -> Outcome:
        return cls(detail=result.detail, work_ms=result.work_ms)


@dataclass
class Handoff:
    """What the steps hand each other."""

    precheck: PrecheckResult | None = None
    sales: DataRef | None = None
    features: DataRef | None = None
    models: list[TrainedModel] = field(default_factory=list)
    scores: list[BacktestScore] = field(default_factory=list)
    runs: list[RegisteredRun] = field(default_factory=list)
    plans: list[SavedPlan] = field(default_factory=list)
    rationale: str = ""
