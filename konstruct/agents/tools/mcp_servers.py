"""A tenant's MCP servers as tools: list a streamable-HTTP server's tools, call one.

The client is the official `mcp` package's. A server's tools are listed when it is
registered or refreshed (`konstruct tools mcp add|refresh`) and stored as tool rows
named `SERVER__TOOL` (`mcp_tool_name`), so an agent's step never waits on a server
to list them; each call opens a session, calls the tool and closes it, inside the
agent's `run_tool` activity (its timeout, retries, heartbeat; the call id goes out
as the `Idempotency-Key` header). The server's address passes the operator's
`AddressPolicy` before any connection; the secret, read from the worker's
environment as a webhook's, goes in `secret_header` and is scrubbed from every
message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2

from konstruct.agents.models import ToolSpec
from konstruct.agents.tools.addresses import AddressPolicy, AddressRefused, IpAddress, pinned
from konstruct.agents.tools.transport import USER_AGENT
from konstruct.agents.tools.webhooks import WebhookSpec, scrub, webhook_secret
from konstruct.platform.errors import ToolError

# What an OpenAI function name may hold; anything else in a tool's name becomes "_".
_NOT_IN_A_NAME = re.compile(r"[^a-zA-Z0-9_-]")
MAX_NAME = 64


@dataclass(frozen=True)
class McpServer:
    """Where a tenant's MCP server answers, and where its secret comes from."""

    name: str
    url: str
    secret_header: str | None = None
    secret_env: str | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class McpTool:
    """A tool as the server lists it."""

    remote_name: str
    description: str
    parameters: dict[str, Any]


def mcp_tool_name(server: str, remote_name: str) -> str:
    """`SERVER__TOOL`, a valid OpenAI function name; ValueError when over 64 characters."""
    name = f"{server}__{_NOT_IN_A_NAME.sub('_', remote_name)}"
    if len(name) > MAX_NAME:
        raise ValueError(
            f"the tool name {name!r} is over {MAX_NAME} characters: give the server a shorter name"
        )
    return name


def _secret(server: McpServer, environ: Mapping[str, str]) -> str | None:
    as_webhook = WebhookSpec(server.name, server.url, server.secret_header, server.secret_env)
    return webhook_secret(as_webhook, environ, what="MCP server")


