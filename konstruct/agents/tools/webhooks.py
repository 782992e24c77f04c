"""A tenant's own tools: one call POSTed to its webhook, the secret taken from the environment.

Body `{"tool", "arguments", "call_id"}`; the secret value never appears in a
result or an error message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from konstruct.agents.tools.addresses import AddressPolicy
from konstruct.agents.tools.transport import HEADER_NAME, USER_AGENT, Reply, Unsent, exchange
from konstruct.platform.errors import ToolError


@dataclass(frozen=True)
class WebhookSpec:
    """A tenant's own tool: where to POST its calls, and where its secret comes from."""

    name: str
    url: str
    secret_header: str | None = None  # e.g. "X-Api-Key"
    secret_env: str | None = None  # name of the environment variable holding the secret value
    timeout_s: float = 30.0


_REDACTED = "[redacted]"


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def webhook_secret(
    spec: WebhookSpec, environ: Mapping[str, str], what: str = "webhook"
) -> str | None:
    """The secret value `spec` names (None without one); a ToolError when it is unset."""
    if spec.secret_header is None and spec.secret_env is None:
        return None
    if not spec.secret_header or not spec.secret_env:
        raise ToolError(
            f"{what} {spec.name}: secret_header and secret_env must be set together",
            retryable=False,
        )
    if not HEADER_NAME.match(spec.secret_header):
        raise ToolError(
            f"{what} {spec.name}: secret_header {spec.secret_header!r} is not a header name",
            retryable=False,
        )
    secret = environ.get(spec.secret_env)
    if not secret:
        raise ToolError(
            f"{what} {spec.name}: the environment variable {spec.secret_env} is not set",
            retryable=False,
        )
    if any(char in secret for char in "\r\n\0"):
        raise ToolError(
            f"{what} {spec.name}: the environment variable {spec.secret_env} "
            "holds a value that is not a valid header value",
            retryable=False,
        )
    return secret


def _webhook_result(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError:
        return text
    if isinstance(document, dict) and "result" in document:
        value = document["result"]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text


def _webhook_url(spec: WebhookSpec) -> httpx.URL:
    try:
        url = httpx.URL(spec.url)
    except (httpx.InvalidURL, ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ToolError(
            f"webhook {spec.name}: url must be an http:// or https:// URL", retryable=False
        )
    return url


def _webhook_payload(spec: WebhookSpec, arguments: Any, idempotency_key: str) -> bytes:
    try:
        return json.dumps(
            {"tool": spec.name, "arguments": arguments, "call_id": idempotency_key}
        ).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ToolError(
            f"webhook {spec.name}: the arguments are not JSON ({error})", retryable=False
        ) from None


def _webhook_headers(spec: WebhookSpec, idempotency_key: str, secret: str | None) -> dict[str, str]:
    headers = {
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key,
    }
    if secret is not None and spec.secret_header:
        headers[spec.secret_header] = secret
    return headers


def _failure(spec: WebhookSpec, outcome: Reply | Unsent, secret: str | None) -> ToolError:
    """Why the call failed: an answer other than 2xx, or no answer."""
    if isinstance(outcome, Reply):
        if 300 <= outcome.status < 400:
            detail = "redirects are not followed"
        else:
            detail = scrub(outcome.text, secret)[:200]
        retryable = outcome.status >= 500 or outcome.status in (408, 429)
        return ToolError(
            f"webhook {spec.name} answered {outcome.status}: {detail}", retryable=retryable
        )
    if outcome.why == "timeout":
        return ToolError(f"webhook {spec.name} timed out after {spec.timeout_s:g}s", retryable=True)
    detail = scrub(outcome.detail, secret)
    if outcome.why == "unsendable":
        return ToolError(
            f"webhook {spec.name}: the request could not be sent ({detail})", retryable=False
        )
    if outcome.why == "refused":
        return ToolError(f"webhook {spec.name}: {detail}", retryable=False)
    return ToolError(f"webhook {spec.name}: could not reach it ({detail})", retryable=True)


async def call_webhook(
    spec: WebhookSpec,
    arguments: dict,
    idempotency_key: str,
    *,
    policy: AddressPolicy,
    environ: Mapping[str, str] = os.environ,
    client: httpx.AsyncClient | None = None,
    max_response_bytes: int = 65_536,
) -> str:
    """POST one tool call to a tenant's webhook and return its answer.

    Body `{"tool", "arguments", "call_id"}`; headers `Idempotency-Key` and, when the
    spec names both, `<secret_header>: <environ[secret_env]>`. A 2xx JSON answer with
    a top-level "result" returns that value. The secret value is scrubbed from every
    message and result. The URL's address must be one `policy` allows (`addresses`).
    """
    secret = webhook_secret(spec, environ)
    url = _webhook_url(spec)
    payload = _webhook_payload(spec, arguments, idempotency_key)
    outcome = await exchange(
        client,
        "POST",
        url,
        content=payload,
        headers=_webhook_headers(spec, idempotency_key, secret),
        timeout_s=spec.timeout_s,
        max_bytes=max_response_bytes,
        policy=policy,
    )
    if isinstance(outcome, Reply) and 200 <= outcome.status < 300:
        result = _webhook_result(scrub(outcome.text, secret))
        if outcome.truncated:
            result += f"\n…[truncated at {max_response_bytes} bytes]"
        return scrub(result, secret)
    failure = _failure(spec, outcome, secret)
    raise ToolError(scrub(failure.message, secret), retryable=failure.retryable)
