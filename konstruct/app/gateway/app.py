"""The gateway as a Starlette app: routes, one span and error shape per request, and `serve`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import Span
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client
from temporalio.service import RPCError

from konstruct.app.gateway.errors import GatewayError
from konstruct.app.gateway.handlers import Gateway
from konstruct.config import Settings

log = logging.getLogger("konstruct.app.gateway")
_tracer = trace.get_tracer("konstruct.app.gateway")


Handler = Callable[[Request], Awaitable[Response]]
# What the pool raises while PostgreSQL is down or restarting (a 503, not a 500).
_DATABASE_DOWN = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def _guarded(name: str, handler: Callable[[Request, Span], Awaitable[Response]]) -> Handler:
    """One span and one log line per request; every failure answered in OpenAI's shape,
    never with a traceback."""

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        with _tracer.start_as_current_span(name) as span:
            try:
                response = await handler(request, span)
            except GatewayError as exc:
                response = exc.response()
            except RPCError as exc:
                log.warning("%s: Temporal answered %s: %s", name, exc.status.name, exc.message)
                response = GatewayError(
                    503, "Temporal is not answering; try again", type="server_error"
                ).response()
            except _DATABASE_DOWN as exc:
                log.warning("%s: database unavailable: %s", name, exc)
                response = GatewayError(
                    503, "the database is not answering; try again", type="server_error"
                ).response()
            except Exception:
                log.exception("%s failed", name)
                response = GatewayError(
                    500, "internal error (see the gateway's log)", type="server_error"
                ).response()
            span.set_attribute("http.response.status_code", response.status_code)
            log.debug(
                "%s %s -> %d in %.0f ms",
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
            return response

    return endpoint


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Unknown path" if exc.status_code == 404 else str(exc.detail)
    return GatewayError(exc.status_code, message).response()


async def _server_error(_request: Request, exc: Exception) -> Response:
    log.error("unhandled error: %s", exc, exc_info=exc)
    return GatewayError(
        500, "internal error (see the gateway's log)", type="server_error"
    ).response()


def create_app(
    client: Client,
    settings: Settings,
    task_queue: str | None = None,
    *,
    host_worker: bool = True,
) -> Starlette:
    """The gateway as a Starlette app (serve it with uvicorn, lifespan on).

    Starting the app opens its database pool and the approval listener and, with
    `host_worker`, runs a worker for `task_queue` (default `temporal.task_queue`)
    in this process on `client`, which eager workflow start needs.
    """
    queue = task_queue or settings.temporal.task_queue
    gateway = Gateway(client, settings, queue)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if host_worker:
                from workers.main import build_worker

                worker = await stack.enter_async_context(build_worker(client, settings, queue))
                await stack.enter_async_context(worker)
            await gateway.open()
            stack.push_async_callback(gateway.close)
            log.info("gateway ready (task queue %s)", queue)
            yield

    async def models(request: Request, _span: Span) -> Response:
        return await gateway.models(request)

    async def health(_request: Request) -> Response:
        return JSONResponse({"ok": True, "approval_listener": gateway.notices.connected})

    app = Starlette(
        routes=[
            Route("/v1/models", _guarded("gateway.models", models), methods=["GET"]),
            Route(
                "/v1/chat/completions",
                _guarded("gateway.chat_completions", gateway.chat_completions),
                methods=["POST"],
            ),
            Route(
                "/v1/responses",
                _guarded("gateway.responses", gateway.responses),
                methods=["POST"],
            ),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


async def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """`konstruct gateway`: connect, host a worker, serve until SIGINT/SIGTERM."""
    import uvicorn

    from konstruct.platform.telemetry import setup_telemetry
    from konstruct.platform.temporal.client import connect

    setup_telemetry(settings.telemetry)
    client = await connect(settings)
    host = host or settings.gateway.host
    port = port or settings.gateway.port
    queue = settings.temporal.task_queue
    config = uvicorn.Config(
        create_app(client, settings, queue),
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has only a flag
        await asyncio.sleep(0.05)
    if server.started:
        print(f"gateway ready on http://{host}:{port}/v1 (task queue {queue})", flush=True)
    await serving
