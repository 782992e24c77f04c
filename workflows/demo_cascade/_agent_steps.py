"""DemoCascade's planning and agent steps: scenarios, the RAG index, the agent's decision
(with a person's approval when asked for) and its evaluation by an Experiment child."""

from __future__ import annotations

from typing import Any, Literal

from temporalio import workflow

from workflows.demo_cascade._options import (
    APPROVAL_TIMEOUT,
    BASELINES,
    CHILD_EXECUTION_TIMEOUT,
    COMPENSATION,
    LLM_CALL,
    Outcome,
)
from workflows.demo_cascade._saga import Compensating

with workflow.unsafe.imports_passed_through():
    from activities.demo_agent import DemoAgentActivities
    from activities.demo_data import DemoDataActivities
    from activities.llm import LlmActivities
    from activities.registry import RegistryActivities
    from konstruct.demo import content as demo_content
    from konstruct.demo import models as dm
    from konstruct.demo.models import (
        DEMO_TENANT,
        SCENARIO_SIZES,
        Decision,
        PendingApproval,
        RegisteredRun,
        StepContext,
    )
    from konstruct.experiments.models import ExperimentResult
    from konstruct.platform.naming import registry_run_id
    from konstruct.providers.models import ChatTurn, LlmCallInput, LlmCallResult
    from konstruct.registry.models import DiscardRunsInput
    from workflows.experiment import Experiment


