"""DemoCascade's registry steps: register runs, move the alias, check it, verify it.

Alias moves go through `konstruct.registry.store.move_alias` with a move id the
workflow chose, so a retried step finds its move already made.
"""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities.base import ActivityClass
from activities.demo_step import caller, compute, demo_step
from konstruct.demo import forecasting
from konstruct.demo import store as sessions
from konstruct.demo.models import (
    CompatInput,
    CompatResult,
    MoveOutput,
    PromoteInput,
    RegisteredRun,
    RegisterInput,
    RegisterResult,
    RegressionCheck,
    RegressionCheckInput,
    StaleCheckInput,
    StaleCheckResult,
    StepOutput,
    VerifyInput,
)
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import InvariantViolated
from konstruct.registry import store as registry
from konstruct.registry.models import MoveAliasInput, NewRun


def _stale_reason(check: registry.AliasCheck, alias: str, champion_run_id: str) -> str | None:
    if check.run_id is None:
        return "points at no run"
    if not check.run_found:
        return "its run is gone"
    if check.artifact_uri and check.stored_sha256 is None:
        return "its artifact is missing"
    if check.artifact_sha256 and check.stored_sha256 != check.artifact_sha256:
        return "its artifact hash changed"
    if check.alias == alias and check.run_id != champion_run_id:
        return "not on the recorded champion"
    return None


