"""The one place that calls litellm, reads its answers and maps its errors.

Three call paths share it: the Router's completion (`call_llm`), the Router's
embedding (the demo), and one request to one deployment (experiment calls,
which must see each 429 themselves to adapt the rate). Every request goes out
with litellm's own retries off: Temporal is the one retry loop.

A provider's exception becomes one retry posture here:

- `RateLimitError` (429): throttled; retried after the provider's Retry-After;
- a 429 whose body says `insufficient_quota` (a daily or billing quota): quota;
  no retry helps until someone raises the quota, so it is never retried;
- a request the provider will never accept (400, 401, 404, 422...): rejected,
  never retried;
- anything else (5xx, timeout, connection error): failed, retried with backoff.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any, Literal

from temporalio.exceptions import ApplicationError

# Errors a retry cannot fix: the request itself is wrong, or the key is.
_NON_RETRYABLE = frozenset(
    {
        "BadRequestError",
        "AuthenticationError",
        "PermissionDeniedError",
        "NotFoundError",
        "ContentPolicyViolationError",
        "ContextWindowExceededError",
        "UnprocessableEntityError",
    }
)
_RATE_LIMITED = frozenset({"RateLimitError"})
# The shortest wait a throttled or held-back call is given before its retry.
_MIN_RETRY_DELAY_S = 0.2

Posture = Literal["throttled", "quota", "rejected", "failed"]
# How OpenAI-compatible providers word a spent quota (HTTP 429, code
# `insufficient_quota`). litellm keeps only the body's message, so both are looked for.
_QUOTA_MARKS = ("insufficient_quota", "exceeded your current quota")


@dataclass(frozen=True)
class AnnouncedLimits:
    """The limits a provider announces in its answers' headers, per its window
    (a minute for OpenAI's `x-ratelimit-limit-*` and Anthropic's
    `anthropic-ratelimit-*-limit`); None: not announced."""

    requests: int | None = None
    tokens: int | None = None


_LIMIT_HEADERS = {
    "requests": ("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"),
    "tokens": ("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"),
}


def announced_limits(headers: Any) -> AnnouncedLimits | None:
    """The request and token limits in a response's headers (litellm forwards a
    provider's own headers with an `llm_provider-` prefix)."""
    if not headers:
        return None
    found: dict[str, int] = {}
    for unit, names in _LIMIT_HEADERS.items():
        for name in names:
            value = headers.get(name) or headers.get(f"llm_provider-{name}")
            if value is None:
                continue
            try:
                limit = int(float(value))
            except (TypeError, ValueError):
                continue
            if limit > 0:
                found[unit] = limit
                break
    return AnnouncedLimits(**found) if found else None


@dataclass(frozen=True)
class Completion:
    """What a chat completion answered, read once from litellm's response."""

    content: str
    model: str
    # The Router's deployment that answered ("" for a direct deployment call).
    deployment_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    limits: AnnouncedLimits | None = None
    # Function calls the model asked for, in the OpenAI format
    # ({"id", "type": "function", "function": {"name", "arguments"}}).
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ProviderFailure:
    """A failed provider call: its exception class, a short message, what to do next."""

    kind: str
    message: str
    posture: Posture
    retry_after_s: float | None = None
    limits: AnnouncedLimits | None = None


def _error_headers(error: BaseException) -> Any:
    headers: Any = getattr(error, "litellm_response_headers", None)
    if headers is None:
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None)
    return headers


def _retry_after_seconds(error: BaseException) -> float | None:
    """The provider's Retry-After, if the error carries one."""
    headers = _error_headers(error)
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
    return _window_reset_seconds(headers)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def openai_duration_seconds(text: str) -> float | None:
    """OpenAI's x-ratelimit-reset-* format (120ms, 1s, 7.66s, 6m0s, 1h2m3s) in seconds."""
    parts = _DURATION_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _DURATION_UNIT_S[u] for n, u in parts)


def _window_reset_seconds(headers: Any) -> float | None:
    """No Retry-After: when the exhausted window limit (requests or tokens, OpenAI's
    x-ratelimit-* headers) frees up; with none exhausted, the later of the two."""
    resets: dict[str, float] = {}
    for unit in ("requests", "tokens"):
        value = headers.get(f"x-ratelimit-reset-{unit}")
        seconds = openai_duration_seconds(value) if value else None
        if seconds is not None:
            resets[unit] = seconds
    spent = [u for u in resets if headers.get(f"x-ratelimit-remaining-{u}") == "0"]
    if spent:
        return max(resets[u] for u in spent)
    return max(resets.values()) if resets else None


def classify(error: BaseException) -> ProviderFailure:
    """The retry posture of a provider exception."""
    kind = type(error).__name__
    posture: Posture
    if kind in _RATE_LIMITED:
        text = str(error).lower()
        posture = "quota" if any(mark in text for mark in _QUOTA_MARKS) else "throttled"
    else:
        posture = "rejected" if kind in _NON_RETRYABLE else "failed"
    return ProviderFailure(
        kind=kind,
        message=f"{kind}: {str(error)[:400]}",
        posture=posture,
        retry_after_s=_retry_after_seconds(error),
        limits=announced_limits(_error_headers(error)),
    )


def provider_error(error: BaseException, what: str) -> ApplicationError:
    """A provider exception as the failure Temporal retries (or does not)."""
    failure = classify(error)
    delay = failure.retry_after_s
    return ApplicationError(
        f"{what} failed: {failure.kind}: {str(error)[:500]}",
        type=failure.kind,
        non_retryable=failure.posture in ("rejected", "quota"),
        next_retry_delay=timedelta(seconds=delay) if delay else None,
    )


