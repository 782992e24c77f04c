"""Agent experiments: one item of an experiment, run through the tenant's agent.

The item is a conversation (its input, then its `turns`), each user turn a message
to the agent in a thread of the item's own, answered by the same agent loop a
message gets (`AgentActivities.step`: prompt building, memory, knowledge, tools,
response format) before the next turn is sent. What differs is where the model
and the tools answer from:

- every model call goes through the experiment's provider pipeline
  (`ProviderCallActivities`: breaker, budget hold, a slot on the provider's shared
  schedule, learning from the answer), so an agent experiment shares the adaptive
  limit, the breakers, the budgets and the fairness of prompt experiments;
- `calculator` and `knowledge_search` run live; a tool with side effects answers
  from the item's `tool_results` unless the task says `tools: live`; a call that
  needs approval is approved or rejected by the task's `approvals` policy.

Every step and tool call is stored in PostgreSQL as a message's are, so an attempt
after a crash walks the stored steps again without calling the model for them and
goes on from the first step not stored. The workflow sees one activity per item;
the transcript is stored with the result, never in history.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio import activity

from activities.agent import AgentActivities
from activities.base import finishing_once_started
from activities.call_results import Answer, run_result
from activities.provider_calls import ProviderCallActivities, ProviderRequest, _stopping
from konstruct.agents.models import (
    AgentProfile,
    AgentStepInput,
    HandleMessageInput,
    PlannedCall,
    RunToolInput,
)
from konstruct.agents.store import steps as agent_store
from konstruct.agents.store.agents import _stored_turn
from konstruct.agents.tools import AddressPolicy
from konstruct.experiments.evals import score_local
from konstruct.experiments.models import RunItemInput, RunItemResult, TaskSpec, eval_name
from konstruct.experiments.store import experiments as store
from konstruct.experiments.store import results
from konstruct.experiments.store.budgets import SpendFlags
from konstruct.experiments.trajectory import (
    READ_ONLY_TOOLS,
    ToolFixture,
    Transcript,
    TranscriptCall,
    TranscriptStep,
    TranscriptTurn,
    conversation,
    fixture_for,
    fixture_text,
    fixtures,
    score_trajectory,
)
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import NotFound
from konstruct.providers.adapter import Completion, ProviderFailure
from konstruct.providers.control import BreakerState
from konstruct.providers.pricing import cost_usd, price_of
from konstruct.providers.router import Deployment, RouterConfig

# Who answered an approval during an experiment.
POLICY = "experiment approvals policy"


@dataclass
class _ItemCalls:
    """The model calls of the item in progress: where they go, and what they cost."""

    provider: str
    deployment: Deployment
    experiment: tuple[str, str]
    breaker: BreakerState | None
    spend: SpendFlags
    answers: list[Answer] = field(default_factory=list)


_current: contextvars.ContextVar[_ItemCalls] = contextvars.ContextVar("agent_item_calls")


class _Rejected(Exception):
    """The provider will never accept a step's request (400, 401...): the item fails."""

    def __init__(self, failure: ProviderFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class ExperimentAgentSteps(AgentActivities):
    """The agent loop's steps and tools, with each model call made through the
    experiment's provider pipeline instead of the Router."""

    def __init__(
        self,
        calls: ProviderCallActivities,
        pool: asyncpg.Pool,
        router: Any,
        config: RouterConfig,
        address_policy: AddressPolicy | None = None,
    ) -> None:
        super().__init__(pool, router, config, address_policy=address_policy)
        self.calls = calls

    async def _month_spent(self, conn: asyncpg.Connection, tenant: str) -> str | None:
        # The experiment's budget hold asks the tenant's month before each call (a
        # spent month pauses the experiment, as for a prompt experiment's calls).
        return None

    def _cost(self, answer: Completion) -> float:
        # Settling the hold counts the call to the experiment and to the tenant's
        # month: counted here too, the month would hold every call twice.
        return 0.0

    async def _complete(
        self,
        input: AgentStepInput,
        agent: AgentProfile,
        messages: list[dict[str, Any]],
        offered: list[dict[str, Any]],
        wanted: dict[str, Any] | None,
    ) -> Completion:
        item = _current.get()
        request = ProviderRequest(
            item.provider,
            item.deployment,
            messages,
            None,
            item.experiment,
            tools=offered or None,
            response_format=wanted,
        )
        answer = await self.calls._provider_call(request, item.breaker, item.spend)
        item.answers.append(answer)
        if answer.completion is None:
            assert answer.rejected is not None
            raise _Rejected(answer.rejected)
        return answer.completion


class AgentItemActivities:
    """Runs on the provider's queue, beside `ProviderCallActivities`' activities."""

    def __init__(self, calls: ProviderCallActivities, steps: ExperimentAgentSteps) -> None:
        self.calls = calls
        self.steps = steps
        self.pool = calls.pool

    @activity.defn(name="experiment_agent_item")
    @finishing_once_started
    async def run_agent_item(self, input: RunItemInput) -> RunItemResult:
        """One item through the agent, every turn; its transcript, evals and result, once."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self.calls._spec(conn, input.tenant_id, input.experiment_id)
            item = await results.task_call(conn, self.calls._ref(input))
        if item is None:
            raise NotFound(f"item {input.item_id!r} is not in experiment {input.experiment_id!r}")
        if item.result is not None:
            return run_result(input.item_id, item.result, spec, fresh=False)
        if item.stop_requested:
            raise _stopping()
        where = f"item {input.item_id!r}"
        turns = conversation(item.input, item.metadata, where)
        found = fixtures(item.metadata, where)
        calls = _ItemCalls(
            input.provider,
            self.calls._deployment(input.deployment_id),
            (input.tenant_id, input.experiment_id),
            item.breaker,
            item.spend,
        )
        token = _current.set(calls)
        started = time.perf_counter()
        rejected: ProviderFailure | None = None
        try:
            await self._converse(input, spec.task, turns, found)
        except _Rejected as exc:
            rejected = exc.failure
        finally:
            _current.reset(token)
        latency = (time.perf_counter() - started) * 1000
        transcript, usage = await self._transcript(input, spec.task, turns)
        new = _new_result(spec, item, transcript, usage, calls, rejected, input, latency)
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            stored = await results.store_result(
                conn, input.tenant_id, input.experiment_id, input.item_id, new
            )
        return run_result(input.item_id, stored, spec, fresh=True, new=new)

    async def _converse(
        self, input: RunItemInput, task: TaskSpec, turns: list[str], found: list[ToolFixture]
    ) -> None:
        """Each user turn as a message to the agent, answered before the next is sent."""
        assert task.agent is not None
        thread = thread_id(input.experiment_id, input.item_id)
        for number, text in enumerate(turns, 1):
            message = HandleMessageInput(
                message_id=f"{thread}:t{number}",
                tenant_id=input.tenant_id,
                agent_id=task.agent,
                thread_id=thread,
                channel="experiment",
                sender="experiment",
                text=text,
            )
            step = 0
            while True:
                result = await self.steps.step(
                    AgentStepInput(
                        tenant_id=input.tenant_id,
                        message_id=message.message_id,
                        step=step,
                        workflow_id=activity.info().workflow_id or "",
                        message=message if step == 0 else None,
                    )
                )
                if result.reply is not None:
                    break
                for planned in result.calls:
                    await self._tool(input.tenant_id, message.message_id, planned, task, found)
                step += 1

    async def _tool(
        self,
        tenant: str,
        message_id: str,
        planned: PlannedCall,
        task: TaskSpec,
        found: list[ToolFixture],
    ) -> None:
        """One tool call: by the approvals policy, live, or from the item's fixtures."""
        async with tenant_transaction(self.pool, tenant) as conn:
            call = await agent_store.call(conn, tenant, message_id, planned.call_id)
        if call is None or call.status in agent_store.TERMINAL:
            return  # stored by an earlier attempt
        approved_by = ""
        if planned.requires_approval:
            if task.approvals == "reject":
                await self._finish(
                    tenant,
                    message_id,
                    call.call_id,
                    "rejected",
                    "A person rejected this call: the experiment's approvals policy is `reject`.",
                    POLICY,
                )
                return
            approved_by = POLICY
        if task.tools == "live" or call.tool in READ_ONLY_TOOLS:
            await self.steps.run_call(
                RunToolInput(
                    tenant_id=tenant,
                    message_id=message_id,
                    call_id=call.call_id,
                    approved_by=approved_by,
                )
            )
            return
        fixture = fixture_for(found, call.tool, call.arguments)
        if fixture is None:
            status, text = (
                "error",
                f"error: no fixture for tool {call.tool!r} with these arguments in the"
                " item's tool_results (an experiment runs tools with side effects only"
                " with tools: live)",
            )
        else:
            status, text = "ok", fixture_text(fixture)
        await self._finish(tenant, message_id, call.call_id, status, text, approved_by)

    async def _finish(
        self, tenant: str, message_id: str, call_id: str, status: str, text: str, by: str
    ) -> None:
        async with tenant_transaction(self.pool, tenant) as conn:
            await agent_store.finish_call(conn, tenant, message_id, call_id, status, text, by)

    async def _transcript(
        self, input: RunItemInput, task: TaskSpec, turns: list[str]
    ) -> tuple[Transcript, tuple[int, int]]:
        """The item's turns as stored: each step's text and tool calls, each reply; and
        the prompt and completion tokens of every stored step (an attempt before a
        crash included: each step was paid for once)."""
        thread = thread_id(input.experiment_id, input.item_id)
        tenant = input.tenant_id
        told: list[TranscriptTurn] = []
        prompt_tokens = completion_tokens = 0
        async with tenant_transaction(self.pool, tenant) as conn:
            for number, text in enumerate(turns, 1):
                message_id = f"{thread}:t{number}"
                stored_steps = await agent_store.steps(conn, tenant, message_id)
                stored_calls = await agent_store.calls(conn, tenant, message_id)
                prompt_tokens += sum(s.usage.get("prompt_tokens", 0) for s in stored_steps)
                completion_tokens += sum(s.usage.get("completion_tokens", 0) for s in stored_steps)
                turn = await _stored_turn(conn, tenant, message_id)
                told.append(
                    TranscriptTurn(
                        user=text,
                        reply=turn.response if turn is not None else "",
                        steps=[
                            TranscriptStep(
                                step=s.step,
                                content=str(s.assistant.get("content") or ""),
                                model=s.model,
                                calls=[
                                    _told_call(c, task) for c in stored_calls if c.step == s.step
                                ],
                            )
                            for s in stored_steps
                        ],
                    )
                )
                if turn is None:
                    break  # a turn that failed ends the conversation
        return Transcript(turns=told), (prompt_tokens, completion_tokens)


def thread_id(experiment_id: str, item_id: str) -> str:
    """The item's own thread (an item of each epoch has its own id): no item sees
    another's memory. Long ids are hashed to fit a message id."""
    thread = f"x:{experiment_id}:{item_id}"
    if len(thread) > 180:
        thread = "x:" + hashlib.sha256(thread.encode()).hexdigest()[:40]
    return thread


def _told_call(call: agent_store.StoredCall, task: TaskSpec) -> TranscriptCall:
    if call.status == "rejected":
        source = POLICY
    elif task.tools == "live" or call.tool in READ_ONLY_TOOLS:
        source = "live"
    else:
        source = "fixture"
    return TranscriptCall(
        call_id=call.call_id,
        tool=call.tool,
        arguments=call.arguments,
        status=call.status,
        result=call.result or "",
        source=source,
    )


def _new_result(
    spec: store.StoredSpec,
    item: results.TaskCall,
    transcript: Transcript,
    usage: tuple[int, int],
    calls: _ItemCalls,
    rejected: ProviderFailure | None,
    input: RunItemInput,
    latency_ms: float,
) -> results.NewResult:
    """The item's result row: its last reply scored by the deterministic evals, its
    transcript by the trajectory evals (a failed item is not scored); its tokens
    and cost those of every stored step."""
    scores: dict[str, Any] = {}
    reply = transcript.final_answer
    if rejected is None:
        for spec_eval in spec.evals:
            if spec_eval.kind == "llm_judge":
                continue
            if spec_eval.kind in ("tool_called", "tool_not_called", "max_steps", "final_answer"):
                score = score_trajectory(spec_eval, transcript, item.expected)
            else:
                score = score_local(spec_eval, reply, item.expected)
            scores[eval_name(spec_eval)] = score.as_json()
    completions = [a.completion for a in calls.answers if a.completion is not None]
    last = completions[-1] if completions else None
    price = price_of(calls.deployment)
    return results.NewResult(
        seq=item.seq,
        status="failed" if rejected is not None else "ok",
        output=reply if rejected is None else None,
        scores=scores,
        evaluated=rejected is not None or not spec.judges,
        latency_ms=latency_ms,
        model=last.model if last is not None else None,
        deployment_id=input.deployment_id,
        provider=input.provider,
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        error_kind=rejected.kind if rejected is not None else None,
        error=rejected.message if rejected is not None else None,
        attempt=activity.info().attempt,
        cost_usd=None if price is None else cost_usd(price, *usage),
        transcript=transcript.model_dump(),
    )
