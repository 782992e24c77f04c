"""DemoCascade's data and forecasting steps: sales, features, models, backtests, sweeps, plans.

The forecasting itself is `konstruct.demo.forecasting` (pure); these activities
load their inputs from the session's artifacts and store what they make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity

from activities.base import ActivityClass, outlasting_outages
from activities.demo_step import STEP_ATTEMPTS, compute, demo_step, get_json, put_json
from konstruct.demo import forecasting
from konstruct.demo.models import (
    BackfillInput,
    BacktestInput,
    BacktestResult,
    BacktestScore,
    DataRef,
    FeaturesInput,
    PlanCompareInput,
    PlanCompareResult,
    SavedPlan,
    ScenarioInput,
    ScenarioResult,
    ScenarioSize,
    SeedDataInput,
    StepInput,
    SweepPlan,
    SweepPlanInput,
    SweepPoint,
    SweepPointInput,
    TrainedModel,
    TrainInput,
    TrainResult,
)
from konstruct.platform.db import tenant_transaction
from konstruct.registry import store as registry


async def _backtest(
    table: Any, model: str, params: dict[str, Any], size: ScenarioSize
) -> tuple[float, int]:
    return await compute(forecasting.backtest_wape, model, table, params, size.horizon, size.folds)


class DemoDataActivities(ActivityClass):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _put_table(self, input: StepInput, name: str, table: Any, detail: str) -> DataRef:
        """Store a data step's table in the session; `detail` may name its {rows} and {series}."""
        ref = await put_json(self.pool, input.tenant_id, input.session_prefix + name, table)
        rows, series = forecasting.count_points(table)
        detail = detail.format(rows=rows, series=series)
        return ref.model_copy(update={"rows": rows, "series": series, "detail": detail})

    async def _derive_table(
        self,
        input: StepInput,
        source: DataRef,
        name: str,
        detail: str,
        derive: Callable[..., Any],
        *args: Any,
    ) -> DataRef:
        """A data step that reads a table of the session, derives another from it
        (`derive(table, *args)`, off the event loop) and stores that one."""
        table = await get_json(self.pool, input.tenant_id, source)
        derived = await compute(derive, table, *args)
        return await self._put_table(input, name, derived, detail)

    # --- data -----------------------------------------------------------------------

    @activity.defn(name="demo_seed_data")
    @demo_step
    async def seed_data(self, input: SeedDataInput) -> DataRef:
        size = input.size
        sales = await compute(
            forecasting.generate_sales, input.seed, size.stores, size.products, size.days
        )
        detail = f"{{series}} series x {size.days} days (seed {input.seed})"
        return await self._put_table(input, "data/sales.json", sales, detail)

    @activity.defn(name="demo_backfill")
    @demo_step
    async def backfill(self, input: BackfillInput) -> DataRef:
        return await self._derive_table(
            input,
            input.data,
            "data/backfill/sales.json",
            f"backfilled {input.size.backfill_days} days: {{rows}} points",
            forecasting.backfill_sales,
            input.size.backfill_days,
            input.seed,
        )

    @activity.defn(name="demo_features")
    @demo_step
    async def features(self, input: FeaturesInput) -> DataRef:
        return await self._derive_table(
            input,
            input.data,
            "data/features.json",
            "{rows} feature rows over {series} series",
            forecasting.build_features,
        )

    # --- models ---------------------------------------------------------------------

    @activity.defn(name="demo_train")
    @demo_step
    async def train(self, input: TrainInput) -> TrainResult:
        """Fit each model; its serialized file goes to the session's scratch space."""
        table = await get_json(self.pool, input.tenant_id, input.features)
        trained: list[TrainedModel] = []
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            for model in input.models:
                params = input.params.get(model, {})
                blob = await compute(forecasting.train_and_serialize, model, table, params)
                name = model + "".join(f"-{k}{v}" for k, v in sorted(params.items()))
                uri = f"{input.session_prefix}models/{input.step}/{name}.joblib"
                digest = await registry.store_artifact(conn, input.tenant_id, uri, blob)
                trained.append(
                    TrainedModel(
                        model=model,
                        name=name,
                        params=params,
                        artifact_uri=uri,
                        artifact_sha256=digest,
                        artifact_size=len(blob),
                    )
                )
        return TrainResult(models=trained, detail="trained " + ", ".join(m.name for m in trained))

    @activity.defn(name="demo_backtest")
    @demo_step
    async def backtest(self, input: BacktestInput) -> BacktestResult:
        table = await get_json(self.pool, input.tenant_id, input.features)
        scores = []
        for m in input.models:
            wape, folds = await _backtest(table, m.model, m.params, input.size)
            scores.append(BacktestScore(name=m.name, model=m.model, wape=wape, folds=folds))
        ranked = sorted(scores, key=lambda s: (s.wape, s.name))
        return BacktestResult(
            scores=scores, detail="WAPE " + ", ".join(f"{s.name} {s.wape:.4f}" for s in ranked)
        )

    @activity.defn(name="demo_sweep_plan")
    @outlasting_outages(STEP_ATTEMPTS)
    async def sweep_plan(self, input: SweepPlanInput) -> SweepPlan:
        configs = await compute(forecasting.sweep_configs, input.preset)
        return SweepPlan.model_validate({"preset": input.preset, "configs": configs})

    @activity.defn(name="demo_sweep_point")
    @demo_step
    async def sweep_point(self, input: SweepPointInput) -> SweepPoint:
        table = await get_json(self.pool, input.tenant_id, input.features)
        wape, _ = await _backtest(table, input.model, input.params, input.size)
        return SweepPoint(model=input.model, params=input.params, wape=wape)

    # --- planning -------------------------------------------------------------------

    @activity.defn(name="demo_scenario_simulate_and_save")
    @demo_step
    async def scenario_simulate_and_save(self, input: ScenarioInput) -> ScenarioResult:
        """Load the recorded champion's model (hash verified) and simulate the plans."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            run = await registry.get_run(conn, input.tenant_id, input.champion.run_id)
            assert run.artifact_uri is not None
            blob = await registry.load_artifact(
                conn, input.tenant_id, run.artifact_uri, run.artifact_sha256
            )
        await compute(forecasting.parse_artifact_key, run.artifact_uri)
        model = await compute(forecasting.load_model, blob, run.artifact_sha256)
        table = await get_json(self.pool, input.tenant_id, input.features)
        outcomes = await compute(forecasting.simulate_default_plans, model, table, input.horizon)
        plans: list[SavedPlan] = []
        for outcome in outcomes:
            uri = f"{input.session_prefix}scenarios/{outcome['name']}.json"
            ref = await put_json(self.pool, input.tenant_id, uri, outcome)
            plans.append(
                SavedPlan(
                    name=outcome["name"],
                    uri=uri,
                    sha256=ref.sha256,
                    total_units=float(outcome["total_units"]),
                    summary={k: v for k, v in outcome.items() if k not in ("name", "daily")},
                )
            )
        return ScenarioResult(
            plans=plans,
            detail=f"{len(plans)} plans on champion {run.name} ({run.run_id[:8]}): "
            + ", ".join(f"{p.name} {p.total_units:.0f} units" for p in plans),
        )

    @activity.defn(name="demo_plan_compare")
    @demo_step
    async def plan_compare(self, input: PlanCompareInput) -> PlanCompareResult:
        outcomes = [
            await get_json(self.pool, input.tenant_id, DataRef(uri=p.uri, sha256=p.sha256))
            for p in input.plans
        ]
        comparison = await compute(forecasting.compare_plans, outcomes)
        return PlanCompareResult(
            ranking=list(comparison["ranking"]),
            best=str(comparison["best"]),
            detail=f"best plan {comparison['best']}; ranking {', '.join(comparison['ranking'])}",
        )
