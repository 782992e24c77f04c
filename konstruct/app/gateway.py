"""`konstruct gateway`: an OpenAI-compatible HTTP front door to `HandleMessage`.

    GET  /v1/models            the agents of the key's tenant, as `TENANT/AGENT` models
    POST /v1/chat/completions  one message to an agent; the reply as a `chat.completion`
                               (or `chat.completion.chunk` events with `stream: true`)
    GET  /health               200 once the gateway serves (no key needed)

A request carries a tenant's key (`Authorization: Bearer ksk_...`, made with
`konstruct keys create TENANT`); the tenant comes from the key only. The last
`user` message is the inbound message; header `X-Konstruct-Thread` (else the
`user` field, else a new thread per request) names the thread, header
`Idempotency-Key` the message id, so a retry gets the same reply and stores one
turn. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

The process hosts a worker for its task queue, so it starts each workflow with
eager workflow start: the first workflow task runs here without a round trip
through the task queue. A message that pauses for a person's approval of a tool
call is answered with HTTP 202 and `"status": "awaiting_approval"` as soon as
the workflow announces it (PostgreSQL `NOTIFY konstruct_awaiting_approval`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, Literal

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import Span
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from konstruct.agents.models import HandleMessageInput, HandleMessageResult
from konstruct.agents.store.agents import list_agents
from konstruct.agents.store.keys import tenant_for_key
from konstruct.config import Settings
from konstruct.platform import db
from konstruct.platform.errors import field_problems, innermost_application_error
from konstruct.platform.naming import message_workflow_id
from konstruct.platform.temporal.search_attributes import message_search_attributes

log = logging.getLogger("konstruct.app.gateway")
_tracer = trace.get_tracer("konstruct.app.gateway")

# The channel `HandleMessage` notifies (payload: its workflow id) when it starts
# waiting for a person to approve a tool call; delivered when that commits.
AWAITING_APPROVAL_CHANNEL = "konstruct_awaiting_approval"
# A streamed reply is cut into pieces of about this many characters.
STREAM_CHUNK_CHARS = 40
# How often a waiting request asks the workflow itself whether it waits for an
# approval, while the notification listener is down (or was, since the request began).
PROGRESS_POLL_S = 2.0
PROGRESS_QUERY_TIMEOUT = timedelta(seconds=2)
# After a notice, how long to let the workflow's `progress` catch up with it (the
# activity's NOTIFY commits before the workflow has recorded its pending calls).
PENDING_SETTLE_S = 1.0
# The listener's reconnect backoff, and how often it checks its idle connection.
LISTEN_RETRY_FIRST_S = 0.5
LISTEN_RETRY_MAX_S = 30.0
LISTEN_KEEPALIVE_S = 15.0
MAX_HEADER_ID = 200


# --- errors -------------------------------------------------------------------------


class GatewayError(Exception):
    """An answer other than 2xx, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _invalid(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param)


def _model_not_found(model: str) -> GatewayError:
    # The same answer for another tenant's agent and for one that does not exist,
    # so a key cannot learn what other tenants have.
    return GatewayError(
        404,
        f"The model {model!r} does not exist or you do not have access to it"
        " (see GET /v1/models for this key's models)",
        param="model",
        code="model_not_found",
    )


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


# --- the request body ---------------------------------------------------------------


def _content_text(value: Any) -> Any:
    """Message content as one string: a string, null, or text parts joined by newlines."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of text parts or null")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"part {i} is {kind!r}: only text parts are supported")
        text = part.get("text")
        if not isinstance(text, str) or set(part) - {"type", "text"}:
            raise ValueError(f'part {i} must be {{"type": "text", "text": "..."}}')
        texts.append(text)
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str | None, BeforeValidator(_content_text)] = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # What the openai client puts in an assistant message handed back to it.
    refusal: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`: the fields used, and OpenAI's usual
    fields accepted and ignored. Any other field is an error."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, min_length=1, max_length=MAX_HEADER_ID)
    n: Literal[1] | None = None
    # Accepted and ignored: the agent's own settings decide.
    temperature: Any = None
    top_p: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    metadata: Any = None
    seed: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    logprobs: Any = None


def _problem_text(text: str) -> str:
    return text.removeprefix("Value error, ")


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """The body, or a 400 whose message names each offending field (`messages.0.role: ...`)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"the body is not valid JSON: {exc}", None) from None
    if not isinstance(data, dict):
        raise _invalid("the body must be a JSON object", None)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        problems = field_problems(exc, root="(body)")
        message = "; ".join(f"{name}: {_problem_text(text)}" for name, text in problems)
        raise _invalid(message, problems[0][0]) from None


