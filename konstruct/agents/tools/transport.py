"""One HTTP exchange for a tool: never a redirect followed, the body read up to a cap.

Both HTTP tools (`http_request` and a tenant's webhook) send through `exchange`,
which answers with what came back (`Reply`) or why nothing did (`Unsent`) and
never raises: a tool builds its own `ToolError` from that, outside any `except`
block, so no exception holding the request (and its headers) is chained to it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

import httpx

USER_AGENT = "konstruct-tools/0.1"
# What a header name may consist of (RFC 9110's token).
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Reply:
    """An answer: its status, its Location header (None without one), and its body
    as text up to the cap."""

    status: int
    location: str | None
    text: str
    truncated: bool

    @property
    def is_redirect(self) -> bool:
        return self.status in _REDIRECTS or (300 <= self.status < 400 and self.location is not None)


@dataclass(frozen=True)
class Unsent:
    """No answer: a timeout, a request that could not be sent, or a host not reached."""

    why: Literal["timeout", "unsendable", "unreachable"]
    # The error's text ("unsendable") or its type and text ("unreachable").
    detail: str = ""


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


async def exchange(
    client: httpx.AsyncClient | None,
    method: str,
    url: httpx.URL,
    *,
    content: bytes | None,
    headers: dict[str, str],
    timeout_s: float,
    max_bytes: int,
    read_redirect_body: bool = True,
) -> Reply | Unsent:
    """Send one request (on `client`, else on a client of its own) within `timeout_s`.

    With `read_redirect_body=False` a redirect's body is not read (its text is "").
    """
    own_client = client is None
    http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream(
                method,
                url,
                content=content,
                headers=headers,
                follow_redirects=False,
                timeout=timeout_s,
            ) as response:
                reply = Reply(response.status_code, response.headers.get("location"), "", False)
                if reply.is_redirect and not read_redirect_body:
                    return reply
                data, truncated = await _read_limited(response, max_bytes)
                return Reply(reply.status, reply.location, _decode(response, data), truncated)
    except (TimeoutError, httpx.TimeoutException):
        return Unsent("timeout")
    except httpx.LocalProtocolError as error:
        return Unsent("unsendable", str(error))
    except httpx.TransportError as error:
        return Unsent("unreachable", f"{type(error).__name__}: {error}")
    finally:
        if own_client:
            await http.aclose()