def call_error(provider: str, failure: ProviderFailure) -> ApplicationError:
    """A retryable failure of an experiment call: after a 429, wait the Retry-After."""
    if failure.posture == "throttled":
        return ApplicationError(
            f"provider {provider!r} rate-limited the call: {failure.message}",
            type="RateLimited",
            next_retry_delay=timedelta(
                seconds=max(_MIN_RETRY_DELAY_S, failure.retry_after_s or 1.0)
            ),
        )
    return ApplicationError(f"call to {provider!r} failed: {failure.message}", type=failure.kind)


def provider_unavailable(provider: str, reason: str, retry_in_s: float) -> ApplicationError:
    """The provider's circuit breaker holds the call back; retried when it may go."""
    return ApplicationError(
        f"provider {provider!r} unavailable: {reason}; retrying in {retry_in_s:.1f} s",
        type="ProviderUnavailable",
        next_retry_delay=timedelta(seconds=max(_MIN_RETRY_DELAY_S, retry_in_s)),
    )


def deployment_unavailable(deployment_id: str) -> ApplicationError:
    """Another worker knows the deployment (its environment switches it on); this one does not."""
    return ApplicationError(
        f"deployment {deployment_id!r} is not active on this worker; check its "
        "environment variables",
        type="DeploymentUnavailable",
    )


def _tool_calls(message: Any) -> tuple[dict[str, Any], ...]:
    calls = getattr(message, "tool_calls", None) or ()
    return tuple(
        {
            "id": str(call.id),
            "type": "function",
            "function": {
                "name": str(call.function.name),
                "arguments": str(call.function.arguments or "{}"),
            },
        }
        for call in calls
    )


def _completion(response: Any) -> Completion:
    usage = getattr(response, "usage", None)
    hidden = getattr(response, "_hidden_params", None) or {}
    message = response.choices[0].message
    return Completion(
        content=message.content or "",
        tool_calls=_tool_calls(message),
        model=str(response.model),
        deployment_id=str(hidden.get("model_id") or ""),
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        total_tokens=getattr(usage, "total_tokens", 0) or 0,
        limits=announced_limits(hidden.get("additional_headers")),
    )


def _sampling(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if temperature is not None:
        params["temperature"] = temperature
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    return params


async def complete(
    router: Any,
    model_group: str,
    messages: list[dict[str, Any]],
    *,
    temperature: float | None = None,
    max_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    on_text: Callable[[str], None] | None = None,
    response_format: dict[str, Any] | None = None,
) -> Completion:
    """A completion from the Router's model group; a failure is `provider_error`'s.

    `tools` are OpenAI function specs; the model may answer with `tool_calls`.
    With `on_text` the answer is streamed: each piece of its text is handed to
    `on_text` as it arrives, and the completion is built from the chunks.
    """
    params = _sampling(temperature, max_tokens)
    if tools:
        params["tools"] = tools
    if response_format is not None:
        params["response_format"] = response_format
    try:
        if on_text is None:
            response = await router.acompletion(model=model_group, messages=messages, **params)
            return _completion(response)
        params.update(stream=True, stream_options={"include_usage": True})
        stream = await router.acompletion(model=model_group, messages=messages, **params)
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                on_text(chunk.choices[0].delta.content)
    except Exception as exc:
        raise provider_error(exc, f"LLM call to group {model_group!r}") from exc
    response = load_litellm().stream_chunk_builder(chunks, messages=messages)
    if response is None:
        raise provider_error(ValueError("the stream had no chunks"), f"group {model_group!r}")
    # The Router says which deployment answered on the stream, not on the rebuilt response.
    hidden = getattr(stream, "_hidden_params", None) or {}
    response._hidden_params = {**(getattr(response, "_hidden_params", None) or {}), **hidden}
    return _completion(response)


async def embed(router: Any, model_group: str, texts: list[str]) -> list[list[float]]:
    """One vector per text, in order, from the Router's embedding group."""
    try:
        response = await router.aembedding(model=model_group, input=texts)
    except Exception as exc:
        raise provider_error(exc, f"embedding call to group {model_group!r}") from exc
    data = sorted(response.data, key=lambda d: d["index"] if isinstance(d, dict) else d.index)
    return [list(d["embedding"] if isinstance(d, dict) else d.embedding) for d in data]


# litellm's loggers. They have no level of their own, so under a process logging at
# INFO (the worker's) each call logged "LiteLLM completion() model= …" through two
# handlers: a line per call in worker.log and 8 % of the worker's CPU at 100 req/s
# (py-spy). Set to WARNING unless `LITELLM_LOG` (litellm's own knob) asks otherwise.
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def load_litellm() -> ModuleType:
    """litellm, imported on first use (it costs ~1 s), without the "Give Feedback /
    Get Help" banner it prints before every exception it maps (the caller logs the
    error once, with its own words) nor a log line per call."""
    import litellm

    litellm.suppress_debug_info = True
    if "LITELLM_LOG" not in os.environ:
        for name in _LITELLM_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
    return litellm


async def complete_on(
    litellm_params: dict[str, Any],
    messages: list[dict[str, Any]],
    *,
    timeout_s: float,
    temperature: float | None = None,
    max_tokens: int | None = None,
    response_format: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Completion:
    """One request to one deployment, no retries; raises litellm's exception as is
    (`classify` reads it), so the caller can learn from each 429. `tools`: OpenAI
    function specs, as for `complete`."""
    litellm = load_litellm()

    params = dict(litellm_params)
    params["max_retries"] = 0
    params["num_retries"] = 0
    params["timeout"] = min(float(params.get("timeout") or 1e9), timeout_s)
    params.update(_sampling(temperature, max_tokens))
    if response_format is not None:
        params["response_format"] = response_format
    if tools:
        params["tools"] = tools
    return _completion(await litellm.acompletion(messages=messages, **params))