class DemoRegistryActivities(ActivityClass):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="demo_register")
    @demo_step
    async def register(self, input: RegisterInput) -> RegisterResult:
        """Copy each model file to its content-addressed URI and register a run for it."""
        scores = {s.name: s for s in input.scores}
        runs: list[RegisteredRun] = []
        new_runs: list[NewRun] = []
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await registry.lock_registry_writes(conn, input.tenant_id)
            for m in input.models:
                blob = await registry.load_artifact(
                    conn, input.tenant_id, m.artifact_uri, m.artifact_sha256
                )
                uri = await compute(forecasting.artifact_uri, m.model, m.artifact_sha256)
                await registry.store_artifact(conn, input.tenant_id, uri, blob)
                score = scores[m.name]
                run_id = input.run_ids[m.name]
                new_runs.append(
                    NewRun(
                        run_id=run_id,
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
                        run_id=run_id,
                        name=m.name,
                        model=m.model,
                        wape=score.wape,
                        artifact_uri=uri,
                        artifact_sha256=m.artifact_sha256,
                    )
                )
            await registry.insert_runs(conn, input.tenant_id, new_runs, *caller())
        return RegisterResult(
            runs=runs,
            detail=f"registered {len(runs)} runs: "
            + ", ".join(f"{r.name} -> {r.artifact_uri}" for r in runs),
        )

    @activity.defn(name="demo_compat_compare")
    @demo_step
    async def compat_compare(self, input: CompatInput) -> CompatResult:
        report = await compute(
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
        return CompatResult(compatible=compatible, detail=detail)

    async def _move(self, input: PromoteInput, record_champion: bool) -> MoveOutput:
        workflow_id, workflow_run_id = caller()
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
                await sessions.record_champion(
                    conn, input.tenant_id, workflow_run_id, input.champion.run_id
                )
        verb = "moved" if result.moved else "already on"
        return MoveOutput(
            moved=result.moved,
            from_run_id=result.from_run_id,
            to_run_id=result.to_run_id,
            detail=f"{input.alias} {verb} {input.champion.name} ({input.champion.run_id[:8]},"
            f" WAPE {input.champion.wape:.4f})",
        )

    @activity.defn(name="demo_promote")
    @demo_step
    async def promote(self, input: PromoteInput) -> MoveOutput:
        """Point the alias at the champion and record it as this run's champion."""
        return await self._move(input, record_champion=True)

    @activity.defn(name="demo_safer_promote_swap")
    @demo_step
    async def safer_promote_swap(self, input: PromoteInput) -> MoveOutput:
        """The trial swap of safer promote: the alias to a worse run (rolled back after)."""
        return await self._move(input, record_champion=False)

    @activity.defn(name="demo_stale_alias_check")
    @demo_step
    async def stale_alias_check(self, input: StaleCheckInput) -> StaleCheckResult:
        """Aliases pointing at nothing, at a run without its artifact, or off the champion."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            checks = await registry.check_aliases(conn, input.tenant_id)
        stale = [
            f"{c.alias}: {reason}"
            for c in checks
            if (reason := _stale_reason(c, input.alias, input.champion_run_id))
        ]
        return StaleCheckResult(
            checked=len(checks),
            stale=stale,
            detail=f"{len(checks)} aliases checked, {len(stale)} stale"
            + (f": {'; '.join(stale)}" if stale else ""),
        )

    @activity.defn(name="demo_check_regression")
    @demo_step
    async def check_regression(self, input: RegressionCheckInput) -> RegressionCheck:
        """Judge the run the trial swap put live against the champion; parse its artifact key.

        The run comes from the swap's history row, not from a re-read of the alias,
        so a re-executed check (after a worker crash) judges the same run.
        """
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            swap = await registry.find_move(conn, input.tenant_id, input.swap_move_id)
            state = await registry.alias_state(conn, input.tenant_id, input.alias)
            served = swap.to_run_id if swap is not None else state.run_id
            run = None if served is None else await registry.get_run(conn, input.tenant_id, served)
        alias_wape = None if run is None else run.metrics.get("wape")
        key_match = forecasting.ARTIFACT_KEY_PATTERN.search(run.artifact_uri or "") if run else None
        if run is not None and run.artifact_uri and key_match is None:
            raise InvariantViolated(
                f"the alias served run {run.run_id} whose artifact URI "
                f"{run.artifact_uri!r} does not parse as a model artifact key"
            )
        regressed = alias_wape is not None and alias_wape > input.champion.wape
        key = key_match.group(1) if key_match else None
        return RegressionCheck(
            alias_run_id=served,
            alias_wape=alias_wape,
            champion_wape=input.champion.wape,
            regressed=regressed,
            artifact_key=key,
            detail=(
                f"served WAPE {alias_wape if alias_wape is None else round(alias_wape, 4)}"
                f" vs champion {input.champion.wape:.4f}:"
                f" {'regression detected' if regressed else 'no regression'}"
                f" (artifact key {key or '-'})"
            ),
        )

    @activity.defn(name="demo_verify")
    @demo_step
    async def verify(self, input: VerifyInput) -> StepOutput:
        """The alias is on the champion (or a later run's move), its artifact verifies."""
        _, workflow_run_id = caller()
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            state = await registry.alias_state(conn, input.tenant_id, input.alias)
            latest = await registry.latest_move(conn, input.tenant_id, input.alias)
            run = await registry.get_run(conn, input.tenant_id, input.champion.run_id)
            assert run.artifact_uri is not None
            blob = await registry.load_artifact(
                conn, input.tenant_id, run.artifact_uri, run.artifact_sha256
            )
        await compute(forecasting.load_model, blob, run.artifact_sha256)
        moved_on = (
            latest is not None
            and latest.id > input.history_mark
            and latest.workflow_run_id != workflow_run_id
        )
        if state.run_id == input.champion.run_id:
            where = f"{input.alias} on champion {run.name} ({run.run_id[:8]})"
        elif moved_on:
            assert latest is not None
            where = (
                f"{input.alias} moved on by {latest.workflow_id} after this run"
                f" (now {state.run_id})"
            )
        else:
            raise InvariantViolated(
                f"{input.alias} points at {state.run_id}, not at the recorded champion "
                f"{input.champion.run_id}, and no later move by another run explains it"
            )
        return StepOutput(detail=f"{where}; artifact {run.artifact_uri} sha256 verified")