class AgentSteps(Compensating):
    # --- planning and knowledge ------------------------------------------------------

    async def _scenario_simulate_and_save(self, step: StepContext) -> Outcome:
        assert self._champion is not None and self._handoff.features is not None
        # Plans come from the recorded champion, never from whatever the live alias points at.
        result = await self._step(
            DemoDataActivities.scenario_simulate_and_save,
            step,
            dm.ScenarioInput,
            deletes=("saved scenarios", "scenarios/"),
            champion=self._champion,
            features=self._handoff.features,
            horizon=SCENARIO_SIZES["showcase_rich"].horizon,
        )
        self._handoff.plans = result.plans
        return Outcome.of(result)

    async def _plan_compare(self, step: StepContext) -> Outcome:
        return await self._report(
            DemoDataActivities.plan_compare, step, dm.PlanCompareInput, plans=self._handoff.plans
        )

    async def _rag_index(self, step: StepContext) -> Outcome:
        result = await self._step(
            DemoAgentActivities.rag_index,
            step,
            dm.RagInput,
            deletes=("RAG index", "rag/"),
            question=demo_content.RAG_QUESTION,
        )
        return Outcome(
            status="skip" if result.skipped else "pass",
            detail=result.detail,
            work_ms=result.work_ms,
        )

    # --- the agent -------------------------------------------------------------------

    async def _agent_decision(self, step: StepContext) -> Outcome:
        assert self._handoff.precheck is not None and self._champion is not None
        champion = self._champion
        challenger = self._challenger()
        group = self._handoff.precheck.agent_group
        work_ms = 0.0
        if group is None:
            proposal: Decision = "HOLD"
            rationale = "no chat model is configured, so nothing can be proposed"
        else:
            # call_llm does not time itself: its work is its span as this workflow sees it.
            asked = workflow.now()
            answer: LlmCallResult = await self._local(
                LlmActivities.call_llm,
                LlmCallInput(
                    model_group=group,
                    messages=[
                        ChatTurn(role="system", content=demo_content.AGENT_SYSTEM_PROMPT),
                        ChatTurn(
                            role="user", content=demo_content.agent_prompt(champion, challenger)
                        ),
                    ],
                    temperature=0,
                ),
                LLM_CALL,
                summary="agent_decision: propose",
            )
            work_ms = (workflow.now() - asked).total_seconds() * 1000
            proposal, rationale = demo_content.parse_proposal(answer.content)
        self._handoff.rationale = rationale
        approved, how = True, "auto approval"
        if self._input.approval == "manual":
            approved, how = await self._wait_for_approval(proposal, rationale, challenger)
        if proposal == "PROMOTE" and approved:
            self._alias_touched = True
            self._push_undo_move(
                step.name,
                "undo the agent's promote",
                "agent-promote",
                "undo agent promote",
            )
        result = await self._step(
            DemoAgentActivities.apply_decision,
            step,
            dm.DecisionApplyInput,
            part="apply",
            proposal=proposal,
            approved=approved,
            how=how,
            rationale=rationale,
            champion=champion,
            challenger=challenger,
            move_id=self._move_id("agent-promote"),
        )
        self._decision = result.decision
        if result.promoted:
            # A second pivot: the challenger is the recorded champion now.
            self._champion = challenger
            self._alias_run_id = challenger.run_id
        self._saga.drop("agent-promote")
        return Outcome(
            detail=f"agent proposed {proposal} ({how}): {rationale[:200]} | {result.detail}",
            work_ms=work_ms + result.work_ms,
        )

    def _challenger(self) -> RegisteredRun:
        """The best run that is not a baseline (v2, the sweep's best), else the runner-up."""
        assert self._champion is not None
        ranked = sorted(
            (r for r in self._handoff.runs if r.run_id != self._champion.run_id),
            key=lambda r: (r.name in BASELINES, r.wape, r.name),
        )
        return ranked[0] if ranked else self._champion

    def _answer_approval(
        self, answer: Literal["approve", "reject"], input: dm.ApprovalSignal | None
    ) -> None:
        who = f" by {input.by}" if input and input.by else ""
        if self._pending is None or self._answer is not None:
            self._note(f"{answer}{who} ignored: no decision is waiting for approval")
            return
        self._answer = answer
        self._note(f"{answer}{who} received")

    async def _wait_for_approval(
        self, proposal: Decision, rationale: str, challenger: RegisteredRun
    ) -> tuple[bool, str]:
        assert self._champion is not None
        self._pending = PendingApproval(
            proposal=proposal,
            rationale=rationale,
            champion_run_id=self._champion.run_id,
            challenger_run_id=challenger.run_id,
            champion_wape=self._champion.wape,
            challenger_wape=challenger.wape,
            deadline=workflow.now() + APPROVAL_TIMEOUT,
        )
        self._answer = None
        self._set_status("awaiting_approval")
        try:
            await workflow.wait_condition(
                lambda: self._answer is not None,
                timeout=APPROVAL_TIMEOUT,
                timeout_summary="approval deadline",
            )
        except TimeoutError:
            self._note(f"no answer within {APPROVAL_TIMEOUT.total_seconds():.0f} s: hold")
            return False, f"no answer within {APPROVAL_TIMEOUT.total_seconds():.0f} s, hold"
        finally:
            self._pending = None
            if self._status == "awaiting_approval":
                self._set_status("running")
        if self._answer == "approve":
            return True, "approved by signal"
        return False, "rejected by signal"

    async def _agent_eval(self, step: StepContext) -> Outcome:
        """A short Experiment child scores the agent's rationale; the record step carries fail_at."""
        assert self._handoff.precheck is not None
        group, judge = self._handoff.precheck.agent_group, self._handoff.precheck.judge_group
        rationale = self._handoff.rationale
        experiment_id = f"demo-eval-{workflow.info().run_id}"
        summary: dict[str, Any] = {"experiment_id": experiment_id, "rationale": rationale}
        status: Literal["pass", "skip"] = "pass"
        if group is None or judge is None:
            status = "skip"
            detail = "skipped: no chat or judge model group is configured"
        else:
            run_id = registry_run_id(DEMO_TENANT, experiment_id)

            async def discard() -> str:
                result = await self._local(
                    RegistryActivities.discard_runs,
                    DiscardRunsInput(tenant_id=DEMO_TENANT, run_ids=[run_id]),
                    COMPENSATION,
                )
                return f"discarded {len(result.deleted)} evaluation run"

            self._saga.push(step.name, "discard the evaluation's registry run", "eval", discard)
            evaluated: ExperimentResult = await workflow.execute_child_workflow(
                Experiment.run,
                demo_content.evaluation(
                    experiment_id, group, judge, rationale, self._decision
                ).model_dump(mode="json", exclude_none=True),
                id=f"{workflow.info().workflow_id}-eval",
                execution_timeout=CHILD_EXECUTION_TIMEOUT,
                cancellation_type=workflow.ChildWorkflowCancellationType.TRY_CANCEL,
                static_summary=f"evaluate the agent's rationale for {workflow.info().workflow_id}",
            )
            recorded, detail = demo_content.evaluation_report(experiment_id, evaluated)
            summary.update(recorded)
        result = await self._step(
            DemoAgentActivities.record_eval,
            step,
            dm.EvalRecordInput,
            part="record",
            summary=summary,
        )
        return Outcome(status=status, detail=f"{detail} | {result.detail}", work_ms=result.work_ms)
