"""HandleMessage: answer one inbound message for a tenant's agent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.llm import LlmActivities
    from activities.messages import MessageActivities
    from konstruct.activity_options import LocalActivityOptions, retries
    from konstruct.errors import workflow_failure
    from konstruct.models import (
        AgentContext,
        HandleMessageInput,
        HandleMessageResult,
        LlmCallInput,
        LlmCallResult,
        LoadAgentInput,
        StoreTurnInput,
    )
    from konstruct.prompts import build_messages
    from konstruct.search_attributes import KIND, STATUS, TENANT
    from konstruct.validation import parse_input


# Local activities: a message is three short steps, and running them inside the
# workflow task cuts orchestration latency about 4x (on the dev server, p50
# 200 ms for three activities, 50 ms for three local activities).
# A database restart is survived by retrying, for up to two minutes. An unknown
# tenant or agent is not retried: its ApplicationError says non_retryable.
DB = LocalActivityOptions(
    start_to_close=timedelta(seconds=10),
    retry_policy=retries(timedelta(milliseconds=200), timedelta(seconds=5)),
    schedule_to_close=timedelta(minutes=2),
)
# litellm itself does not retry (num_retries 0) and falls back quality -> fast
# inside one attempt; Temporal retries the whole routed call this many times.
LLM_CALL = LocalActivityOptions(
    start_to_close=timedelta(seconds=120),
    retry_policy=retries(timedelta(seconds=1), timedelta(seconds=8), attempts=3),
)


# A local activity's failure reaches the workflow as the activity's own
# ApplicationError (not wrapped in ActivityError as a regular activity's is).
LOCAL_ACTIVITY_FAILURES = (ActivityError, ApplicationError)


@workflow.defn
class HandleMessage:
    def __init__(self) -> None:
        self._stage = "validating input"

    @workflow.query
    def stage(self) -> str:
        return self._stage

    def _set_stage(self, stage: str, details: str = "") -> None:
        self._stage = stage
        workflow.set_current_details(f"**{stage}**\n\n{details}".strip())

    @workflow.run
    async def run(self, raw_input: dict[str, Any]) -> HandleMessageResult:
        # Validated here rather than by the converter, so a bad input fails the
        # workflow with InvalidInput instead of retrying a workflow task forever.
        message = parse_input(HandleMessageInput, raw_input, "HandleMessage")
        workflow.upsert_search_attributes(
            [
                TENANT.value_set(message.tenant_id),
                KIND.value_set("message"),
                STATUS.value_set("running"),
            ]
        )
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
            result = HandleMessageResult(
                **message.model_dump(include={"message_id", "tenant_id", "agent_id", "thread_id"}),
                response=answer.content,
                model_group=answer.model_group,
                model=answer.model,
                fallback_used=answer.fallback_used,
                degraded=False,
                usage=answer.usage,
            )
        except LOCAL_ACTIVITY_FAILURES as err:
            workflow.logger.warning("every provider failed, answering the fallback: %s", err)
            result = HandleMessageResult(
                **message.model_dump(include={"message_id", "tenant_id", "agent_id", "thread_id"}),
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
