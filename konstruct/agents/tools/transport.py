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

from konstruct.agents.tools.addresses import AddressPolicy, AddressRefused, pinned

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
    """No answer: a timeout, a request that could not be sent, a host not reached, or
    an address the operator's policy refuses (nothing was sent)."""

    why: Literal["timeout", "unsendable", "unreachable", "refused"]
    # The error's text ("unsendable", "refused") or its type and text ("unreachable").
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
    policy: AddressPolicy | None = None,
) -> Reply | Unsent:
    """Send one request (on `client`, else on a client of its own) within `timeout_s`.

    With a `policy`, the host is resolved and checked first and the request sent to
    a checked address (`addresses.pinned`; the next one when it cannot connect).
    With `read_redirect_body=False` a redirect's body is not read (its text is "").
    """
    targets: list[tuple[httpx.URL, dict[str, str], dict[str, str]]] = [(url, {}, {})]
    if policy is not None:
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await policy.checked(url)
        except AddressRefused as refused:
            return Unsent("refused", str(refused))
        except TimeoutError:
            return Unsent("timeout")
        except OSError as error:
            return Unsent("unreachable", f"{url.host} does not resolve ({error})")
        targets = [pinned(url, address) for address in addresses]
    limits = _Limits(timeout_s, max_bytes, read_redirect_body)
    own_client = client is None
    http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(timeout_s):
            for target in targets[:-1]:
                try:
                    return await _send(http, method, target, content, headers, limits)
                except httpx.ConnectError:
                    continue  # not connected, nothing sent: the name's next checked address
            return await _send(http, method, targets[-1], content, headers, limits)
    except (TimeoutError, httpx.TimeoutException):
        return Unsent("timeout")
    except httpx.LocalProtocolError as error:
        return Unsent("unsendable", str(error))
    except httpx.TransportError as error:
        return Unsent("unreachable", f"{type(error).__name__}: {error}")
    finally:
        if own_client:
            await http.aclose()


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    max_bytes: int
    read_redirect_body: bool


async def _send(
    http: httpx.AsyncClient,
    method: str,
    target: tuple[httpx.URL, dict[str, str], dict[str, str]],
    content: bytes | None,
    headers: dict[str, str],
    limits: _Limits,
) -> Reply:
    """One request to one target (`addresses.pinned`: URL, Host header, extensions)."""
    url, host_header, extensions = target
    async with http.stream(
        method,
        url,
        content=content,
        headers={**headers, **host_header},
        follow_redirects=False,
        timeout=limits.timeout_s,
        extensions=extensions,
    ) as response:
        reply = Reply(response.status_code, response.headers.get("location"), "", False)
        if reply.is_redirect and not limits.read_redirect_body:
            return reply
        data, truncated = await _read_limited(response, limits.max_bytes)
        return Reply(reply.status, reply.location, _decode(response, data), truncated)
