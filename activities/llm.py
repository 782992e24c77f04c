"""Activities that call LLM providers through the LiteLLM Router."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from temporalio import activity

from konstruct.platform.errors import InvalidInput
from konstruct.providers.adapter import complete
from konstruct.providers.models import LlmCallInput, LlmCallResult, TokenUsage
from konstruct.providers.router import RouterConfig

_tracer = trace.get_tracer("konstruct.llm")


class LlmActivities:
    def __init__(self, router: Any, config: RouterConfig) -> None:
        self.router = router
        self.group_of = {d.deployment_id: d.model_name for d in config.model_list}
        self.groups = {d.model_name for d in config.active()}

    @activity.defn(name="call_llm")
    async def call_llm(self, input: LlmCallInput) -> LlmCallResult:
        if input.model_group not in self.groups:
            raise InvalidInput(
                f"unknown model group {input.model_group!r}; configured: {sorted(self.groups)}",
                ["model_group"],
            )
        with _tracer.start_as_current_span("llm.completion") as span:
            span.set_attribute("llm.model_group", input.model_group)
            started = time.perf_counter()
            try:
                answer = await complete(
                    self.router,
                    input.model_group,
                    [m.model_dump() for m in input.messages],
                    temperature=input.temperature,
                    max_tokens=input.max_tokens,
                )
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                raise
            answered_group = self.group_of.get(answer.deployment_id, input.model_group)
            result = LlmCallResult(
                content=answer.content,
                model_group=answered_group,
                model=answer.model,
                deployment_id=answer.deployment_id,
                fallback_used=answered_group != input.model_group,
                usage=TokenUsage(
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    total_tokens=answer.total_tokens,
                ),
            )
            span.set_attribute("llm.deployment", answer.deployment_id)
            span.set_attribute("llm.model", result.model)
            span.set_attribute("llm.fallback_used", result.fallback_used)
            span.set_attribute("llm.total_tokens", result.usage.total_tokens)
            span.set_attribute("llm.latency_ms", (time.perf_counter() - started) * 1000)
            return result
