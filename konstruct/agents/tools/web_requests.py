"""The `http_request` tool: GET or POST to a host on the tenant's allow-list.

Redirects are never followed (a redirect is answered with its Location); 5xx
and 429 answers and failures to connect are retryable, anything else the model
sent wrong is not.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import httpx

from konstruct.agents.tools.addresses import AddressPolicy
from konstruct.agents.tools.transport import HEADER_NAME, USER_AGENT, Reply, Unsent, exchange
from konstruct.platform.errors import ToolError


@dataclass(frozen=True)
class HttpLimits:
    """How long one call may take and how many bytes it may send and read."""

    timeout_s: float = 10.0
    max_response_bytes: int = 65_536
    max_body_bytes: int = 16_384


# Headers the model may not set: identity, credentials, and message framing.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "proxy-authorization",
        "cookie",
        "content-length",
        "transfer-encoding",
    }
)
MAX_HEADERS = 20
_HTTP_FIELDS = ("method", "url", "body", "headers")


def _bad(message: str) -> ToolError:
    return ToolError(f"http_request: {message}", retryable=False)


def _normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _allow_entry(entry: str) -> tuple[str, int | None]:
    """An allow-list entry as (host, port or None): "api.x.com", "127.0.0.1:8080", "[::1]:81"."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return _normalize_host(host), int(port) if port.isdigit() else None


def host_allowed(host: str, port: int, allowed_hosts: Collection[str]) -> bool:
    """Whether host (any port) or host:port is on the allow-list."""
    if isinstance(allowed_hosts, str):
        allowed_hosts = [allowed_hosts]
    host = _normalize_host(host)
    for entry in allowed_hosts:
        allowed_host, allowed_port = _allow_entry(entry)
        if allowed_host == host and allowed_port in (None, port):
            return True
    return False


def _validate_headers(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise _bad("'headers' must be an object of header name to string value")
    if len(headers) > MAX_HEADERS:
        raise _bad(f"'headers' has {len(headers)} entries (at most {MAX_HEADERS})")
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not HEADER_NAME.match(name):
            raise _bad(f"'headers' has an invalid header name {name!r}")
        if not isinstance(value, str):
            raise _bad(f"'headers.{name}' must be a string")
        if any(char in value for char in "\r\n\0"):
            raise _bad(f"'headers.{name}' contains a line break or NUL")
        if name.lower() in FORBIDDEN_HEADERS:
            raise _bad(f"'headers.{name}' may not be set by a tool call")
        clean[name] = value
    return clean


def _validate_http_arguments(
    arguments: Any, limits: HttpLimits
) -> tuple[str, httpx.URL, bytes | None, dict[str, str]]:
    if not isinstance(arguments, dict):
        raise _bad("the arguments must be an object")
    unknown = sorted(str(key) for key in arguments if key not in _HTTP_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(repr(key) for key in unknown)}")

    method = arguments.get("method")
    if not isinstance(method, str) or method.upper() not in ("GET", "POST"):
        raise _bad(f"'method' must be GET or POST, not {method!r}")
    method = method.upper()

    raw_url = arguments.get("url")
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise _bad("'url' must be a non-empty string")
    try:
        url = httpx.URL(raw_url.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as error:
        raise _bad(f"'url' is not a valid URL ({error})") from None
    if url.scheme not in ("http", "https"):
        raise _bad(f"'url' must be http:// or https://, not {url.scheme or 'no'} scheme")
    if not url.host:
        raise _bad("'url' has no host")
    if url.userinfo:
        raise _bad("'url' may not carry a user name or password")

    body = arguments.get("body")
    content: bytes | None = None
    if body is not None:
        if not isinstance(body, str):
            raise _bad("'body' must be a string")
        if method != "POST":
            raise _bad("'body' is only sent with POST")
        content = body.encode("utf-8")
        if len(content) > limits.max_body_bytes:
            raise _bad(f"'body' has {len(content)} bytes (at most {limits.max_body_bytes})")

    return method, url, content, _validate_headers(arguments.get("headers"))


def _allowed_target(url: httpx.URL, allowed_hosts: Collection[str]) -> str:
    """The url's host, normalized; a ToolError if it is not on the allow-list."""
    host = _normalize_host(url.host)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not host_allowed(host, port, allowed_hosts):
        raise ToolError(
            f"host '{host}' is not on this tenant's allow-list "
            f"(konstruct tools allow TENANT {host})",
            retryable=False,
        )
    return host


def _answer(method: str, host: str, outcome: Reply | Unsent, limits: HttpLimits) -> str:
    """The tool's result for what came back; a ToolError for a failure."""
    if isinstance(outcome, Unsent):
        if outcome.why == "timeout":
            raise ToolError(
                f"http_request: {method} {host} timed out after {limits.timeout_s:g}s",
                retryable=True,
            )
        if outcome.why == "unsendable":
            raise _bad(f"the request could not be sent ({outcome.detail})")
        if outcome.why == "refused":
            raise _bad(outcome.detail)
        raise ToolError(f"http_request: could not reach {host} ({outcome.detail})", retryable=True)
    if outcome.is_redirect:
        location = outcome.location or ""
        return f"HTTP {outcome.status}\nLocation: {location}\n(redirects are not followed)"
    if outcome.status >= 500 or outcome.status == 429:
        raise ToolError(
            f"http_request: {host} answered HTTP {outcome.status}: {outcome.text[:200]}",
            retryable=True,
        )
    text = outcome.text
    if outcome.truncated:
        text += f"\n…[truncated at {limits.max_response_bytes} bytes]"
    return f"HTTP {outcome.status}\n{text}"


async def http_request(
    arguments: dict,
    allowed_hosts: Collection[str],
    limits: HttpLimits = HttpLimits(),
    *,
    policy: AddressPolicy,
    client: httpx.AsyncClient | None = None,
) -> str:
    """Run one `http_request` tool call: "HTTP <status>\\n<body text>".

    The url's host must be on `allowed_hosts` ("host" for any port, or "host:port").
    Its address must be one `policy` allows (`addresses`), whatever the allow-list.
    Redirects are never followed; a redirect answer is returned as its status line
    and Location. The body is read up to `limits.max_response_bytes`.
    """
    method, url, content, extra_headers = _validate_http_arguments(arguments, limits)
    host = _allowed_target(url, allowed_hosts)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **extra_headers}
    outcome = await exchange(
        client,
        method,
        url,
        content=content,
        headers=headers,
        timeout_s=limits.timeout_s,
        max_bytes=limits.max_response_bytes,
        read_redirect_body=False,
        policy=policy,
    )
    return _answer(method, host, outcome, limits)
