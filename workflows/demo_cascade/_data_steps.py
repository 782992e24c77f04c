"""DemoCascade's session and data steps: precheck, reset, the sales data, training, backtest, sweep, cleanup.

Each step is a short method that pushes its undo (a delete of what it writes)
and hands its result to the next steps through `Handoff`.
"""

from __future__ import annotations

from temporalio import workflow

from workflows.demo_cascade._options import (
    BASELINES,
    CHILD_EXECUTION_TIMEOUT,
    SWEEP_PRESET,
    Outcome,
)
from workflows.demo_cascade._saga import Compensating

with workflow.unsafe.imports_passed_through():
    from activities.demo_data import DemoDataActivities
    from activities.demo_session import DemoSessionActivities
    from konstruct.demo import models as dm
    from konstruct.demo.models import (
        DEMO_ALIAS,
        SCENARIO_SIZES,
        BacktestScore,
        StepContext,
        StepInput,
    )
    from workflows.batch_sweep import BatchSweep


class DataSteps(Compensating):
    def _size(self) -> dm.ScenarioSize:
        return SCENARIO_SIZES[self._input.scenario]

    async def _precheck(self, step: StepContext) -> Outcome:
        # Recorded first, on its own: the invariant needs it however precheck ends,
        # and a re-executed step (worker crash) reads the first record back.
        start = await self._local(
            DemoSessionActivities.open_session,
            dm.OpenSessionInput(scenario=self._input.scenario, seed=self._input.seed),
            summary=f"{step.name}: open session",
        )
        self._pre_run_alias = self._alias_run_id = start.pre_run_alias_run_id
        self._history_mark = start.history_mark
        result = await self._step(DemoSessionActivities.precheck, step, StepInput)
        self._handoff.precheck = result
        before = self._pre_run_alias or "(none)"
        return Outcome(
            detail=f"{DEMO_ALIAS} before the run: {before}; {result.detail}",
            work_ms=result.work_ms,
        )

    async def _reset(self, step: StepContext) -> Outcome:
        return await self._report(DemoSessionActivities.reset, step, StepInput)

    async def _seed_data(self, step: StepContext) -> Outcome:
        self._handoff.sales = await self._step(
            DemoDataActivities.seed_data,
            step,
            dm.SeedDataInput,
            deletes=("sales series", "data/sales"),
            seed=self._input.seed,
            size=self._size(),
        )
        return Outcome.of(self._handoff.sales)

    async def _backfill(self, step: StepContext) -> Outcome:
        assert self._handoff.sales is not None
        self._handoff.sales = await self._step(
            DemoDataActivities.backfill,
            step,
            dm.BackfillInput,
            deletes=("backfilled series", "data/backfill"),
            data=self._handoff.sales,
            seed=self._input.seed,
            size=self._size(),
        )
        return Outcome.of(self._handoff.sales)

    async def _features(self, step: StepContext) -> Outcome:
        assert self._handoff.sales is not None
        self._handoff.features = await self._step(
            DemoDataActivities.features,
            step,
            dm.FeaturesInput,
            deletes=("feature table", "data/features"),
            data=self._handoff.sales,
        )
        return Outcome.of(self._handoff.features)

    async def _train(self, step: StepContext, models: list[str]) -> Outcome:
        assert self._handoff.features is not None
        result = await self._step(
            DemoDataActivities.train,
            step,
            dm.TrainInput,
            deletes=("trained model files", f"models/{step.name}/"),
            features=self._handoff.features,
            models=models,
        )
        self._handoff.models += result.models
        return Outcome.of(result)

    async def _train_baselines(self, step: StepContext) -> Outcome:
        return await self._train(step, list(BASELINES))

    async def _train_v2(self, step: StepContext) -> Outcome:
        return await self._train(step, ["trend_seasonal_v2"])

    async def _backtest(self, step: StepContext) -> Outcome:
        assert self._handoff.features is not None
        result = await self._step(
            DemoDataActivities.backtest,
            step,
            dm.BacktestInput,
            features=self._handoff.features,
            models=self._handoff.models,
            size=self._size(),
        )
        self._handoff.scores = result.scores
        return Outcome.of(result)

    async def _batch_sweep(self, step: StepContext) -> Outcome:
        assert self._handoff.features is not None
        self._push_delete(step.name, "sweep model files", self._prefix + "models/batch_sweep/")
        result = await workflow.execute_child_workflow(
            BatchSweep.run,
            dm.SweepInput(
                session_prefix=self._prefix,
                features=self._handoff.features,
                preset=SWEEP_PRESET,
                size=self._size(),
                inject_failure=step.inject,
            ),
            id=f"{workflow.info().workflow_id}-sweep",
            execution_timeout=CHILD_EXECUTION_TIMEOUT,
            static_summary=f"batch sweep {SWEEP_PRESET} for {workflow.info().workflow_id}",
        )
        best = result.best
        self._handoff.models.append(best)
        self._handoff.scores.append(
            BacktestScore(name=best.name, model=best.model, wape=result.best_wape, folds=0)
        )
        ranked = ", ".join(f"{p.params} {p.wape:.4f}" for p in result.points)
        return Outcome(
            detail=f"preset {result.preset}: {len(result.points)} configs ({ranked});"
            f" best {best.name} WAPE {result.best_wape:.4f}",
            work_ms=result.work_ms,
        )

    async def _cleanup(self, step: StepContext) -> Outcome:
        result = await self._step(DemoSessionActivities.cleanup, step, StepInput)
        await self._finish("completed", summary="cleanup: finish session")
        return Outcome.of(result)
