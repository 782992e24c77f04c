"""The tools runtime (konstruct.agents.tools) against real local HTTP servers.

No Temporal, no database: each test that needs a server starts an aiohttp app
on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from konstruct.agents.tools import (
    BUILTIN_TOOLS,
    AddressPolicy,
    HttpLimits,
    WebhookSpec,
    calculate,
    call_webhook,
    http_request,
    truncate_result,
)
from konstruct.platform.errors import ToolError
from tests.support import serve_locally

# The test servers listen on 127.0.0.1: the calls that reach them need loopback allowed,
# as the dev stack's config allows it.
LOOPBACK = AddressPolicy.allowing(["loopback"])
SECRET = "s3cr3t-value-never-shown"
SECRET_ENV = "KONSTRUCT_TEST_WEBHOOK_KEY"


# --------------------------------------------------------------------------- specs


def test_builtin_specs_are_function_specs() -> None:
    assert set(BUILTIN_TOOLS) == {"calculator", "http_request", "knowledge_search"}
    for name, spec in BUILTIN_TOOLS.items():
        assert spec["name"] == name
        assert spec["description"]
        assert spec["parameters"]["type"] == "object"
        json.dumps(spec)
    assert BUILTIN_TOOLS["calculator"]["parameters"]["required"] == ["expression"]
    http = BUILTIN_TOOLS["http_request"]["parameters"]["properties"]
    assert http["method"]["enum"] == ["GET", "POST"]
    k = BUILTIN_TOOLS["knowledge_search"]["parameters"]["properties"]["k"]
    assert (k["type"], k["minimum"], k["maximum"]) == ("integer", 1, 10)


# --------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("2 ** 3 ** 2", "512"),
        ("-2 ** 2", "-4"),
        ("(-2) ** 2", "4"),
        ("1 / 3", "0.3333333333"),
        ("2 / 3", "0.6666666667"),
        ("0.1 + 0.2", "0.3"),
        ("7 / 7", "1"),
        ("1.5 * 4", "6"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("-(3 - 10)", "7"),
        ("+5", "5"),
        ("2.5e3", "2500"),
        ("2 ** -2", "0.25"),
        ("  3 - 5  ", "-2"),
        ("2 ** 100", str(2**100)),
        ("1e20 * 10", "1e+21"),
    ],
)
def test_calculate(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression", ["1 / 0", "5 // 0", "5 % 0", "1.0 / 0.0", "0 ** -1"])
def test_calculate_division_by_zero(expression: str) -> None:
    with pytest.raises(ToolError, match="division by zero") as caught:
        calculate(expression)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("expression", "named"),
    [
        ("__import__('os')", "function call"),
        ("os", "name 'os'"),
        ("x + 1", "name 'x'"),
        ("(1).real", "attribute"),
        ("'a' * 3", "string"),
        ("True + 1", "boolean"),
        ("2j", "complex"),
        ("[1, 2]", "List"),
        ("1 if 1 else 2", "IfExp"),
        ("1 < 2", "Compare"),
        ("~1", "unary operator Invert"),
        ("1 << 3", "operator LShift"),
        ("lambda: 1", "Lambda"),
    ],
)
def test_calculate_refuses(expression: str, named: str) -> None:
    with pytest.raises(ToolError, match="refused") as caught:
        calculate(expression)
    assert named in str(caught.value)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    "expression",
    [
        "9 ** 9999",
        "2 ** 101",
        "10 ** 1001",
        "(10 ** 100) ** 11",
        "2 ** (2 ** 10)",
        "(10 ** 100) ** 10 * (10 ** 100) ** 10",
        "1e300 * 1e300",
        "1e999",
        "1e300 ** 2",
        "(-8) ** 0.5",
    ],
)
def test_calculate_refuses_huge_or_unreal_results(expression: str) -> None:
    with pytest.raises(ToolError) as caught:
        calculate(expression)
    assert caught.value.retryable is False


def test_calculate_input_guards() -> None:
    with pytest.raises(ToolError, match="at most 500"):
        calculate("1+" * 250 + "1")
    assert calculate("1+" * 249 + "1") == "250"
    with pytest.raises(ToolError, match="empty"):
        calculate("   ")
    with pytest.raises(ToolError, match="not a valid arithmetic expression"):
        calculate("2 +")
    with pytest.raises(ToolError, match="not a valid"):
        calculate("import os")
    with pytest.raises(ToolError, match="nested too deeply|not a valid"):
        calculate("(" * 240 + "1" + ")" * 240)
    assert calculate("-" * 400 + "1") == "1"


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    port: int
    requests: list[web.Request] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _app(server: Server) -> web.Application:
    async def record(request: web.Request) -> bytes:
        server.requests.append(request)
        server.hits[request.path] = server.hits.get(request.path, 0) + 1
        body = await request.read()
        server.bodies[request.path] = body
        return body

    async def hello(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="hello world")

    async def echo(request: web.Request) -> web.Response:
        body = await record(request)
        return web.Response(
            text=f"got {body.decode()} x-test={request.headers.get('X-Test')}", status=201
        )

    async def redirect(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPFound(server.url("/target"))

    async def target(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="you should not be here")

    async def big(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="a" * 200_000)

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        try:
            await asyncio.wait_for(server.release.wait(), 5)
        except TimeoutError:
            pass
        return web.Response(text="late")

    def status(code: int, text: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            await record(request)
            return web.Response(status=code, text=text)

        return handler

    async def hook(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"result": "done"})

    async def hook_object(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"result": {"rows": [1, 2]}, "other": True})

    async def hook_plain(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="plain answer")

    async def hook_echo(request: web.Request) -> web.Response:
        await record(request)
        key = request.headers.get("X-Api-Key", "")
        return web.Response(status=int(request.query["status"]), text=f"bad key {key}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/target", target)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/slow", slow)
    app.router.add_get("/500", status(500, "boom"))
    app.router.add_get("/429", status(429, "slow down"))
    app.router.add_get("/404", status(404, "no such thing"))
    app.router.add_post("/hook", hook)
    app.router.add_post("/hook-object", hook_object)
    app.router.add_post("/hook-plain", hook_plain)
    app.router.add_post("/hook-400", status(400, "bad arguments: " + "z" * 500))
    app.router.add_post("/hook-408", status(408, "request timeout"))
    app.router.add_post("/hook-429", status(429, "too many"))
    app.router.add_post("/hook-503", status(503, "unavailable"))
    app.router.add_post("/hook-302", status(302, "moved"))
    app.router.add_post("/hook-echo", hook_echo)
    return app


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(port=0)
    async with serve_locally(_app(state), shutdown_timeout=1.0) as url:
        state.port = int(url.rsplit(":", 1)[1])
        try:
            yield state
        finally:
            state.release.set()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- http_request

ALLOWED = ["127.0.0.1"]


async def test_http_get_allowed(server: Server) -> None:
    result = await http_request(
        {"method": "GET", "url": server.url("/hello")}, ALLOWED, policy=LOOPBACK
    )
    assert result == "HTTP 200\nhello world"
    assert server.requests[0].headers["Accept-Encoding"] == "identity"


async def test_http_get_allowed_by_host_and_port(server: Server) -> None:
    allowed = [f"127.0.0.1:{server.port}"]
    result = await http_request(
        {"method": "get", "url": server.url("/hello")}, allowed, policy=LOOPBACK
    )
    assert result == "HTTP 200\nhello world"
    with pytest.raises(ToolError, match="not on this tenant's allow-list") as caught:
        await http_request(
            {"method": "GET", "url": server.url("/hello")},
            [f"127.0.0.1:{server.port + 1}"],
            policy=LOOPBACK,
        )
    assert caught.value.retryable is False
    assert server.hits["/hello"] == 1


async def test_http_post_with_body_and_headers(server: Server) -> None:
    result = await http_request(
        {
            "method": "POST",
            "url": server.url("/echo"),
            "body": '{"q": "x"}',
            "headers": {"X-Test": "yes", "Content-Type": "application/json"},
        },
        ALLOWED,
        policy=LOOPBACK,
    )
    assert result == 'HTTP 201\ngot {"q": "x"} x-test=yes'
    assert server.bodies["/echo"] == b'{"q": "x"}'
    assert server.requests[0].headers["Content-Type"] == "application/json"


async def test_http_host_not_allowed(server: Server) -> None:
    for allowed in (["localhost"], ["example.com"], []):
        with pytest.raises(ToolError) as caught:
            await http_request(
                {"method": "GET", "url": server.url("/hello")}, allowed, policy=LOOPBACK
            )
        assert str(caught.value) == (
            "host '127.0.0.1' is not on this tenant's allow-list "
            "(konstruct tools allow TENANT 127.0.0.1)"
        )
        assert caught.value.retryable is False
    with pytest.raises(ToolError, match="host 'evil.example'"):
        await http_request(
            {"method": "GET", "url": "http://EVIL.example/x"}, ALLOWED, policy=LOOPBACK
        )
    assert server.requests == []


async def test_http_allow_list_entries_are_normalized(server: Server) -> None:
    url = f"http://LOCALHOST:{server.port}/hello"
    result = await http_request({"method": "GET", "url": url}, [" Localhost. "], policy=LOOPBACK)
    assert result == "HTTP 200\nhello world"


async def test_http_redirect_not_followed(server: Server) -> None:
    result = await http_request(
        {"method": "GET", "url": server.url("/redirect")}, ALLOWED, policy=LOOPBACK
    )
    assert result.startswith("HTTP 302\nLocation: " + server.url("/target"))
    assert "/target" not in server.hits


async def test_http_response_truncated(server: Server) -> None:
    limits = HttpLimits(max_response_bytes=1000)
    result = await http_request(
        {"method": "GET", "url": server.url("/big")}, ALLOWED, limits, policy=LOOPBACK
    )
    head, _, rest = result.partition("\n")
    assert head == "HTTP 200"
    assert rest == "a" * 1000 + "\n…[truncated at 1000 bytes]"


async def test_http_timeout_is_retryable(server: Server) -> None:
    limits = HttpLimits(timeout_s=0.3)
    with pytest.raises(ToolError, match="timed out after 0.3s") as caught:
        await http_request(
            {"method": "GET", "url": server.url("/slow")}, ALLOWED, limits, policy=LOOPBACK
        )
    assert caught.value.retryable is True


async def test_http_5xx_and_429_are_retryable(server: Server) -> None:
    for path, status in (("/500", 500), ("/429", 429)):
        with pytest.raises(ToolError, match=f"HTTP {status}") as caught:
            await http_request({"method": "GET", "url": server.url(path)}, ALLOWED, policy=LOOPBACK)
        assert caught.value.retryable is True


async def test_http_404_is_a_result(server: Server) -> None:
    result = await http_request(
        {"method": "GET", "url": server.url("/404")}, ALLOWED, policy=LOOPBACK
    )
    assert result == "HTTP 404\nno such thing"


async def test_http_connection_error_is_retryable() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x"
    with pytest.raises(ToolError, match="could not reach 127.0.0.1") as caught:
        await http_request({"method": "GET", "url": url}, ALLOWED, policy=LOOPBACK)
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"method": "DELETE", "url": "http://127.0.0.1/x"}, "'method'"),
        ({"url": "http://127.0.0.1/x"}, "'method'"),
        ({"method": "GET"}, "'url'"),
        ({"method": "GET", "url": "ftp://127.0.0.1/x"}, "'url'"),
        ({"method": "GET", "url": "file:///etc/passwd"}, "'url'"),
        ({"method": "GET", "url": "http:///nohost"}, "'url'"),
        ({"method": "GET", "url": "http://user:pw@127.0.0.1/x"}, "'url'"),
        ({"method": "GET", "url": 5}, "'url'"),
        ({"method": "POST", "url": "http://127.0.0.1/x", "body": 3}, "'body'"),
        ({"method": "POST", "url": "http://127.0.0.1/x", "body": "x" * 17_000}, "'body'"),
        ({"method": "GET", "url": "http://127.0.0.1/x", "body": "x"}, "'body'"),
        ({"method": "GET", "url": "http://127.0.0.1/x", "headers": "x"}, "'headers'"),
        ({"method": "GET", "url": "http://127.0.0.1/x", "headers": {"A": 1}}, "'headers.A'"),
        (
            {"method": "GET", "url": "http://127.0.0.1/x", "headers": {"Host": "evil"}},
            "'headers.Host'",
        ),
        (
            {"method": "GET", "url": "http://127.0.0.1/x", "headers": {"authorization": "x"}},
            "'headers.authorization'",
        ),
        (
            {"method": "GET", "url": "http://127.0.0.1/x", "headers": {"Cookie": "a=b"}},
            "'headers.Cookie'",
        ),
        (
            {"method": "GET", "url": "http://127.0.0.1/x", "headers": {"X-A": "a\r\nHost: b"}},
            "'headers.X-A'",
        ),
        ({"method": "GET", "url": "http://127.0.0.1/x", "extra": 1}, "'extra'"),
    ],
)
async def test_http_arguments_validated(arguments: dict, named: str) -> None:
    with pytest.raises(ToolError) as caught:
        await http_request(arguments, ALLOWED, policy=LOOPBACK)
    assert named in str(caught.value)
    assert caught.value.retryable is False


# --------------------------------------------------------------------------- call_webhook


def _spec(server: Server, path: str = "/hook", **overrides: object) -> WebhookSpec:
    values: dict = {
        "name": "crm_lookup",
        "url": server.url(path),
        "secret_header": "X-Api-Key",
        "secret_env": SECRET_ENV,
    }
    values.update(overrides)
    return WebhookSpec(**values)


ENVIRON = {SECRET_ENV: SECRET}


async def test_webhook_sends_body_and_headers(server: Server) -> None:
    result = await call_webhook(
        _spec(server), {"customer": 42}, "call-1", environ=ENVIRON, policy=LOOPBACK
    )
    assert result == "done"
    request = server.requests[0]
    assert request.method == "POST"
    assert request.headers["Idempotency-Key"] == "call-1"
    assert request.headers["X-Api-Key"] == SECRET
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(server.bodies["/hook"]) == {
        "tool": "crm_lookup",
        "arguments": {"customer": 42},
        "call_id": "call-1",
    }


async def test_webhook_without_secret_sends_no_secret_header(server: Server) -> None:
    spec = _spec(server, secret_header=None, secret_env=None)
    assert await call_webhook(spec, {}, "call-2", environ={}, policy=LOOPBACK) == "done"
    assert "X-Api-Key" not in server.requests[0].headers


async def test_webhook_result_unwrapping(server: Server) -> None:
    result = await call_webhook(
        _spec(server, "/hook-object"), {}, "k", environ=ENVIRON, policy=LOOPBACK
    )
    assert json.loads(result) == {"rows": [1, 2]}
    result = await call_webhook(
        _spec(server, "/hook-plain"), {}, "k", environ=ENVIRON, policy=LOOPBACK
    )
    assert result == "plain answer"


async def test_webhook_4xx_is_not_retryable(server: Server) -> None:
    with pytest.raises(ToolError) as caught:
        await call_webhook(_spec(server, "/hook-400"), {}, "k", environ=ENVIRON, policy=LOOPBACK)
    message = str(caught.value)
    assert message.startswith("webhook crm_lookup answered 400: bad arguments: ")
    assert len(message) == len("webhook crm_lookup answered 400: ") + 200
    assert caught.value.retryable is False


@pytest.mark.parametrize("path", ["/hook-503", "/hook-429", "/hook-408"])
async def test_webhook_retryable_statuses(server: Server, path: str) -> None:
    with pytest.raises(ToolError, match=f"answered {path[-3:]}") as caught:
        await call_webhook(_spec(server, path), {}, "k", environ=ENVIRON, policy=LOOPBACK)
    assert caught.value.retryable is True


async def test_webhook_redirect_not_followed(server: Server) -> None:
    with pytest.raises(ToolError, match="answered 302") as caught:
        await call_webhook(_spec(server, "/hook-302"), {}, "k", environ=ENVIRON, policy=LOOPBACK)
    assert caught.value.retryable is False


async def test_webhook_timeout_and_connection_error_are_retryable(server: Server) -> None:
    with pytest.raises(ToolError, match="timed out") as caught:
        await call_webhook(
            _spec(server, "/slow", timeout_s=0.3), {}, "k", environ=ENVIRON, policy=LOOPBACK
        )
    assert caught.value.retryable is True
    closed = WebhookSpec("crm_lookup", f"http://127.0.0.1:{_closed_port()}/hook")
    with pytest.raises(ToolError, match="could not reach") as caught:
        await call_webhook(closed, {}, "k", environ={}, policy=LOOPBACK)
    assert caught.value.retryable is True


async def test_webhook_missing_env_variable(server: Server) -> None:
    other_secrets = {"UNRELATED": SECRET}
    with pytest.raises(ToolError) as caught:
        await call_webhook(_spec(server), {}, "k", environ=other_secrets, policy=LOOPBACK)
    message = str(caught.value)
    assert SECRET_ENV in message
    assert SECRET not in message
    assert caught.value.retryable is False
    assert server.requests == []


@pytest.mark.parametrize("status", [200, 400, 503])
async def test_webhook_secret_never_shown(server: Server, status: int) -> None:
    """The server echoes the secret back: neither a result nor an error may show it."""
    spec = _spec(server, f"/hook-echo?status={status}")
    if status == 200:
        result = await call_webhook(spec, {}, "k", environ=ENVIRON, policy=LOOPBACK)
        assert SECRET not in result
        assert result == "bad key [redacted]"
        return
    with pytest.raises(ToolError) as caught:
        await call_webhook(spec, {}, "k", environ=ENVIRON, policy=LOOPBACK)
    error = caught.value
    assert server.requests[0].headers["X-Api-Key"] == SECRET
    assert SECRET not in str(error) and SECRET not in repr(error)
    assert "[redacted]" in str(error)
    assert error.__context__ is None and error.__cause__ is None


async def test_webhook_secret_not_in_connection_or_header_errors() -> None:
    closed = WebhookSpec(
        "crm_lookup",
        f"http://127.0.0.1:{_closed_port()}/hook",
        secret_header="X-Api-Key",
        secret_env=SECRET_ENV,
    )
    with pytest.raises(ToolError) as caught:
        await call_webhook(closed, {}, "k", environ=ENVIRON, policy=LOOPBACK)
    assert SECRET not in str(caught.value) and caught.value.__context__ is None
    with pytest.raises(ToolError) as caught:
        await call_webhook(
            closed, {}, "k", environ={SECRET_ENV: SECRET + "\r\nX: y"}, policy=LOOPBACK
        )
    assert SECRET not in str(caught.value)
    assert caught.value.retryable is False


async def test_webhook_arguments_must_be_json(server: Server) -> None:
    with pytest.raises(ToolError, match="not JSON") as caught:
        await call_webhook(_spec(server), {"x": object()}, "k", environ=ENVIRON, policy=LOOPBACK)
    assert caught.value.retryable is False


# --------------------------------------------------------------------------- truncate_result


def test_truncate_result_boundaries() -> None:
    assert truncate_result("") == ""
    assert truncate_result("a" * 4000) == "a" * 4000
    cut = truncate_result("a" * 4001)
    assert len(cut) <= 4000
    kept = cut.split("\n…[cut:")[0]
    assert cut == kept + f"\n…[cut: {4001 - len(kept)} of 4001 chars]"
    assert len(cut) == 4000


@pytest.mark.parametrize("total", [101, 150, 1_000, 99_999, 1_000_000])
def test_truncate_result_fits_the_limit(total: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(total))
    cut = truncate_result(text, 100)
    assert len(cut) == 100
    kept, _, marker = cut.partition("\n…[cut: ")
    assert text.startswith(kept)
    assert marker == f"{total - len(kept)} of {total} chars]"


def test_truncate_result_tiny_limit() -> None:
    assert truncate_result("abcdef", 6) == "abcdef"
    assert truncate_result("abcdefg", 3) == "abc"


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:55432/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.5/hook", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[::1]:8080/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4 written as IPv6
        ("http://0.0.0.0:80/", "reserved"),
        ("http://100.64.0.1/", "reserved"),  # shared address space
    ],
)
def test_a_url_written_with_a_non_public_address_is_refused(url: str, kind: str) -> None:
    why = AddressPolicy().refused_literal(url)
    assert why is not None and kind in why and "tools.allow_addresses" in why, why


def test_public_addresses_names_and_allowed_kinds_pass_the_registration_check() -> None:
    strict = AddressPolicy()
    assert strict.refused_literal("https://93.184.216.34/hook") is None
    assert strict.refused_literal("https://hooks.example.com/x") is None  # checked at call time
    assert LOOPBACK.refused_literal("http://127.0.0.1:9/x") is None
    assert LOOPBACK.refused_literal("http://10.0.0.5/x") is not None


async def test_a_name_that_resolves_to_a_refused_address_is_refused_at_call_time(
    server: Server,
) -> None:
    # `localhost` passes the registration check (a name) but resolves to loopback, which
    # this policy refuses: nothing is sent, and the model is told why, not to retry.
    spec = _spec(server, url=f"http://localhost:{server.port}/hook")
    with pytest.raises(ToolError) as info:
        await call_webhook(spec, {}, "k", environ=ENVIRON, policy=AddressPolicy())
    assert not info.value.retryable
    assert "'localhost' resolves to" in str(info.value) and "loopback" in str(info.value)
    url = f"http://localhost:{server.port}/hello"
    with pytest.raises(ToolError) as info:
        await http_request({"method": "GET", "url": url}, ["localhost"], policy=AddressPolicy())
    assert not info.value.retryable and "loopback" in str(info.value)
    assert server.requests == []


async def test_a_call_goes_to_the_address_checked_with_the_name_kept(server: Server) -> None:
    # Sent to the resolved and checked address itself, so a DNS answer that changes
    # after the check cannot redirect it; the server still sees the name it was given.
    spec = _spec(server, url=f"http://localhost:{server.port}/hook")
    assert await call_webhook(spec, {}, "k", environ=ENVIRON, policy=LOOPBACK) == "done"
    assert server.requests[0].headers["Host"] == f"localhost:{server.port}"
    assert server.requests[0].remote == "127.0.0.1"  # where the test server listens
