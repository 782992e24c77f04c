"""The built-in tools an agent may call, and the webhook call of a tenant's own tools.

Pure async code: no Temporal, no database. Every failure is a `ToolError` whose
`retryable` says whether another attempt may help (timeout, connection error,
5xx, 429) or whether the model must be told at once (bad arguments, a host off
the allow-list, 4xx).

    calculate(expression)                         safe arithmetic, no eval
    http_request(arguments, allowed_hosts, ...)   GET/POST to an allow-listed host
    call_webhook(spec, arguments, key, ...)       POST to a tenant's webhook, secret from env
    truncate_result(text, limit)                  a tool result cut to what a prompt can hold
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class ToolError(Exception):
    """A tool failed. retryable=False: the model is told at once (bad arguments, host not allowed, 4xx).
    retryable=True: worth another attempt (timeout, connection error, 5xx, 429)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"ToolError({self.message!r}, retryable={self.retryable})"


# --------------------------------------------------------------------------- specs

BUILTIN_TOOLS: dict[str, dict] = {
    "calculator": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression exactly. Supports numbers, parentheses, "
            "unary + and -, and + - * / // % ** (exponent at most 100). "
            "Example: (3 + 4) * 2"
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The expression, e.g. '2 * (3 + 4) / 7'.",
                    "maxLength": 500,
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
    "http_request": {
        "name": "http_request",
        "description": (
            "Make an HTTP GET or POST request to a host on this tenant's allow-list and "
            "return 'HTTP <status>' followed by the response body (cut at a size limit). "
            "Redirects are not followed: a redirect answer returns its Location."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": ["GET", "POST"]},
                "url": {"type": "string", "description": "An http:// or https:// URL."},
                "body": {"type": "string", "description": "The request body (POST only)."},
                "headers": {
                    "type": "object",
                    "description": (
                        "Extra request headers; Host, Authorization and Cookie are not allowed."
                    ),
                    "additionalProperties": {"type": "string"},
                },
            },
            "required": ["method", "url"],
            "additionalProperties": False,
        },
    },
    "knowledge_search": {
        "name": "knowledge_search",
        "description": (
            "Search this agent's knowledge base and return the passages nearest in "
            "meaning to the query, best first."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "k": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 10,
                    "description": "How many passages to return (default 5).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}


# --------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 100
MAX_RESULT_DIGITS = 1000
# An int whose bit length passes this has more than MAX_RESULT_DIGITS decimal digits.
_MAX_RESULT_BITS = int(MAX_RESULT_DIGITS / math.log10(2)) + 1

_BINARY: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALLOWED = "only numbers, parentheses, unary + and -, and + - * / // % ** are allowed"


def _refuse(what: str) -> ToolError:
    return ToolError(f"calculator refused {what}: {_ALLOWED}", retryable=False)


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name '{node.id}'"
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return f"an attribute access ('.{node.attr}')"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return "a string"
        if isinstance(node.value, bool):
            return f"the boolean {node.value}"
        if isinstance(node.value, complex):
            return "a complex number"
        return f"the constant {node.value!r}"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"the unary operator {type(node.op).__name__}"
    return f"a {type(node).__name__} expression"


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(
            f"calculator refused '**' with exponent {exponent}: at most {MAX_EXPONENT}",
            retryable=False,
        )
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        digits = exponent * math.log10(abs(base))
        if digits > MAX_RESULT_DIGITS:
            raise ToolError(
                f"calculator refused '**': the result would have about {int(digits)} digits "
                f"(at most {MAX_RESULT_DIGITS})",
                retryable=False,
            )


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("calculator: the result is not a real number", retryable=False)
    if isinstance(value, int):
        if value.bit_length() > _MAX_RESULT_BITS:
            raise ToolError(
                f"calculator: a result has more than {MAX_RESULT_DIGITS} digits", retryable=False
            )
        return value
    if not math.isfinite(value):
        raise ToolError(
            "calculator: the result is too large (not a finite number)", retryable=False
        )
    return float(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return _checked(node.value)
        raise _refuse(_describe(node))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        symbol, apply = _BINARY[type(node.op)]
        left = _evaluate(node.left)
        right = _evaluate(node.right)
        if symbol == "**":
            _check_power(left, right)
        try:
            return _checked(apply(left, right))
        except ZeroDivisionError:
            raise ToolError("calculator: division by zero", retryable=False) from None
        except OverflowError:
            raise ToolError(
                "calculator: the result is too large (not a finite number)", retryable=False
            ) from None
    raise _refuse(_describe(node))


def _format_number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".10g")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text: "14", "0.3333333333".

    Parsed with `ast.parse(mode="eval")` and walked node by node; nothing is
    evaluated by Python itself. Refusals are `ToolError(retryable=False)`.
    """
    if not isinstance(expression, str):
        raise ToolError("calculator: 'expression' must be a string", retryable=False)
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"calculator: the expression has {len(expression)} characters "
            f"(at most {MAX_EXPRESSION_CHARS})",
            retryable=False,
        )
    text = expression.strip()
    if not text:
        raise ToolError("calculator: the expression is empty", retryable=False)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as error:
        reason = error.msg if isinstance(error, SyntaxError) else str(error)
        raise ToolError(
            f"calculator: not a valid arithmetic expression ({reason})", retryable=False
        ) from None
    except (RecursionError, MemoryError):
        raise ToolError(
            "calculator: the expression is nested too deeply", retryable=False
        ) from None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        raise ToolError(
            "calculator: the expression is nested too deeply", retryable=False
        ) from None
    return _format_number(value)


# --------------------------------------------------------------------------- http_request


@dataclass(frozen=True)
class HttpLimits:
    timeout_s: float = 10.0
    max_response_bytes: int = 65_536
    max_body_bytes: int = 16_384


USER_AGENT = "konstruct-tools/0.1"
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
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HTTP_FIELDS = ("method", "url", "body", "headers")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


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
        if not isinstance(name, str) or not _TOKEN.match(name):
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


async def _read_limited(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _decode(response: httpx.Response, data: bytes) -> str:
    encoding = response.charset_encoding or "utf-8"
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


async def http_request(
    arguments: dict,
    allowed_hosts: Collection[str],
    limits: HttpLimits = HttpLimits(),
    *,
    client: httpx.AsyncClient | None = None,
) -> str:
    """Run one `http_request` tool call: "HTTP <status>\\n<body text>".

    The url's host must be on `allowed_hosts` ("host" for any port, or "host:port").
    Redirects are never followed; a redirect answer is returned as its status line
    and Location. The body is read up to `limits.max_response_bytes`.
    """
    method, url, content, extra_headers = _validate_http_arguments(arguments, limits)
    host = _normalize_host(url.host)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not host_allowed(host, port, allowed_hosts):
        raise ToolError(
            f"host '{host}' is not on this tenant's allow-list "
            f"(konstruct tools allow TENANT {host})",
            retryable=False,
        )
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **extra_headers}

    own_client = client is None
    http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    failure: ToolError | None = None
    try:
        async with asyncio.timeout(limits.timeout_s):
            async with http.stream(
                method,
                url,
                content=content,
                headers=headers,
                follow_redirects=False,
                timeout=limits.timeout_s,
            ) as response:
                status = response.status_code
                if status in _REDIRECTS or (300 <= status < 400 and "location" in response.headers):
                    location = response.headers.get("location", "")
                    return f"HTTP {status}\nLocation: {location}\n(redirects are not followed)"
                data, truncated = await _read_limited(response, limits.max_response_bytes)
                text = _decode(response, data)
                if status >= 500 or status == 429:
                    failure = ToolError(
                        f"http_request: {host} answered HTTP {status}: {text[:200]}",
                        retryable=True,
                    )
                else:
                    if truncated:
                        text += f"\n…[truncated at {limits.max_response_bytes} bytes]"
                    return f"HTTP {status}\n{text}"
    except (TimeoutError, httpx.TimeoutException):
        failure = ToolError(
            f"http_request: {method} {host} timed out after {limits.timeout_s:g}s",
            retryable=True,
        )
    except httpx.LocalProtocolError as error:
        failure = _bad(f"the request could not be sent ({error})")
    except httpx.TransportError as error:
        failure = ToolError(
            f"http_request: could not reach {host} ({type(error).__name__}: {error})",
            retryable=True,
        )
    finally:
        if own_client:
            await http.aclose()
    assert failure is not None
    raise failure


# --------------------------------------------------------------------------- webhooks


@dataclass(frozen=True)
class WebhookSpec:
    name: str
    url: str
    secret_header: str | None = None  # e.g. "X-Api-Key"
    secret_env: str | None = None  # name of the environment variable holding the secret value
    timeout_s: float = 30.0


_REDACTED = "[redacted]"


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def _webhook_secret(spec: WebhookSpec, environ: Mapping[str, str]) -> str | None:
    if spec.secret_header is None and spec.secret_env is None:
        return None
    if not spec.secret_header or not spec.secret_env:
        raise ToolError(
            f"webhook {spec.name}: secret_header and secret_env must be set together",
            retryable=False,
        )
    if not _TOKEN.match(spec.secret_header):
        raise ToolError(
            f"webhook {spec.name}: secret_header {spec.secret_header!r} is not a header name",
            retryable=False,
        )
    secret = environ.get(spec.secret_env)
    if not secret:
        raise ToolError(
            f"webhook {spec.name}: the environment variable {spec.secret_env} is not set",
            retryable=False,
        )
    if any(char in secret for char in "\r\n\0"):
        raise ToolError(
            f"webhook {spec.name}: the environment variable {spec.secret_env} "
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


async def call_webhook(
    spec: WebhookSpec,
    arguments: dict,
    idempotency_key: str,
    *,
    environ: Mapping[str, str] = os.environ,
    client: httpx.AsyncClient | None = None,
    max_response_bytes: int = 65_536,
) -> str:
    """POST one tool call to a tenant's webhook and return its answer.

    Body `{"tool", "arguments", "call_id"}`; headers `Idempotency-Key` and, when the
    spec names both, `<secret_header>: <environ[secret_env]>`. A 2xx JSON answer with
    a top-level "result" returns that value. The secret value is scrubbed from every
    message and result.
    """
    secret = _webhook_secret(spec, environ)
    try:
        url = httpx.URL(spec.url)
    except (httpx.InvalidURL, ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ToolError(
            f"webhook {spec.name}: url must be an http:// or https:// URL", retryable=False
        )
    try:
        payload = json.dumps(
            {"tool": spec.name, "arguments": arguments, "call_id": idempotency_key}
        ).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ToolError(
            f"webhook {spec.name}: the arguments are not JSON ({error})", retryable=False
        ) from None
    headers = {
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key,
    }
    if secret is not None and spec.secret_header:
        headers[spec.secret_header] = secret

    own_client = client is None
    http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    # Raised after the try block so that no exception holding the request (and its
    # secret header) is chained to it as __context__.
    failure: ToolError | None = None
    try:
        async with asyncio.timeout(spec.timeout_s):
            async with http.stream(
                "POST",
                url,
                content=payload,
                headers=headers,
                follow_redirects=False,
                timeout=spec.timeout_s,
            ) as response:
                status = response.status_code
                data, truncated = await _read_limited(response, max_response_bytes)
                text = _scrub(_decode(response, data), secret)
                if 200 <= status < 300:
                    result = _webhook_result(text)
                    if truncated:
                        result += f"\n…[truncated at {max_response_bytes} bytes]"
                    return _scrub(result, secret)
                retryable = status >= 500 or status in (408, 429)
                detail = text[:200]
                if 300 <= status < 400:
                    detail = "redirects are not followed"
                failure = ToolError(
                    f"webhook {spec.name} answered {status}: {detail}", retryable=retryable
                )
    except (TimeoutError, httpx.TimeoutException):
        failure = ToolError(
            f"webhook {spec.name} timed out after {spec.timeout_s:g}s", retryable=True
        )
    except httpx.LocalProtocolError as error:
        failure = ToolError(
            f"webhook {spec.name}: the request could not be sent ({_scrub(str(error), secret)})",
            retryable=False,
        )
    except httpx.TransportError as error:
        failure = ToolError(
            f"webhook {spec.name}: could not reach it "
            f"({type(error).__name__}: {_scrub(str(error), secret)})",
            retryable=True,
        )
    finally:
        if own_client:
            await http.aclose()
    assert failure is not None
    raise ToolError(_scrub(failure.message, secret), retryable=failure.retryable)


# --------------------------------------------------------------------------- results


def _cut_marker(cut: int, total: int) -> str:
    return f"\n…[cut: {cut} of {total} chars]"


def truncate_result(text: str, limit: int = 4000) -> str:
    """`text` if it has at most `limit` chars, else its start plus a marker
    "\\n…[cut: N of M chars]" (N chars cut of M) so the whole is at most `limit`."""
    if limit < 0:
        raise ValueError("limit must not be negative")
    total = len(text)
    if total <= limit:
        return text
    if limit < len(_cut_marker(total, total)):
        return text[:limit]
    # The marker's length depends on how much is cut: keep the most text that fits.
    kept = limit - len(_cut_marker(total, total))
    while kept + 1 < total and kept + 1 + len(_cut_marker(total - kept - 1, total)) <= limit:
        kept += 1
    return text[:kept] + _cut_marker(total - kept, total)
