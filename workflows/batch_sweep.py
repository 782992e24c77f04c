"""BatchSweep: backtest every configuration of a sweep preset, train the best one.

DemoCascade runs it as a child workflow. The preset's configurations come from
an activity, so a later change to the presets never changes the commands an
old history replays.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.demo_data import DemoDataActivities
    from konstruct.demo.models import (
        StepContext,
        SweepInput,
        SweepPlanInput,
        SweepPoint,
        SweepPointInput,
        SweepResult,
        TrainInput,
    )
    from konstruct.platform.temporal.activity_options import (
        OUTAGE,
        LocalActivityOptions,
        retries,
    )

T = TypeVar("T")
SWEEP_STEP = "batch_sweep"
# Errors no retry fixes (an injected failure, a missing file) carry non_retryable themselves;
# an outage of PostgreSQL is outlasted, other failures end after the activity's attempts
# (activities.demo_step.STEP_ATTEMPTS).
SWEEP = LocalActivityOptions(
    start_to_close=timedelta(seconds=60),
    retry_policy=retries(timedelta(milliseconds=200), timedelta(seconds=5)),
    schedule_to_close=timedelta(seconds=60) + OUTAGE,
)


@workflow.defn
class BatchSweep:
    @workflow.run
    async def run(self, input: SweepInput) -> SweepResult:
        step = StepContext(
            SWEEP_STEP, input.inject_failure, input.session_prefix, tenant_id=input.tenant_id
        )
        plan = await SWEEP.run(DemoDataActivities.sweep_plan, SweepPlanInput(preset=input.preset))
        points: list[SweepPoint] = await asyncio.gather(
            *(
                SWEEP.run(
                    DemoDataActivities.sweep_point,
                    step.without_injection().input(
                        SweepPointInput,
                        features=input.features,
                        model=config.model,
                        params=config.params,
                        size=input.size,
                    ),
                    summary=f"{config.model} {config.params}",
                )
                for config in plan.configs
            )
        )
        best = min(points, key=lambda p: (p.wape, p.model, json.dumps(p.params, sort_keys=True)))
        # fail_at=batch_sweep fails here, after the best model was written.
        trained = await SWEEP.run(
            DemoDataActivities.train,
            step.input(
                TrainInput,
                features=input.features,
                models=[best.model],
                params={best.model: best.params},
            ),
            summary=f"train best {best.model} {best.params}",
        )
        return SweepResult(
            preset=plan.preset,
            points=points,
            best=trained.models[0],
            best_wape=best.wape,
            work_ms=sum(p.work_ms for p in points) + trained.work_ms,
        )