def split_model(model: str) -> tuple[str, str]:
    """`TENANT/AGENT` → (tenant, agent); a 400 naming `model` otherwise."""
    tenant, slash, agent = model.partition("/")
    if not slash or not tenant or not agent or "/" in agent:
        raise _invalid(
            f"model must be TENANT/AGENT (for example demo/assistant), not {model!r}", "model"
        )
    return tenant, agent


def inbound_text(body: ChatCompletionRequest) -> str:
    """The last `user` message's text: what the agent answers."""
    for message in reversed(body.messages):
        if message.role == "user":
            return message.content or ""
    raise _invalid("messages must contain a message with role 'user'", "messages")


def header_id(request: Request, name: str) -> str | None:
    """An id given in a header: 1-200 characters, else a 400 naming the header."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_HEADER_ID:
        raise _invalid(f"header {name} must be 1-{MAX_HEADER_ID} characters", name)
    return value


# Where a HandleMessage field came from, for a 400 that names what the client sent.
_INPUT_ORIGIN = {
    "text": "messages",
    "thread_id": "X-Konstruct-Thread",
    "message_id": "Idempotency-Key",
    "sender": "user",
    "agent_id": "model",
    "tenant_id": "model",
}


def message_input(message: dict[str, Any]) -> HandleMessageInput:
    try:
        return HandleMessageInput.model_validate(message)
    except ValidationError as exc:
        problems = [(_INPUT_ORIGIN.get(name, name), text) for name, text in field_problems(exc)]
        raise _invalid(
            "; ".join(f"{name}: {_problem_text(text)}" for name, text in problems),
            problems[0][0],
        ) from None


# --- answers ------------------------------------------------------------------------


def _usage(result: HandleMessageResult) -> dict[str, int]:
    return result.usage.model_dump()


def completion_body(
    completion_id: str, model: str, created: int, result: HandleMessageResult
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.response},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(result),
    }


def completion_chunks(
    completion_id: str,
    model: str,
    created: int,
    result: HandleMessageResult,
    include_usage: bool,
) -> Iterator[dict[str, Any]]:
    """The reply as `chat.completion.chunk` objects: role, content pieces, stop, usage."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    yield chunk({"role": "assistant"})
    text = result.response
    for start in range(0, len(text), STREAM_CHUNK_CHARS):
        yield chunk({"content": text[start : start + STREAM_CHUNK_CHARS]})
    yield chunk({}, "stop")
    if include_usage:
        yield {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(result),
        }


