"""Activities that call LLM providers through the LiteLLM Router."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from opentelemetry import trace
from temporalio import activity
from temporalio.exceptions import ApplicationError

from konstruct.models import LlmCallInput, LlmCallResult, TokenUsage
from konstruct.router import RouterConfig

_tracer = trace.get_tracer("konstruct.llm")

# Errors a retry cannot fix: the request itself is wrong, or the key is.
_NON_RETRYABLE = (
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ContentPolicyViolationError",
    "ContextWindowExceededError",
    "UnprocessableEntityError",
)


def retry_after_seconds(error: BaseException) -> float | None:
    """The provider's Retry-After, if the error carries one."""
    headers: Any = getattr(error, "litellm_response_headers", None)
    if headers is None:
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / (1000 if name.endswith("-ms") else 1)
        except ValueError:
            continue
        return max(seconds, 0.0)
    return None


def provider_error(error: Exception, what: str) -> ApplicationError:
    """Map a litellm exception to the failure Temporal retries (or does not)."""
    kind = type(error).__name__
    delay = retry_after_seconds(error)
    return ApplicationError(
        f"{what} failed: {kind}: {str(error)[:500]}",
        type=kind,
        non_retryable=kind in _NON_RETRYABLE,
        next_retry_delay=timedelta(seconds=delay) if delay else None,
    )


class LlmActivities:
    def __init__(self, router: Any, config: RouterConfig) -> None:
        self.router = router
        self.group_of = {d.deployment_id: d.model_name for d in config.model_list}
        self.groups = {d.model_name for d in config.active()}

    @activity.defn(name="call_llm")
    async def call_llm(self, input: LlmCallInput) -> LlmCallResult:
        if input.model_group not in self.groups:
            raise ApplicationError(
                f"unknown model group {input.model_group!r}; configured: {sorted(self.groups)}",
                type="InvalidInput",
                non_retryable=True,
            )
        kwargs: dict[str, Any] = {}
        if input.temperature is not None:
            kwargs["temperature"] = input.temperature
        if input.max_tokens is not None:
            kwargs["max_tokens"] = input.max_tokens
        with _tracer.start_as_current_span("llm.completion") as span:
            span.set_attribute("llm.model_group", input.model_group)
            started = time.perf_counter()
            try:
                response = await self.router.acompletion(
                    model=input.model_group,
                    messages=[m.model_dump() for m in input.messages],
                    **kwargs,
                )
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                raise provider_error(exc, f"LLM call to group {input.model_group!r}") from exc
            deployment_id = str(response._hidden_params.get("model_id") or "")
            answered_group = self.group_of.get(deployment_id, input.model_group)
            usage = getattr(response, "usage", None)
            result = LlmCallResult(
                content=response.choices[0].message.content or "",
                model_group=answered_group,
                model=str(response.model),
                deployment_id=deployment_id,
                fallback_used=answered_group != input.model_group,
                usage=TokenUsage(
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                    total_tokens=getattr(usage, "total_tokens", 0) or 0,
                ),
            )
            span.set_attribute("llm.deployment", deployment_id)
            span.set_attribute("llm.model", result.model)
            span.set_attribute("llm.fallback_used", result.fallback_used)
            span.set_attribute("llm.total_tokens", result.usage.total_tokens)
            span.set_attribute("llm.latency_ms", (time.perf_counter() - started) * 1000)
            return result
