"""HandleMessage: answer one inbound message for a tenant's agent.

The agent loop: each model step is a local activity that reads the message's
transcript from PostgreSQL and writes the model's answer there; each tool call
the model asks for is an activity of its own (several in one step run at once);
a tool marked `requires_approval` waits for the update `approve_tool` or
`reject_tool`. History holds ids and the final reply, never the transcript.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.agent import MODEL_ATTEMPTS, TOOL_ATTEMPTS, AgentActivities
    from activities.llm import LlmActivities
    from activities.messages import MessageActivities
    from konstruct.agents.models import (
        AgentContext,
        AgentStepInput,
        AgentStepResult,
        AnnounceInput,
        HandleMessageInput,
        HandleMessageResult,
        LoadAgentInput,
        PlannedCall,
        RunToolInput,
        StoreTurnInput,
        SummarizeInput,
        ToolDecision,
        ToolDecisionInput,
    )
    from konstruct.agents.prompts import build_messages
    from konstruct.platform.errors import (
        AnswerDoesNotFit,
        InputFailure,
        innermost_application_error,
        is_failure,
        workflow_failure,
    )
    from konstruct.platform.temporal.activity_options import (
        OUTAGE,
        LocalActivityOptions,
        retries,
    )
    from konstruct.platform.temporal.search_attributes import (
        KIND,
        STATUS,
        TENANT,
        start_search_attributes,
    )
    from konstruct.platform.temporal.validation import parse_input
    from konstruct.providers.models import LlmCallInput, LlmCallResult


# Local activities: a message is three short steps, and running them inside the
# workflow task cuts orchestration latency about 4x (on the dev server, p50
# 200 ms for three activities, 50 ms for three local activities).
# A database restart is survived by retrying, for up to two minutes. An unknown
# tenant or agent is not retried: its ApplicationError says non_retryable.
DB = LocalActivityOptions(
    start_to_close=timedelta(seconds=10),
    retry_policy=retries(timedelta(milliseconds=200), timedelta(seconds=5)),
    schedule_to_close=OUTAGE,
)
# litellm itself does not retry (num_retries 0) and falls back quality -> fast
# inside one attempt; Temporal retries the whole routed call this many times.
LLM_CALL = LocalActivityOptions(
    start_to_close=timedelta(seconds=120),
    retry_policy=retries(timedelta(seconds=1), timedelta(seconds=8), attempts=3),
)


# One model step: load the transcript, call the model, store its answer. The
# step gives up after MODEL_ATTEMPTS failed model calls (the fallback reply is
# stored then); a database outage is retried for OUTAGE beyond those calls.
MODEL_CALL_TIMEOUT = timedelta(seconds=120)
STEP = LocalActivityOptions(
    start_to_close=MODEL_CALL_TIMEOUT,
    retry_policy=retries(timedelta(seconds=1), timedelta(seconds=8)),
    schedule_to_close=MODEL_ATTEMPTS * MODEL_CALL_TIMEOUT + OUTAGE,
)
SUMMARY_TIMEOUT = timedelta(seconds=60)
SUMMARY = LocalActivityOptions(
    start_to_close=SUMMARY_TIMEOUT,
    retry_policy=retries(timedelta(seconds=1), timedelta(seconds=8)),
    schedule_to_close=MODEL_ATTEMPTS * SUMMARY_TIMEOUT + OUTAGE,
)
# A tool heartbeats every second: a worker killed mid-call is noticed in seconds.
TOOL_HEARTBEAT = timedelta(seconds=5)
AGENT_STEPS = "agent-steps"

# A local activity's failure reaches the workflow as the activity's own
# ApplicationError (not wrapped in ActivityError as a regular activity's is).
LOCAL_ACTIVITY_FAILURES = (ActivityError, ApplicationError)


@workflow.defn
class HandleMessage:
    def __init__(self) -> None:
        self._stage = "validating input"
        self._status = "running"
        self._step = 0
        self._tool_calls = 0
        # Calls waiting for a person, and the decisions that arrived for them.
        self._pending: dict[str, PlannedCall] = {}
        self._decisions: dict[str, tuple[bool, ToolDecision]] = {}

    @workflow.query
    def stage(self) -> str:
        return self._stage

    @workflow.query
    def progress(self) -> dict[str, Any]:
        return {
            "status": self._status,
            "stage": self._stage,
            "step": self._step,
            "tool_calls": self._tool_calls,
            "pending": [
                {
                    "call_id": call.call_id,
                    "tool": call.tool,
                    "arguments": call.preview,
                    "approval_timeout_s": call.approval_timeout_s,
                }
                for call in self._pending.values()
            ],
        }

    @workflow.update
    def approve_tool(self, decision: ToolDecision) -> str:
        self._decisions[decision.call_id] = (True, decision)
        return f"approved {decision.call_id}"

    @workflow.update
    def reject_tool(self, decision: ToolDecision) -> str:
        self._decisions[decision.call_id] = (False, decision)
        return f"rejected {decision.call_id}"

    @approve_tool.validator
    def _approve_pending(self, decision: ToolDecision) -> None:
        self._check_pending(decision)

    @reject_tool.validator
    def _reject_pending(self, decision: ToolDecision) -> None:
        self._check_pending(decision)

    def _check_pending(self, decision: ToolDecision) -> None:
        if decision.call_id not in self._pending or decision.call_id in self._decisions:
            waiting = ", ".join(self._pending) or "none"
            raise ApplicationError(
                f"no tool call {decision.call_id!r} is waiting for approval (waiting: {waiting})",
                type="NotPending",
                non_retryable=True,
            )

    def _set_status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([STATUS.value_set(status)])

    def _set_stage(self, stage: str, details: str = "") -> None:
        self._stage = stage
        workflow.set_current_details(f"**{stage}**\n\n{details}".strip())

    @workflow.run
    async def run(self, raw_input: dict[str, Any]) -> HandleMessageResult:
        # Validated here rather than by the converter, so a bad input fails the
        # workflow with InvalidInput instead of retrying a workflow task forever.
        message = parse_input(HandleMessageInput, raw_input, "HandleMessage")
        # A starter that set these (the gateway, `konstruct send`) saves the upsert:
        # one visibility write less per message. `temporal workflow start` does not.
        if start_search_attributes(message.tenant_id) != dict(
            (pair.key.name, pair.value) for pair in workflow.info().typed_search_attributes
        ):
            workflow.upsert_search_attributes(
                [
                    TENANT.value_set(message.tenant_id),
                    KIND.value_set("message"),
                    STATUS.value_set("running"),
                ]
            )
        if workflow.patched(AGENT_STEPS):
            return await self._agent_loop(message)
        return await self._single_call(message)

    async def _single_call(self, message: HandleMessageInput) -> HandleMessageResult:
        """The first version: one model call, no tools (histories recorded before the loop)."""
        self._set_stage("loading agent", f"{message.tenant_id}/{message.agent_id}")
        try:
            context: AgentContext = await DB.run(
                MessageActivities.load_agent_context,
                LoadAgentInput(**message.model_dump(include=set(LoadAgentInput.model_fields))),
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            workflow.upsert_search_attributes([STATUS.value_set("failed")])
            raise workflow_failure(err) from None
        if context.existing is not None:
            self._set_stage("already answered", "returned the stored reply")
            workflow.upsert_search_attributes([STATUS.value_set("completed")])
            return context.existing

        agent = context.agent
        self._set_stage("calling LLM", f"group `{agent.model_group}`")
        try:
            answer: LlmCallResult = await LLM_CALL.run(
                LlmActivities.call_llm,
                LlmCallInput(
                    model_group=agent.model_group,
                    messages=build_messages(agent, context.history, message.text),
                ),
            )
            result = HandleMessageResult.reply_to(
                message,
                response=answer.content,
                model_group=answer.model_group,
                model=answer.model,
                fallback_used=answer.fallback_used,
                degraded=False,
                usage=answer.usage,
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            workflow.logger.warning("every provider failed, answering the fallback: %s", err)
            result = HandleMessageResult.reply_to(
                message,
                response=agent.fallback_reply,
                model_group=agent.model_group,
                model="none",
                fallback_used=False,
                degraded=True,
            )

        self._set_stage("storing turn")
        stored: HandleMessageResult = await DB.run(
            MessageActivities.store_turn,
            StoreTurnInput(message=message, result=result, workflow_id=workflow.info().workflow_id),
        )
        status = "degraded" if stored.degraded else "completed"
        workflow.upsert_search_attributes([STATUS.value_set(status)])
        self._set_stage(
            status,
            f"model `{stored.model}` ({stored.model_group}), {stored.usage.total_tokens} tokens",
        )
        return stored

    # --- the agent loop --------------------------------------------------------

    async def _agent_loop(self, message: HandleMessageInput) -> HandleMessageResult:
        workflow_id = workflow.info().workflow_id
        step = 0
        summarize = False
        while True:
            self._step = step
            self._set_stage("thinking", f"step {step + 1}")
            try:
                result: AgentStepResult = await STEP.run(
                    AgentActivities.agent_step,
                    AgentStepInput(
                        tenant_id=message.tenant_id,
                        message_id=message.message_id,
                        step=step,
                        workflow_id=workflow_id,
                        message=message if step == 0 else None,
                        stream=message.stream,
                        response_format=message.response_format,
                    ),
                    summary=f"step {step + 1}",
                )
            except LOCAL_ACTIVITY_FAILURES as err:
                cause = innermost_application_error(err)
                # No retry and no fallback reply can fix it: the workflow fails.
                if is_failure(cause, InputFailure, AnswerDoesNotFit):
                    self._set_status("failed")
                    raise workflow_failure(err) from None
                workflow.logger.warning("every provider failed, answering the fallback: %s", err)
                reply = await self._fallback(message, step, workflow_id)
                break
            if result.reply is not None:
                reply, summarize = result.reply, result.summarize
                break
            await self._run_calls(message, result.calls)
            step += 1
        if summarize:
            await self._summarize(message)
        status = "degraded" if reply.degraded else "completed"
        self._set_status(status)
        self._set_stage(
            status,
            f"model `{reply.model}` ({reply.model_group}), {reply.steps} step(s), "
            f"{reply.tool_calls} tool call(s), {reply.usage.total_tokens} tokens",
        )
        return reply

    async def _run_calls(self, message: HandleMessageInput, calls: list[PlannedCall]) -> None:
        """Run a step's tool calls at once; those needing a person wait for one first."""
        self._tool_calls += len(calls)
        waiting = [c for c in calls if c.requires_approval]
        if waiting:
            for call in waiting:
                self._pending[call.call_id] = call
            self._show_pending()
            await DB.run(
                AgentActivities.announce_approval,
                AnnounceInput(tenant_id=message.tenant_id, workflow_id=workflow.info().workflow_id),
            )
        else:
            self._set_stage("calling tools", ", ".join(f"`{c.tool}`" for c in calls))
        await asyncio.gather(*(self._call(message, call) for call in calls))

    def _show_pending(self) -> None:
        if not self._pending:
            self._set_status("running")
            return
        self._set_status("awaiting_approval")
        lines = [
            f"- `{c.tool}` call `{c.call_id}`: {c.preview}\n"
            f"  `konstruct approvals approve {workflow.info().workflow_id} {c.call_id}`"
            for c in self._pending.values()
        ]
        self._set_stage("awaiting approval", "\n".join(lines))

    async def _call(self, message: HandleMessageInput, call: PlannedCall) -> None:
        approved_by = ""
        if call.requires_approval:
            try:
                await workflow.wait_condition(
                    lambda: call.call_id in self._decisions,
                    timeout=timedelta(seconds=call.approval_timeout_s),
                )
                approved, decision = self._decisions[call.call_id]
            except TimeoutError:
                approved, decision = False, None
            del self._pending[call.call_id]
            self._show_pending()
            if not approved:
                if decision is None:
                    status, note, by = (
                        "timed_out",
                        f"No one approved this call within {call.approval_timeout_s:g} s; "
                        "it was not run.",
                        "",
                    )
                else:
                    reason = f": {decision.reason}" if decision.reason else "."
                    status, note, by = (
                        "rejected",
                        f"A person rejected this call{reason}",
                        decision.by,
                    )
                await self._record(message, call, status, note, by)
                return
            approved_by = decision.by if decision is not None else ""
            if self._status == "running" and not self._pending:
                self._set_stage("calling tools", f"`{call.tool}` (approved)")
        # The tool's own failures end after TOOL_ATTEMPTS (the activity counts them);
        # a database outage is retried for OUTAGE beyond those attempts.
        attempt_timeout = timedelta(seconds=call.timeout_s + 5)
        try:
            await workflow.execute_activity_method(
                AgentActivities.run_tool,
                RunToolInput(
                    tenant_id=message.tenant_id,
                    message_id=message.message_id,
                    call_id=call.call_id,
                    approved_by=approved_by,
                    stream_to=workflow.info().workflow_id if message.stream else "",
                ),
                start_to_close_timeout=attempt_timeout,
                schedule_to_close_timeout=TOOL_ATTEMPTS * attempt_timeout + OUTAGE,
                heartbeat_timeout=TOOL_HEARTBEAT,
                retry_policy=retries(timedelta(seconds=1), timedelta(seconds=10)),
                summary=f"{call.tool} {call.call_id}",
            )
        except ActivityError as err:
            # Out of attempts without an answer (a timeout, a dead worker): the model is told.
            cause = innermost_application_error(err)
            note = cause.message if cause is not None else str(err.cause or err)
            await self._record(message, call, "error", f"error: the tool failed: {note}", "")

    async def _record(
        self, message: HandleMessageInput, call: PlannedCall, status: str, note: str, by: str
    ) -> None:
        await DB.run(
            AgentActivities.record_tool_decision,
            ToolDecisionInput(
                tenant_id=message.tenant_id,
                message_id=message.message_id,
                call_id=call.call_id,
                status=status,  # type: ignore[arg-type]
                note=note,
                decided_by=by,
            ),
        )

    async def _fallback(
        self, message: HandleMessageInput, step: int, workflow_id: str
    ) -> HandleMessageResult:
        self._set_stage("storing turn", "every provider failed: the agent's fallback reply")
        placeholder = HandleMessageResult.reply_to(
            message,
            response="",
            model_group="",
            model="none",
            fallback_used=False,
            degraded=True,
            steps=step + 1,
            tool_calls=self._tool_calls,
        )
        return await DB.run(
            AgentActivities.store_fallback,
            StoreTurnInput(message=message, result=placeholder, workflow_id=workflow_id),
        )

    async def _summarize(self, message: HandleMessageInput) -> None:
        """Fold the thread's older turns into its summary; the reply is stored already,
        so a failure here only delays the summary to the next message."""
        self._set_stage("summarising the thread", message.thread_id)
        try:
            await SUMMARY.run(
                AgentActivities.summarize_thread,
                SummarizeInput(
                    tenant_id=message.tenant_id,
                    thread_id=message.thread_id,
                    agent_id=message.agent_id,
                ),
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            workflow.logger.warning("thread summary failed, kept for the next message: %s", err)