async def _sse(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


@dataclass
class Pending:
    """A message waiting for a person to approve a tool call (answered with 202)."""

    workflow_id: str
    message_id: str
    pending: list[Any]

    def body(self) -> dict[str, Any]:
        return {
            "object": "konstruct.pending",
            "status": "awaiting_approval",
            "workflow_id": self.workflow_id,
            "message_id": self.message_id,
            "pending": self.pending,
        }


# --- the approval notices -----------------------------------------------------------


@dataclass
class ApprovalNotices:
    """One LISTEN connection for `konstruct_awaiting_approval`, shared by all requests.

    A request registers a future for its workflow id before it starts the workflow,
    so no notice of that workflow can slip between the start and the wait. The
    connection is re-made (with backoff) whenever it drops; `generation` counts
    connections, so a waiter can tell that notices may have been missed meanwhile.
    """

    url: str
    connected: bool = False
    generation: int = 0
    _waiters: dict[str, set[asyncio.Future[None]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def register(self, workflow_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(workflow_id, set()).add(future)
        return future

    def unregister(self, workflow_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._waiters.get(workflow_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[workflow_id]
        future.cancel()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for future in self._waiters.get(payload, ()):
            if not future.done():
                future.set_result(None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="gateway-approval-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _listen(self) -> None:
        backoff = LISTEN_RETRY_FIRST_S
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.url, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(AWAITING_APPROVAL_CHANNEL, self._notified)
                self.connected = True
                self.generation += 1
                if backoff > LISTEN_RETRY_FIRST_S:
                    log.info("listening for %s again", AWAITING_APPROVAL_CHANNEL)
                backoff = LISTEN_RETRY_FIRST_S
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_KEEPALIVE_S)
                    except TimeoutError:
                        # A connection dropped without a word is only found by using it.
                        await conn.execute("select 1", timeout=5)
                log.warning("the %s listener lost its connection", AWAITING_APPROVAL_CHANNEL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "the %s listener is down (%s: %s); retrying in %g s",
                    AWAITING_APPROVAL_CHANNEL,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self.connected = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(LISTEN_RETRY_MAX_S, backoff * 2)


# --- the gateway --------------------------------------------------------------------


class Gateway:
    """The request handlers, with their Temporal client, pool and listener."""

    def __init__(self, client: Client, settings: Settings, task_queue: str) -> None:
        self.client = client
        self.settings = settings
        self.task_queue = task_queue
        self._pool: asyncpg.Pool | None = None
        self._in_flight = 0
        self.notices = ApprovalNotices(db.app_url(settings))

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the gateway has not started"
        return self._pool

    # -- requests

    async def _tenant(self, request: Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise _unauthorized(
                "You didn't provide an API key: send `Authorization: Bearer KEY`"
                " (make one with `konstruct keys create TENANT`)"
            )
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("The Authorization header must be `Bearer KEY`")
        found = await tenant_for_key(self.pool, key.strip())
        if found is None:
            raise _unauthorized("Incorrect API key provided (unknown or revoked)")
        return found[0]

    async def _agents(self, tenant: str) -> list[str]:
        return [a.agent_id for a in await list_agents(self.pool, tenant)]

    async def models(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        data = [
            {"id": f"{tenant}/{agent}", "object": "model", "created": 0, "owned_by": tenant}
            for agent in await self._agents(tenant)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request, span: Span) -> Response:
        tenant = await self._tenant(request)
        span.set_attribute("konstruct.tenant", tenant)
        body = parse_chat_request(await request.body())
        wanted_tenant, agent = split_model(body.model)
        span.set_attribute("konstruct.agent", agent)
        if wanted_tenant != tenant:
            raise _model_not_found(body.model)
        text = inbound_text(body)
        thread = header_id(request, "X-Konstruct-Thread") or body.user or f"http-{_new_id()}"
        idempotency_key = header_id(request, "Idempotency-Key")
        message_id = idempotency_key or _new_id()
        workflow_id = message_workflow_id(tenant, message_id)
        message = message_input(
            {
                "message_id": message_id,
                "tenant_id": tenant,
                "agent_id": agent,
                "thread_id": thread,
                "channel": "http",
                "sender": body.user or "api",
                "text": text,
            }
        )
        span.set_attribute("konstruct.workflow_id", workflow_id)
        try:
            outcome = await self._answer(workflow_id, message, retry=idempotency_key is not None)
        except WorkflowFailureError as exc:
            # An agent the tenant does not have: the workflow says so at once, and the
            # answer is the same 404 as another tenant's model (no probing).
            cause = innermost_application_error(exc)
            if cause is not None and cause.type == "UnknownAgent":
                raise _model_not_found(body.model) from None
            raise
        if isinstance(outcome, Pending):
            return JSONResponse(
                outcome.body(), status_code=202, headers={"X-Konstruct-Workflow-Id": workflow_id}
            )
        headers = {
            "X-Konstruct-Workflow-Id": workflow_id,
            "X-Konstruct-Degraded": "true" if outcome.degraded else "false",
        }
        completion_id = f"chatcmpl-{message_id}"
        created = int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = completion_chunks(completion_id, body.model, created, outcome, include_usage)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers=headers)
        return JSONResponse(
            completion_body(completion_id, body.model, created, outcome), headers=headers
        )

    # -- running the workflow

    async def _answer(
        self, workflow_id: str, message: HandleMessageInput, retry: bool
    ) -> HandleMessageResult | Pending:
        """Start (or attach to) the message's workflow; its result, or Pending as soon as
        it waits for an approval."""
        from workflows.handle_message import HandleMessage

        # Eager while this process is not busy: see gateway.eager_max_in_flight.
        eager = self._in_flight < self.settings.gateway.eager_max_in_flight
        self._in_flight += 1
        notice = self.notices.register(workflow_id)
        generation = self.notices.generation
        result: asyncio.Task[HandleMessageResult] | None = None
        try:
            handle = await self.client.start_workflow(
                HandleMessage.run,
                message.model_dump(),
                id=workflow_id,
                task_queue=self.task_queue,
                request_eager_start=eager,
                search_attributes=message_search_attributes(message.tenant_id),
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"{message.tenant_id}/{message.agent_id} via http:"
                f" {message.text[:60]}",
            )
            result = asyncio.ensure_future(handle.result())
            either: set[asyncio.Future[Any]] = {result, notice}
            # A client retry (its own Idempotency-Key) may attach to a run that announced
            # its approval wait before we listened, so ask it. A random id is a new run,
            # which cannot have: our future was registered before it existed.
            if retry and await self._awaiting_approval(workflow_id):
                return await self._pending(workflow_id, message.message_id, settle=False)
            while True:
                await asyncio.wait(
                    either, timeout=PROGRESS_POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
                if result.done():
                    return result.result()
                if notice.done():
                    return await self._pending(workflow_id, message.message_id, settle=True)
                # No notice can be missed while one connection listens the whole time;
                # otherwise ask the workflow itself, every PROGRESS_POLL_S.
                if not self.notices.connected or self.notices.generation != generation:
                    generation = self.notices.generation
                    if await self._awaiting_approval(workflow_id):
                        return await self._pending(workflow_id, message.message_id, settle=False)
        finally:
            self._in_flight -= 1
            self.notices.unregister(workflow_id, notice)
            if result is not None and not result.done():
                result.cancel()

    async def _progress(self, workflow_id: str) -> dict[str, Any] | None:
        try:
            progress = await self.client.get_workflow_handle(workflow_id).query(
                "progress", rpc_timeout=PROGRESS_QUERY_TIMEOUT
            )
        except Exception as exc:  # no such query yet, a run without a worker, a timeout
            log.debug("progress query of %s failed: %s", workflow_id, exc)
            return None
        return progress if isinstance(progress, dict) else None

    async def _awaiting_approval(self, workflow_id: str) -> bool:
        progress = await self._progress(workflow_id)
        return progress is not None and progress.get("status") == "awaiting_approval"

    async def _pending(self, workflow_id: str, message_id: str, settle: bool) -> Pending:
        """The 202 answer with the workflow's pending calls ([] if it does not say).

        A query is answered from the workflow's last completed task, which may not
        show the wait yet when its notice arrives; so after a notice ask again, for up
        to PENDING_SETTLE_S, until `progress` shows it.
        """
        deadline = time.monotonic() + (PENDING_SETTLE_S if settle else 0)
        while True:
            progress = await self._progress(workflow_id)
            if progress is not None and progress.get("status") == "awaiting_approval":
                return Pending(workflow_id, message_id, list(progress.get("pending") or []))
            if time.monotonic() >= deadline:
                pending = (progress or {}).get("pending") or []
                return Pending(workflow_id, message_id, list(pending))
            await asyncio.sleep(0.05)

    # -- lifecycle

    async def open(self) -> None:
        self._pool = await db.create_pool(db.app_url(self.settings), min_size=1, max_size=10)
        self.notices.start()

    async def close(self) -> None:
        await self.notices.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


_WORKFLOW_FAILURE_STATUS = {"InvalidInput": 400, "UnknownTenant": 404, "UnknownAgent": 404}


def _failure(exc: WorkflowFailureError) -> GatewayError:
    from konstruct.app.cli.output import failure_message

    cause = innermost_application_error(exc)
    kind = cause.type if cause is not None and cause.type else ""
    status = _WORKFLOW_FAILURE_STATUS.get(kind, 500)
    return GatewayError(
        status,
        f"the message failed: {failure_message(exc)}",
        type="invalid_request_error" if status < 500 else "server_error",
        code=kind or None,
    )


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
            except WorkflowFailureError as exc:
                response = _failure(exc).response()
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
