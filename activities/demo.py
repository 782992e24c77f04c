"""The DemoCascade steps: data, models, registry moves, planning, RAG, the agent's decision.

Every step activity gets `inject_failure`: when set (the run's `fail_at`), it
does its work, side effects included, and then fails non-retryably with
`InjectedFailure`, so the workflow's compensations have something real to undo.

The forecasting itself is `konstruct.forecasting` (pure); the registry's SQL
is `activities.registry`; this module only holds the SQL of `demo_sessions`.
Data between steps travels as artifacts in the store, referenced by URI and
sha256, so workflow history stays small.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from konstruct import forecasting
from konstruct.db import tenant_transaction
from konstruct.errors import KonstructError
from konstruct.models.demo import (
    BackfillInput,
    BacktestInput,
    BacktestResult,
    BacktestScore,
    CleanupInput,
    CompatInput,
    CompatResult,
    DataRef,
    DecisionApplyInput,
    DecisionApplyResult,
    DeletePrefixInput,
    EvalRecordInput,
    FeaturesInput,
    FinishInput,
    MoveOutput,
    OpenSessionInput,
    PlanCompareInput,
    PlanCompareResult,
    PrecheckInput,
    PrecheckResult,
    PromoteInput,
    RagInput,
    RagResult,
    RegisteredRun,
    RegisterInput,
    RegisterResult,
    RegressionCheck,
    RegressionCheckInput,
    ResetResult,
    SavedPlan,
    ScenarioInput,
    ScenarioResult,
    SeedDataInput,
    SessionStart,
    StaleCheckInput,
    StaleCheckResult,
    StepInput,
    StepOutput,
    SweepPlan,
    SweepPlanInput,
    SweepPoint,
    SweepPointInput,
    TrainedModel,
    TrainInput,
    TrainResult,
    VerifyInput,
)
from konstruct.models.registry import MoveAliasInput, NewRun
from konstruct.provider_adapter import provider_error
from konstruct.router import RouterConfig
from konstruct.store import registry
from konstruct.validation import to_application_error

T = TypeVar("T")

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "demo-docs"
# The RAG step indexes this many documents of docs/demo-docs (sorted by name).
RAG_DOCS_SUBSET = 4
RAG_TOP_K = 2
EMBED_GROUP = "embed"
KEEP_DEMO_SESSIONS = 100
# The agent asks the first of these groups the router has.
AGENT_GROUPS = ("fast", "quality")
JUDGE_GROUPS = ("judge", "fast")
# The regex the seed's consumers parse artifact keys with.
ARTIFACT_KEY = forecasting.ARTIFACT_KEY_PATTERN


class InvariantViolated(KonstructError):
    error_type = "InvariantViolated"


class PrecheckFailed(KonstructError):
    error_type = "PrecheckFailed"


def _injected(step: str) -> ApplicationError:
    return ApplicationError(
        f"injected failure at step {step!r} (fail_at)", type="InjectedFailure", non_retryable=True
    )


def _maybe_fail(input: StepInput) -> None:
    if input.inject_failure:
        raise _injected(input.step)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def _compute(fn: Callable[..., T], *args: Any) -> T:
    """Domain work off the event loop (so the worker keeps answering while it runs).

    The forecasting module raises ValueError for what no retry fixes (an unknown
    model, a hash mismatch, a URI that does not parse): non-retryable here.
    """
    try:
        return await asyncio.to_thread(fn, *args)
    except ValueError as exc:
        kind = (
            "ArtifactIntegrityError"
            if isinstance(exc, forecasting.ArtifactIntegrityError)
            else "ForecastingError"
        )
        raise ApplicationError(str(exc), type=kind, non_retryable=True) from exc


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class DemoActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        router: Any,
        router_config: RouterConfig,
        docs_dir: Path = DOCS_DIR,
    ) -> None:
        self.pool = pool
        self.router = router
        self.groups = router_config.groups()
        self.docs_dir = docs_dir

    def all(self) -> list[Callable[..., Awaitable[Any]]]:
        return [
            self.open_session,
            self.precheck,
            self.reset,
            self.seed_data,
            self.backfill,
            self.features,
            self.train,
            self.backtest,
            self.sweep_plan,
            self.sweep_point,
            self.register,
            self.compat_compare,
            self.promote,
            self.stale_alias_check,
            self.safer_promote_swap,
            self.check_regression,
            self.scenario_simulate_and_save,
            self.plan_compare,
            self.rag_index,
            self.apply_decision,
            self.record_eval,
            self.verify,
            self.cleanup,
            self.finish,
            self.delete_prefix,
        ]

    # --- plumbing -----------------------------------------------------------------

    @staticmethod
    def _caller() -> tuple[str, str]:
        info = activity.info()
        return info.workflow_id or "", info.workflow_run_id or ""

    async def _put_points(
        self,
        input: StepInput,
        name: str,
        points: Any,
        started: float,
        detail: Callable[[int, int], str],
    ) -> DataRef:
        """Store a data step's table in the session, then fail if injected."""
        ref = await self._put(input.tenant_id, input.session_prefix + name, points)
        rows, series = forecasting.count_points(points)
        _maybe_fail(input)
        return ref.model_copy(
            update={
                "rows": rows,
                "series": series,
                "detail": detail(rows, series),
                "work_ms": _ms(started),
            }
        )

    async def _put(self, tenant_id: str, uri: str, value: Any) -> DataRef:
        data = _json_bytes(value)
        async with tenant_transaction(self.pool, tenant_id) as conn:
            digest = await registry.store_artifact(conn, tenant_id, uri, data)
        return DataRef(uri=uri, sha256=digest)

    async def _get(self, tenant_id: str, ref: DataRef) -> Any:
        """A step's input, hash verified: a missing or changed file fails at once."""
        try:
            async with tenant_transaction(self.pool, tenant_id) as conn:
                data = await registry.load_artifact(conn, tenant_id, ref.uri, ref.sha256)
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        return json.loads(data)

    # --- setup ----------------------------------------------------------------------

    @activity.defn(name="demo_open_session")
    async def open_session(self, input: OpenSessionInput) -> SessionStart:
        """Record where the alias is as this run begins; a re-run returns the first record."""
        workflow_id, workflow_run_id = self._caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            if await conn.fetchval("select to_regclass('demo_sessions')") is None:
                raise to_application_error(
                    PrecheckFailed("table demo_sessions is missing: run `konstruct migrate`")
                )
            if not await conn.fetchval(
                "select 1 from tenants where tenant_id = $1", input.tenant_id
            ):
                raise to_application_error(
                    PrecheckFailed(
                        f"tenant {input.tenant_id!r} does not exist: run `konstruct migrate`, "
                        "which seeds it"
                    )
                )
            state = await registry.alias_state(conn, input.tenant_id, input.alias)
            await conn.execute(
                "insert into demo_sessions (tenant_id, workflow_run_id, workflow_id, scenario,"
                " seed, pre_run_alias_run_id, history_mark) values ($1, $2, $3, $4, $5, $6, $7)"
                " on conflict do nothing",
                input.tenant_id,
                workflow_run_id,
                workflow_id,
                input.scenario,
                input.seed,
                None if state.run_id is None else uuid.UUID(state.run_id),
                state.history_mark,
            )
            row = await conn.fetchrow(
                "select pre_run_alias_run_id, history_mark from demo_sessions"
                " where tenant_id = $1 and workflow_run_id = $2",
                input.tenant_id,
                workflow_run_id,
            )
        return SessionStart(
            pre_run_alias_run_id=None
            if row["pre_run_alias_run_id"] is None
            else str(row["pre_run_alias_run_id"]),
            history_mark=row["history_mark"],
        )

    @activity.defn(name="demo_precheck")
    async def precheck(self, input: PrecheckInput) -> PrecheckResult:
        """The registry schema is there; which providers the router has."""
        started = time.perf_counter()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            missing = [
                table
                for table in ("registry_runs", "registry_aliases", "registry_artifacts")
                if await conn.fetchval("select to_regclass($1)", table) is None
            ]
        if missing:
            raise to_application_error(
                PrecheckFailed(f"tables {', '.join(missing)} are missing: run `konstruct migrate`")
            )
        agent_group = next((g for g in AGENT_GROUPS if g in self.groups), None)
        judge_group = next((g for g in JUDGE_GROUPS if g in self.groups), None)
        embed = EMBED_GROUP in self.groups
        detail = (
            f"schema ok; chat group {agent_group or '(none)'}, judge {judge_group or '(none)'},"
            f" embeddings {'on' if embed else 'off (no `embed` group)'}"
        )
        _maybe_fail(input)
        return PrecheckResult(
            detail=detail,
            work_ms=_ms(started),
            llm_groups=sorted(self.groups),
            embed_available=embed,
            agent_group=agent_group,
            judge_group=judge_group,
        )

    @activity.defn(name="demo_reset")
    async def reset(self, input: StepInput) -> ResetResult:
        """Delete the demo-owned rows of demo runs that are over; nothing else."""
        started = time.perf_counter()
        _, workflow_run_id = self._caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await conn.execute(
                "update demo_sessions set status = 'abandoned', finished_at = now()"
                " where tenant_id = $1 and status = 'running' and workflow_run_id <> $2"
                f" and started_at < now() - interval '{registry.STALE_DEMO_SESSION_HOURS} hours'",
                input.tenant_id,
                workflow_run_id,
            )
            live = [
                r["workflow_run_id"]
                for r in await conn.fetch(
                    "select workflow_run_id from demo_sessions"
                    " where tenant_id = $1 and status = 'running'",
                    input.tenant_id,
                )
            ]
            deleted = await registry.delete_demo_rows(
                conn, input.tenant_id, sorted({*live, workflow_run_id})
            )
            # The sessions table is a log of demo runs: keep the latest ones.
            await conn.execute(
                "delete from demo_sessions where tenant_id = $1 and status <> 'running'"
                " and workflow_run_id not in (select workflow_run_id from demo_sessions"
                " where tenant_id = $1 order by started_at desc limit $2)",
                input.tenant_id,
                KEEP_DEMO_SESSIONS,
            )
        detail = (
            f"deleted {deleted['runs']} demo runs, {deleted['model_artifacts']} model artifacts,"
            f" {deleted['session_artifacts']} session files of finished demo runs;"
            f" {len(set(live) - {workflow_run_id})} other demo runs live"
        )
        _maybe_fail(input)
        return ResetResult(detail=detail, work_ms=_ms(started), deleted=deleted)

    # --- data -----------------------------------------------------------------------

    @activity.defn(name="demo_seed_data")
    async def seed_data(self, input: SeedDataInput) -> DataRef:
        started = time.perf_counter()
        size = input.size
        sales = await _compute(
            forecasting.generate_sales, input.seed, size.stores, size.products, size.days
        )
        return await self._put_points(
            input,
            "data/sales.json",
            sales,
            started,
            lambda rows, series: f"{series} series x {size.days} days (seed {input.seed})",
        )

    @activity.defn(name="demo_backfill")
    async def backfill(self, input: BackfillInput) -> DataRef:
        started = time.perf_counter()
        sales = await self._get(input.tenant_id, input.data)
        filled = await _compute(
            forecasting.backfill_sales, sales, input.size.backfill_days, input.seed
        )
        return await self._put_points(
            input,
            "data/backfill/sales.json",
            filled,
            started,
            lambda rows, series: f"backfilled {input.size.backfill_days} days: {rows} points",
        )

    @activity.defn(name="demo_features")
    async def features(self, input: FeaturesInput) -> DataRef:
        started = time.perf_counter()
        sales = await self._get(input.tenant_id, input.data)
        table = await _compute(forecasting.build_features, sales)
        return await self._put_points(
            input,
            "data/features.json",
            table,
            started,
            lambda rows, series: f"{rows} feature rows over {series} series",
        )

    # --- models ---------------------------------------------------------------------

    @activity.defn(name="demo_train")
    async def train(self, input: TrainInput) -> TrainResult:
        """Fit each model; its serialized file goes to the session's scratch space."""
        started = time.perf_counter()
        table = await self._get(input.tenant_id, input.features)
        trained: list[TrainedModel] = []
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            for model in input.models:
                params = input.params.get(model, {})
                blob = await _compute(forecasting.train_and_serialize, model, table, params)
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
        _maybe_fail(input)
        return TrainResult(
            models=trained,
            detail="trained " + ", ".join(m.name for m in trained),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_backtest")
    async def backtest(self, input: BacktestInput) -> BacktestResult:
        started = time.perf_counter()
        table = await self._get(input.tenant_id, input.features)
        scores = []
        for m in input.models:
            wape, folds = await _compute(
                forecasting.backtest_wape,
                m.model,
                table,
                m.params,
                input.size.horizon,
                input.size.folds,
            )
            scores.append(BacktestScore(name=m.name, model=m.model, wape=wape, folds=folds))
        ranked = sorted(scores, key=lambda s: (s.wape, s.name))
        _maybe_fail(input)
        return BacktestResult(
            scores=scores,
            detail="WAPE " + ", ".join(f"{s.name} {s.wape:.4f}" for s in ranked),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_sweep_plan")
    async def sweep_plan(self, input: SweepPlanInput) -> SweepPlan:
        return SweepPlan.model_validate(
            {
                "preset": input.preset,
                "configs": await _compute(forecasting.sweep_configs, input.preset),
            }
        )

    @activity.defn(name="demo_sweep_point")
    async def sweep_point(self, input: SweepPointInput) -> SweepPoint:
        started = time.perf_counter()
        table = await self._get(input.tenant_id, input.features)
        wape, _ = await _compute(
            forecasting.backtest_wape,
            input.model,
            table,
            input.params,
            input.size.horizon,
            input.size.folds,
        )
        _maybe_fail(input)
        return SweepPoint(model=input.model, params=input.params, wape=wape, work_ms=_ms(started))

    # --- registry -------------------------------------------------------------------

    @activity.defn(name="demo_register")
    async def register(self, input: RegisterInput) -> RegisterResult:
        """Copy each model file to its content-addressed URI and register a run for it."""
        started = time.perf_counter()
        workflow_id, workflow_run_id = self._caller()
        scores = {s.name: s for s in input.scores}
        runs: list[RegisteredRun] = []
        new_runs: list[NewRun] = []
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                await registry.lock_registry_writes(conn, input.tenant_id)
                for m in input.models:
                    blob = await registry.load_artifact(
                        conn, input.tenant_id, m.artifact_uri, m.artifact_sha256
                    )
                    uri = await _compute(forecasting.artifact_uri, m.model, m.artifact_sha256)
                    await registry.store_artifact(conn, input.tenant_id, uri, blob)
                    score = scores[m.name]
                    new_runs.append(
                        NewRun(
                            run_id=input.run_ids[m.name],
                            kind="model",
                            name=m.name,
                            owner="demo",
                            params={
                                "model": m.model,
                                **m.params,
                                "seed": input.seed,
                                "scenario": input.scenario,
                            },
                            metrics={"wape": score.wape, "folds": float(score.folds)},
                            artifact_uri=uri,
                            artifact_sha256=m.artifact_sha256,
                            artifact_size=len(blob),
                        )
                    )
                    runs.append(
                        RegisteredRun(
                            run_id=input.run_ids[m.name],
                            name=m.name,
                            model=m.model,
                            wape=score.wape,
                            artifact_uri=uri,
                            artifact_sha256=m.artifact_sha256,
                        )
                    )
                await registry.insert_runs(
                    conn, input.tenant_id, new_runs, workflow_id, workflow_run_id
                )
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        _maybe_fail(input)
        return RegisterResult(
            runs=runs,
            detail=f"registered {len(runs)} runs: "
            + ", ".join(f"{r.name} -> {r.artifact_uri}" for r in runs),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_compat_compare")
    async def compat_compare(self, input: CompatInput) -> CompatResult:
        started = time.perf_counter()
        report = await _compute(
            forecasting.compatibility_check,
            {"model": input.v1.model, "name": input.v1.name, "artifact_uri": input.v1.artifact_uri},
            {"model": input.v2.model, "name": input.v2.name, "artifact_uri": input.v2.artifact_uri},
        )
        compatible = bool(report.get("compatible"))
        detail = (
            f"{input.v1.name} (WAPE {input.v1.wape:.4f}) vs {input.v2.name} "
            f"(WAPE {input.v2.wape:.4f}): {'compatible' if compatible else 'incompatible'}"
            f" {report.get('detail', '')}"
        ).strip()
        _maybe_fail(input)
        return CompatResult(compatible=compatible, detail=detail, work_ms=_ms(started))

    async def _move(self, input: PromoteInput, record_champion: bool) -> MoveOutput:
        started = time.perf_counter()
        workflow_id, workflow_run_id = self._caller()
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                result = await registry.move_alias(
                    conn,
                    MoveAliasInput(
                        tenant_id=input.tenant_id,
                        alias=input.alias,
                        to_run_id=input.champion.run_id,
                        reason=input.reason,
                        move_id=input.move_id,
                    ),
                    workflow_id,
                    workflow_run_id,
                )
                if record_champion:
                    await conn.execute(
                        "update demo_sessions set champion_run_id = $3"
                        " where tenant_id = $1 and workflow_run_id = $2",
                        input.tenant_id,
                        workflow_run_id,
                        uuid.UUID(input.champion.run_id),
                    )
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        verb = "moved" if result.moved else "already on"
        _maybe_fail(input)
        return MoveOutput(
            moved=result.moved,
            from_run_id=result.from_run_id,
            to_run_id=result.to_run_id,
            detail=f"{input.alias} {verb} {input.champion.name} ({input.champion.run_id[:8]},"
            f" WAPE {input.champion.wape:.4f})",
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_promote")
    async def promote(self, input: PromoteInput) -> MoveOutput:
        """Point the alias at the champion and record it as this run's champion."""
        return await self._move(input, record_champion=True)

    @activity.defn(name="demo_safer_promote_swap")
    async def safer_promote_swap(self, input: PromoteInput) -> MoveOutput:
        """The trial swap of safer promote: the alias to a worse run (rolled back after)."""
        return await self._move(input, record_champion=False)

    @activity.defn(name="demo_stale_alias_check")
    async def stale_alias_check(self, input: StaleCheckInput) -> StaleCheckResult:
        """Aliases pointing at nothing, at a run without its artifact, or off the champion."""
        started = time.perf_counter()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            rows = await conn.fetch(
                "select a.alias, a.run_id, r.run_id as found, r.artifact_uri, r.artifact_sha256,"
                " (select sha256 from registry_artifacts x where x.tenant_id = a.tenant_id"
                "  and x.uri = r.artifact_uri) as stored_sha"
                " from registry_aliases a left join registry_runs r on r.run_id = a.run_id"
                " where a.tenant_id = $1 order by a.alias",
                input.tenant_id,
            )
        stale = []
        for r in rows:
            reason = None
            if r["run_id"] is None:
                reason = "points at no run"
            elif r["found"] is None:
                reason = "its run is gone"
            elif r["artifact_uri"] and r["stored_sha"] is None:
                reason = "its artifact is missing"
            elif r["artifact_sha256"] and r["stored_sha"] != r["artifact_sha256"]:
                reason = "its artifact hash changed"
            elif r["alias"] == input.alias and str(r["run_id"]) != input.champion_run_id:
                reason = "not on the recorded champion"
            if reason:
                stale.append(f"{r['alias']}: {reason}")
        _maybe_fail(input)
        return StaleCheckResult(
            checked=len(rows),
            stale=stale,
            detail=f"{len(rows)} aliases checked, {len(stale)} stale"
            + (f": {'; '.join(stale)}" if stale else ""),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_check_regression")
    async def check_regression(self, input: RegressionCheckInput) -> RegressionCheck:
        """Judge the run the trial swap put live against the champion; parse its artifact key.

        The run comes from the swap's history row, not from a re-read of the alias,
        so a re-executed check (after a worker crash) judges the same run.
        """
        started = time.perf_counter()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            swap = await registry.find_move(conn, input.tenant_id, input.swap_move_id)
            state = await registry.alias_state(conn, input.tenant_id, input.alias)
            served = swap.to_run_id if swap is not None else state.run_id
            run = None if served is None else await registry.get_run(conn, input.tenant_id, served)
        alias_wape = None if run is None else run.metrics.get("wape")
        key_match = ARTIFACT_KEY.search(run.artifact_uri or "") if run else None
        if run is not None and run.artifact_uri and key_match is None:
            raise to_application_error(
                InvariantViolated(
                    f"the alias served run {run.run_id} whose artifact URI "
                    f"{run.artifact_uri!r} does not parse as a model artifact key"
                )
            )
        regressed = alias_wape is not None and alias_wape > input.champion.wape
        detail = (
            f"served WAPE {alias_wape if alias_wape is None else round(alias_wape, 4)}"
            f" vs champion {input.champion.wape:.4f}:"
            f" {'regression detected' if regressed else 'no regression'}"
            f" (artifact key {key_match.group(1) if key_match else '-'})"
        )
        return RegressionCheck(
            alias_run_id=served,
            alias_wape=alias_wape,
            champion_wape=input.champion.wape,
            regressed=regressed,
            artifact_key=key_match.group(1) if key_match else None,
            detail=detail,
            work_ms=_ms(started),
        )

    # --- planning -------------------------------------------------------------------

    @activity.defn(name="demo_scenario_simulate_and_save")
    async def scenario_simulate_and_save(self, input: ScenarioInput) -> ScenarioResult:
        """Load the recorded champion's model (hash verified) and simulate the plans."""
        started = time.perf_counter()
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                run = await registry.get_run(conn, input.tenant_id, input.champion.run_id)
                assert run.artifact_uri is not None
                blob = await registry.load_artifact(
                    conn, input.tenant_id, run.artifact_uri, run.artifact_sha256
                )
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        await _compute(forecasting.parse_artifact_key, run.artifact_uri)
        model = await _compute(forecasting.load_model, blob, run.artifact_sha256)
        table = await self._get(input.tenant_id, input.features)
        outcomes = await _compute(forecasting.simulate_default_plans, model, table, input.horizon)
        plans: list[SavedPlan] = []
        for outcome in outcomes:
            uri = f"{input.session_prefix}scenarios/{outcome['name']}.json"
            ref = await self._put(input.tenant_id, uri, outcome)
            plans.append(
                SavedPlan(
                    name=outcome["name"],
                    uri=uri,
                    sha256=ref.sha256,
                    total_units=float(outcome["total_units"]),
                    summary={k: v for k, v in outcome.items() if k not in ("name", "daily")},
                )
            )
        _maybe_fail(input)
        return ScenarioResult(
            plans=plans,
            detail=f"{len(plans)} plans on champion {run.name} ({run.run_id[:8]}): "
            + ", ".join(f"{p.name} {p.total_units:.0f} units" for p in plans),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_plan_compare")
    async def plan_compare(self, input: PlanCompareInput) -> PlanCompareResult:
        started = time.perf_counter()
        outcomes = [
            await self._get(input.tenant_id, DataRef(uri=p.uri, sha256=p.sha256))
            for p in input.plans
        ]
        comparison = await _compute(forecasting.compare_plans, outcomes)
        _maybe_fail(input)
        return PlanCompareResult(
            ranking=list(comparison["ranking"]),
            best=str(comparison["best"]),
            detail=f"best plan {comparison['best']}; ranking {', '.join(comparison['ranking'])}",
            work_ms=_ms(started),
        )

    # --- knowledge ------------------------------------------------------------------

    @activity.defn(name="demo_rag_index")
    async def rag_index(self, input: RagInput) -> RagResult:
        """Embed a subset of docs/demo-docs through the router's `embed` group."""
        started = time.perf_counter()
        if EMBED_GROUP not in self.groups:
            _maybe_fail(input)
            return RagResult(
                skipped=True,
                detail="skipped: no embedding provider configured (the router has no active "
                f"`{EMBED_GROUP}` group; see deploy/llm-router.yaml)",
                work_ms=_ms(started),
            )
        docs = sorted(self.docs_dir.glob("*.md"))[:RAG_DOCS_SUBSET]
        if not docs:
            _maybe_fail(input)
            return RagResult(
                skipped=True,
                detail=f"skipped: no documents to index in {self.docs_dir}",
                work_ms=_ms(started),
            )
        chunks: list[tuple[str, str]] = []
        for path in docs:
            for block in path.read_text().split("\n\n"):
                text = block.strip()
                if text and not text.startswith("#"):
                    chunks.append((path.name, text))
        vectors = await self._embed([c[1] for c in chunks] + [input.question])
        question = vectors[-1]
        scored = sorted(
            ((_cosine(v, question), chunks[i][0]) for i, v in enumerate(vectors[:-1])),
            key=lambda s: (-s[0], s[1]),
        )
        top: list[str] = []
        for _, name in scored:
            if name not in top:
                top.append(name)
            if len(top) == RAG_TOP_K:
                break
        index = {
            "docs": [p.name for p in docs],
            "chunks": [
                {"doc": c[0], "text": c[1], "vector": v}
                for c, v in zip(chunks, vectors[:-1], strict=True)
            ],
        }
        ref = await self._put(input.tenant_id, input.session_prefix + "rag/index.json", index)
        _maybe_fail(input)
        return RagResult(
            chunks=len(chunks),
            uri=ref.uri,
            top_documents=top,
            detail=f"indexed {len(chunks)} chunks of {len(docs)} docs; "
            f"top for the question: {', '.join(top)}",
            work_ms=_ms(started),
        )

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        try:
            response = await self.router.aembedding(model=EMBED_GROUP, input=texts)
        except Exception as exc:
            raise provider_error(exc, f"embedding call to group {EMBED_GROUP!r}") from exc
        data = sorted(response.data, key=lambda d: d["index"] if isinstance(d, dict) else d.index)
        return [list(d["embedding"] if isinstance(d, dict) else d.embedding) for d in data]

    # --- agents ---------------------------------------------------------------------

    @activity.defn(name="demo_apply_decision")
    async def apply_decision(self, input: DecisionApplyInput) -> DecisionApplyResult:
        """Promote the challenger if proposed, approved and not worse; record the decision."""
        started = time.perf_counter()
        workflow_id, workflow_run_id = self._caller()
        promote = input.proposal == "PROMOTE" and input.approved
        note = input.how
        if promote and input.challenger.wape >= input.champion.wape:
            promote = False
            note += "; guardrail: the challenger is not better than the champion, hold"
        champion = input.champion
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                if promote:
                    await registry.move_alias(
                        conn,
                        MoveAliasInput(
                            tenant_id=input.tenant_id,
                            alias=input.alias,
                            to_run_id=input.challenger.run_id,
                            reason=f"agent promote ({input.how}): {input.rationale[:200]}",
                            move_id=input.move_id,
                        ),
                        workflow_id,
                        workflow_run_id,
                    )
                    champion = input.challenger
                decision = "PROMOTE" if promote else "HOLD"
                await conn.execute(
                    "update demo_sessions set decision = $3, champion_run_id = $4"
                    " where tenant_id = $1 and workflow_run_id = $2",
                    input.tenant_id,
                    workflow_run_id,
                    f"{decision} ({note}): {input.rationale[:500]}",
                    uuid.UUID(champion.run_id),
                )
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        _maybe_fail(input)
        return DecisionApplyResult(
            decision=decision,
            promoted=promote,
            champion_run_id=champion.run_id,
            detail=(
                f"promoted {input.challenger.name} (WAPE {input.challenger.wape:.4f})"
                if promote
                else f"hold: champion {input.champion.name} stays ({note})"
            ),
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_record_eval")
    async def record_eval(self, input: EvalRecordInput) -> StepOutput:
        """Save the evaluation, and make its registry run demo-owned (reset cleans it)."""
        started = time.perf_counter()
        _, workflow_run_id = self._caller()
        ref = await self._put(input.tenant_id, input.session_prefix + "eval.json", input.summary)
        adopted = False
        run_id = input.summary.get("registry_run_id")
        if run_id:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                adopted = await registry.adopt_demo_run(
                    conn, input.tenant_id, str(run_id), workflow_run_id
                )
        _maybe_fail(input)
        return StepOutput(
            detail=f"evaluation saved to {ref.uri}"
            + (f"; run {str(run_id)[:8]} is demo-owned" if adopted else ""),
            work_ms=_ms(started),
        )

    # --- ops ------------------------------------------------------------------------

    @activity.defn(name="demo_verify")
    async def verify(self, input: VerifyInput) -> StepOutput:
        """The alias is on the champion (or a later run's move), its artifact verifies."""
        started = time.perf_counter()
        _, workflow_run_id = self._caller()
        try:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                state = await registry.alias_state(conn, input.tenant_id, input.alias)
                latest = await conn.fetchrow(
                    "select workflow_id, workflow_run_id from registry_alias_history"
                    " where tenant_id = $1 and alias = $2 and id > $3 order by id desc limit 1",
                    input.tenant_id,
                    input.alias,
                    input.history_mark,
                )
                run = await registry.get_run(conn, input.tenant_id, input.champion.run_id)
                assert run.artifact_uri is not None
                blob = await registry.load_artifact(
                    conn, input.tenant_id, run.artifact_uri, run.artifact_sha256
                )
        except KonstructError as exc:
            raise to_application_error(exc) from exc
        await _compute(forecasting.load_model, blob, run.artifact_sha256)
        if state.run_id == input.champion.run_id:
            where = f"{input.alias} on champion {run.name} ({run.run_id[:8]})"
        elif latest is not None and latest["workflow_run_id"] != workflow_run_id:
            where = (
                f"{input.alias} moved on by {latest['workflow_id']} after this run"
                f" (now {state.run_id})"
            )
        else:
            raise to_application_error(
                InvariantViolated(
                    f"{input.alias} points at {state.run_id}, not at the recorded champion "
                    f"{input.champion.run_id}, and no later move by another run explains it"
                )
            )
        _maybe_fail(input)
        return StepOutput(
            detail=f"{where}; artifact {run.artifact_uri} sha256 verified",
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_cleanup")
    async def cleanup(self, input: CleanupInput) -> StepOutput:
        """Delete this run's scratch data and model files; keep runs, scenarios, index."""
        started = time.perf_counter()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            data = await registry.delete_artifacts(
                conn, input.tenant_id, input.session_prefix + "data/"
            )
            models = await registry.delete_artifacts(
                conn, input.tenant_id, input.session_prefix + "models/"
            )
        _maybe_fail(input)
        return StepOutput(
            detail=f"deleted {data} data files and {models} scratch model files",
            work_ms=_ms(started),
        )

    @activity.defn(name="demo_finish")
    async def finish(self, input: FinishInput) -> StepOutput:
        _, workflow_run_id = self._caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await conn.execute(
                "update demo_sessions set status = $3, finished_at = now(),"
                " champion_run_id = $4, decision = coalesce($5, decision)"
                " where tenant_id = $1 and workflow_run_id = $2",
                input.tenant_id,
                workflow_run_id,
                input.status,
                None if input.champion_run_id is None else uuid.UUID(input.champion_run_id),
                input.decision,
            )
        return StepOutput(detail=f"session {input.status}")

    @activity.defn(name="demo_delete_prefix")
    async def delete_prefix(self, input: DeletePrefixInput) -> StepOutput:
        """A compensation: delete what a step wrote under its prefix."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            count = await registry.delete_artifacts(conn, input.tenant_id, input.prefix)
        return StepOutput(detail=f"deleted {count} files under {input.prefix}")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
