"""DemoCascade's registry steps: register the runs, compare, promote the champion, the safer promote, verify.

`promote` records the best baseline as this run's champion: the saga's pivot,
after which the alias belongs on it and the promote move is not undone.
"""

from __future__ import annotations

from temporalio import workflow

from workflows.demo_cascade._options import BASELINES, Outcome
from workflows.demo_cascade._saga import Compensating

with workflow.unsafe.imports_passed_through():
    from activities.demo_registry import DemoRegistryActivities
    from konstruct.demo import models as dm
    from konstruct.demo.models import RegisteredRun, StepContext
    from konstruct.platform.errors import RegressionNotDetected, to_application_error


class RegistrySteps(Compensating):
    def _v1_runs(self) -> list[RegisteredRun]:
        """The baseline runs, best first: what `promote` chooses the champion from."""
        return sorted(
            (r for r in self._handoff.runs if r.name in BASELINES), key=lambda r: (r.wape, r.name)
        )

    async def _register_runs(self, step: StepContext) -> Outcome:
        run_ids = {m.name: str(workflow.uuid4()) for m in self._handoff.models}
        self._push_discard(
            step.name, "discard registered runs", "register_runs:discard", list(run_ids.values())
        )
        result = await self._step(
            DemoRegistryActivities.register,
            step,
            dm.RegisterInput,
            models=self._handoff.models,
            scores=self._handoff.scores,
            run_ids=run_ids,
            seed=self._input.seed,
            scenario=self._input.scenario,
        )
        self._handoff.runs = result.runs
        return Outcome.of(result)

    async def _compat_compare(self, step: StepContext) -> Outcome:
        v1 = self._v1_runs()[0]
        v2 = next(r for r in self._handoff.runs if r.model == "trend_seasonal_v2")
        return await self._report(
            DemoRegistryActivities.compat_compare, step, dm.CompatInput, v1=v1, v2=v2
        )

    async def _promote(self, step: StepContext) -> Outcome:
        best = self._v1_runs()[0]
        self._alias_touched = True
        self._push_undo_move(
            step.name,
            "undo the promote move",
            "promote",
            "undo promote (step failed)",
        )
        result = await self._step(
            DemoRegistryActivities.promote,
            step,
            dm.PromoteInput,
            champion=best,
            move_id=self._move_id("promote"),
            reason=f"promote champion {best.name} (WAPE {best.wape:.4f})",
        )
        # The pivot: the champion is recorded and the alias stays on it.
        self._champion = best
        self._alias_run_id = best.run_id
        self._saga.drop("promote")
        return Outcome.of(result)

    async def _stale_alias_check(self, step: StepContext) -> Outcome:
        assert self._champion is not None
        return await self._report(
            DemoRegistryActivities.stale_alias_check,
            step,
            dm.StaleCheckInput,
            champion_run_id=self._champion.run_id,
        )

    async def _safer_promote(self, step: StepContext) -> Outcome:
        assert self._champion is not None
        worse = self._v1_runs()[-1]
        self._push_undo_move(
            step.name,
            "undo the swap to the worse run",
            "safer-swap",
            "undo the trial swap (run ended)",
        )
        swap = await self._step(
            DemoRegistryActivities.safer_promote_swap,
            step,
            dm.PromoteInput,
            part="swap",
            champion=worse,
            move_id=self._move_id("safer-swap"),
            reason=f"safer promote: trial swap to {worse.name} (WAPE {worse.wape:.4f})",
        )
        check = await self._step(
            DemoRegistryActivities.check_regression,
            step.without_injection(),
            dm.RegressionCheckInput,
            part="detect",
            champion=self._champion,
            swap_move_id=self._move_id("safer-swap"),
        )
        rollback = await self._undo_move("safer-swap", "safer promote: regression, roll back")
        self._saga.drop("safer-swap")
        if not check.regressed:
            # Raised by the workflow itself, so mapped here rather than by the interceptor.
            raise to_application_error(
                RegressionNotDetected(
                    f"safer promote swapped to {worse.name} but the check saw no regression "
                    f"({check.detail})"
                )
            )
        return Outcome(
            detail=f"{swap.detail}; {check.detail}; rollback: {rollback.detail}",
            work_ms=swap.work_ms + check.work_ms,
        )

    async def _verify(self, step: StepContext) -> Outcome:
        assert self._champion is not None
        return await self._report(
            DemoRegistryActivities.verify,
            step,
            dm.VerifyInput,
            champion=self._champion,
            history_mark=self._history_mark,
        )
