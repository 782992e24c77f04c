"""BatchSweep: backtest every configuration of a sweep preset, train the best one.

DemoCascade runs it as a child workflow. The preset's configurations come from
an activity, so a later change to the presets never changes the commands an
old history replays.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.demo_data import DemoDataActivities
    from konstruct.models.demo import (
        StepContext,
        SweepInput,
        SweepPlanInput,
        SweepPoint,
        SweepPointInput,
        SweepResult,
        TrainInput,
    )

T = TypeVar("T")
SWEEP_STEP = "batch_sweep"
# Errors no retry fixes (an injected failure, a missing file) carry non_retryable themselves.
SWEEP_TIMEOUT = timedelta(seconds=60)
SWEEP_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=5,
)


async def _local(activity: Callable[..., Awaitable[T]], arg: Any, summary: str | None = None) -> T:
    return await workflow.execute_local_activity_method(
        activity,
        arg,
        start_to_close_timeout=SWEEP_TIMEOUT,
        retry_policy=SWEEP_RETRY_POLICY,
        summary=summary,
    )


@workflow.defn
class BatchSweep:
    @workflow.run
    async def run(self, input: SweepInput) -> SweepResult:
        step = StepContext(
            SWEEP_STEP, input.inject_failure, input.session_prefix, tenant_id=input.tenant_id
        )
        plan = await _local(DemoDataActivities.sweep_plan, SweepPlanInput(preset=input.preset))
        points: list[SweepPoint] = await asyncio.gather(
            *(
                _local(
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
        trained = await _local(
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