def _innermost(error: BaseException) -> BaseException:
    """The first leaf of an exception group (the client's task groups wrap failures)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def _check_address(server: McpServer, policy: AddressPolicy) -> None:
    try:
        await policy.checked(httpx.URL(server.url))
    except AddressRefused as refused:
        raise ToolError(f"MCP server {server.name}: {refused}", retryable=False) from None
    except OSError as error:
        raise ToolError(
            f"MCP server {server.name}: {httpx.URL(server.url).host} does not resolve ({error})",
            retryable=True,
        ) from None


# The `mcp` client's own HTTP defaults (`create_mcp_http_client`): a server may hold a
# response stream open for long; the call's own timeout bounds each call anyway.
HTTP_TIMEOUT_S = 30.0
STREAM_READ_TIMEOUT_S = 300.0


class _CheckedTransport(httpx2.AsyncBaseTransport):
    """The MCP client's connections, each to an address the policy allows, checked as
    the request is sent: the host is resolved and checked, and the request goes to
    that address itself (`addresses.pinned`: the Host header and the TLS server name
    keep the name), so a DNS answer that changes after a check is never connected to.
    (The MCP client runs on `httpx2`, the `mcp` package's HTTP client.)"""

    def __init__(self, server: str, policy: AddressPolicy) -> None:
        self.server = server
        self.policy = policy
        self.inner: httpx2.AsyncBaseTransport = httpx2.AsyncHTTPTransport(trust_env=False)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = httpx.URL(str(request.url))
        try:
            addresses = await self.policy.checked(url)
        except AddressRefused as refused:
            raise ToolError(f"MCP server {self.server}: {refused}", retryable=False) from None
        for address in addresses[:-1]:
            try:
                return await self._send(request, url, address)
            except httpx2.ConnectError:
                continue  # not connected, nothing sent: the name's next checked address
        return await self._send(request, url, addresses[-1])

    async def _send(
        self, request: httpx2.Request, url: httpx.URL, address: IpAddress
    ) -> httpx2.Response:
        target, host, extensions = pinned(url, address)
        request.url = httpx2.URL(str(target))
        request.headers.update(host)
        request.extensions.update(extensions)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _session(
    server: McpServer,
    policy: AddressPolicy,
    secret: str | None,
    extra_headers: Mapping[str, str],
    work: Any,
) -> Any:
    """Open a session with the server, run `work(client)`, close it; a ToolError
    (retryable) when the server cannot be reached or answers with a protocol error."""
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    await _check_address(server, policy)
    headers = {"User-Agent": USER_AGENT, **extra_headers}
    if secret is not None and server.secret_header:
        headers[server.secret_header] = secret
    failure: str | None = None
    protocol = False
    try:
        timeout = httpx2.Timeout(HTTP_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        checked = _CheckedTransport(server.name, policy)
        async with httpx2.AsyncClient(headers=headers, timeout=timeout, transport=checked) as http:
            transport = streamable_http_client(server.url, http_client=http)
            async with Client(transport, read_timeout_seconds=server.timeout_s) as client:
                return await work(client)
    except ToolError:
        raise
    except Exception as error:  # the client's failures come in many types and groups
        inner = _innermost(error)
        if isinstance(inner, ToolError):  # ours, from `work`, wrapped by a task group
            raise inner from None
        failure = scrub(f"{type(inner).__name__}: {inner}", secret)
        protocol = isinstance(inner, MCPError)
    if protocol:  # it answered, with an error: the same call would get the same answer
        raise ToolError(
            f"MCP server {server.name} answered with an error ({failure})", retryable=False
        )
    raise ToolError(
        f"MCP server {server.name}: could not reach it or it did not answer ({failure})",
        retryable=True,
    )


async def list_server_tools(
    server: McpServer, *, policy: AddressPolicy, environ: Mapping[str, str] = os.environ
) -> list[McpTool]:
    """The server's tools (every page); a ToolError naming what is wrong otherwise,
    a tool whose input schema is not a JSON schema of an object included."""

    async def work(client: Any) -> list[McpTool]:
        tools: list[McpTool] = []
        cursor: str | None = None
        while True:
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                schema = tool.input_schema
                if not isinstance(schema, dict) or schema.get("type") != "object":
                    raise ToolError(
                        f"MCP server {server.name}: tool {tool.name!r} has an input schema"
                        f' that is not a JSON schema with "type": "object": {schema!r}'[:300],
                        retryable=False,
                    )
                tools.append(McpTool(tool.name, tool.description or "", dict(schema)))
            cursor = page.next_cursor
            if not cursor:
                return tools

    secret = _secret(server, environ)
    listed: list[McpTool] = await _session(server, policy, secret, {}, work)
    return listed


def _result_text(result: Any) -> str:
    """A tool result as the model reads it: its text parts, else its structured content."""
    parts: list[str] = []
    for item in result.content or []:
        text = getattr(item, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(item, 'type', 'content')}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


async def call_mcp_tool(
    server: McpServer,
    remote_name: str,
    arguments: dict[str, Any],
    idempotency_key: str,
    *,
    policy: AddressPolicy,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """Call one tool of the server: its result's text. A result the server marks as
    an error is a ToolError the model is told (not retried: the tool ran)."""

    async def work(client: Any) -> Any:
        return await client.call_tool(remote_name, arguments)

    secret = _secret(server, environ)
    result = await _session(server, policy, secret, {"Idempotency-Key": idempotency_key}, work)
    text = scrub(_result_text(result), secret)
    if result.is_error:
        raise ToolError(f"MCP tool {server.name}__{remote_name}: {text[:500]}", retryable=False)
    return text


async def server_specs(
    server: McpServer,
    requires_approval: bool,
    *,
    policy: AddressPolicy,
    environ: Mapping[str, str] = os.environ,
) -> list[ToolSpec]:
    """The server's tools, listed now, as the tenant's tool rows (SERVER__TOOL); a
    ToolError naming what is wrong when the server cannot say or its tools cannot
    be stored (a schema that does not validate, two names that become one)."""
    from pydantic import ValidationError

    listed = await list_server_tools(server, policy=policy, environ=environ)
    try:
        specs = [
            ToolSpec(
                name=mcp_tool_name(server.name, tool.remote_name),
                kind="mcp",
                description=tool.description[:2000],
                parameters=tool.parameters,
                url=server.url,
                secret_header=server.secret_header,
                secret_env=server.secret_env,
                requires_approval=requires_approval,
                timeout_s=server.timeout_s,
                mcp_server=server.name,
                remote_name=tool.remote_name,
            ).check_kind()
            for tool in listed
        ]
    except (ValueError, ValidationError) as error:
        raise ToolError(f"MCP server {server.name}: {error}", retryable=False) from None
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ToolError(
            f"MCP server {server.name}: its tools {', '.join(twice)} have the same name"
            " once made a valid function name",
            retryable=False,
        )
    return specs


def server_of(spec: ToolSpec) -> McpServer:
    """The MCP server a stored tool row of it names."""
    assert spec.mcp_server is not None and spec.url is not None
    return McpServer(spec.mcp_server, spec.url, spec.secret_header, spec.secret_env, spec.timeout_s)
