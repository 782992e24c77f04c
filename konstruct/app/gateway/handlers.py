"""The gateway's request handlers: a key's tenant, its models, and one message run to its answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from opentelemetry.trace import Span
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy

from konstruct.agents.models import HandleMessageInput, HandleMessageResult
from konstruct.agents.store.agents import agent_exists, list_agents
from konstruct.agents.store.key_limits import Admission, admit, spend_tokens
from konstruct.agents.store.keys import KeyOwner, key_owner
from konstruct.agents.streaming import Shown, StreamView
from konstruct.app.gateway.errors import (
    GatewayError,
    model_not_found,
    quota_spent,
    rate_limited,
    unauthorized,
    workflow_failure,
)
from konstruct.app.gateway.wire import (
    ChunkWriter,
    Pending,
    ResponseEventWriter,
    StreamWriter,
    completion_body,
    error_event,
    header_id,
    inbound_text,
    message_input,
    parse_chat_request,
    parse_responses_request,
    requested_format,
    response_body,
    responses_text,
    split_model,
)
from konstruct.app.notices import Notices, events_until
from konstruct.config import Settings
from konstruct.experiments.store.budgets import month_spent
from konstruct.platform import db
from konstruct.platform.errors import UnknownAgent, innermost_application_error, is_failure
from konstruct.platform.naming import message_workflow_id
from konstruct.platform.temporal.search_attributes import message_search_attributes

log = logging.getLogger("konstruct.app.gateway")

# How often a waiting request asks the workflow itself whether it waits for an
# approval, while the notification listener is down (or was, since the request began).
PROGRESS_POLL_S = 2.0
PROGRESS_QUERY_TIMEOUT = timedelta(seconds=2)
# After a notice, how long to let the workflow's `progress` catch up with it (the
# activity's NOTIFY commits before the workflow has recorded its pending calls).
PENDING_SETTLE_S = 1.0


class _MessageBody(Protocol):
    """What both endpoints' bodies give the message path."""

    @property
    def model(self) -> str: ...

    @property
    def user(self) -> str | None: ...


Body = TypeVar("Body", bound=_MessageBody)


class Gateway:
    """The request handlers, with their Temporal client, pool and listener."""

    def __init__(self, client: Client, settings: Settings, task_queue: str) -> None:
        self.client = client
        self.settings = settings
        self.task_queue = task_queue
        self._pool: asyncpg.Pool | None = None
        self._in_flight = 0
        self.notices = Notices(db.app_url(settings))

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the gateway has not started"
        return self._pool

    # -- requests

    async def _tenant(self, request: Request) -> str:
        return (await self._owner(request)).tenant_id

    async def _owner(self, request: Request) -> KeyOwner:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise unauthorized(
                "You didn't provide an API key: send `Authorization: Bearer KEY`"
                " (make one with `konstruct keys create TENANT`)"
            )
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("The Authorization header must be `Bearer KEY`")
        async with self.pool.acquire() as conn:
            found = await key_owner(conn, key.strip())
        if found is None:
            raise unauthorized("Incorrect API key provided (unknown or revoked)")
        return found

    async def _admit(self, owner: KeyOwner) -> Admission | None:
        """Take one request from a limited key's allowance (None: the key has no
        limits); a 429 in OpenAI's shape when none is left."""
        if not owner.limits.any:
            return None
        async with db.tenant_transaction(self.pool, owner.tenant_id) as conn:
            admission = await admit(conn, owner.tenant_id, owner.key_id, owner.limits)
        if not admission.admitted:
            raise rate_limited(admission)
        return admission

    async def _spend(self, owner: KeyOwner, tokens: int) -> None:
        if owner.limits.tpm is None or tokens <= 0:
            return
        async with db.tenant_transaction(self.pool, owner.tenant_id) as conn:
            await spend_tokens(conn, owner.key_id, tokens)

    async def _may_answer(self, tenant: str, agent: str) -> tuple[bool, str | None]:
        """Whether the tenant has the agent, and why its monthly budget is spent (None:
        it is not), in one transaction."""
        async with db.tenant_transaction(self.pool, tenant) as conn:
            return await agent_exists(conn, tenant, agent), await month_spent(conn, tenant)

    async def _agents(self, tenant: str) -> list[str]:
        async with db.tenant_transaction(self.pool, tenant) as conn:
            return [a.agent_id for a in await list_agents(conn, tenant)]

    async def models(self, request: Request) -> Response:
        tenant = await self._tenant(request)
        data = [
            {"id": f"{tenant}/{agent}", "object": "model", "created": 0, "owned_by": tenant}
            for agent in await self._agents(tenant)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request, span: Span) -> Response:
        asked = await self._prepare(request, span, parse_chat_request, inbound_text)
        body = asked.body
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            write = ChunkWriter(
                f"chatcmpl-{asked.message.message_id}", body.model, int(time.time())
            )
            return await self._streamed(asked, write, include_usage)
        answered = await self._answered(asked)
        if isinstance(answered, Response):
            return answered
        outcome, headers = answered
        return JSONResponse(
            completion_body(
                f"chatcmpl-{asked.message.message_id}", body.model, int(time.time()), outcome
            ),
            headers=headers,
        )

    async def responses(self, request: Request, span: Span) -> Response:
        """`POST /v1/responses`: the same message path as a chat completion, answered
        as a Responses API object, or its events as the text is written."""
        asked = await self._prepare(request, span, parse_responses_request, responses_text)
        response_id = f"resp_{asked.message.message_id}"
        if asked.body.stream:
            return await self._streamed(
                asked, ResponseEventWriter(response_id, asked.body.model), False
            )
        answered = await self._answered(asked)
        if isinstance(answered, Response):
            return answered
        outcome, headers = answered
        return JSONResponse(response_body(response_id, asked.body.model, outcome), headers=headers)

    async def _prepare(
        self,
        request: Request,
        span: Span,
        parse: Callable[[bytes], Body],
        text_of: Callable[[Body], str],
    ) -> _Asked[Body]:
        """The request's key admitted (before its body is read), its body parsed, and
        its text made a message to the body's `model` (TENANT/AGENT) of the key's
        tenant, once the tenant is known to have that agent and budget left."""
        owner = await self._owner(request)
        admission = await self._admit(owner)
        body = parse(await request.body())
        text, model, user = text_of(body), body.model, body.user
        tenant = owner.tenant_id
        span.set_attribute("konstruct.tenant", tenant)
        wanted_tenant, agent = split_model(model)
        span.set_attribute("konstruct.agent", agent)
        if wanted_tenant != tenant:
            raise model_not_found(model)
        has_agent, spent = await self._may_answer(tenant, agent)
        if not has_agent:
            # Answered before a workflow starts: no failed HandleMessage is left behind.
            raise model_not_found(model)
        if spent is not None:
            raise quota_spent(spent)
        thread = header_id(request, "X-Konstruct-Thread") or user or f"http-{_new_id()}"
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
                "sender": user or "api",
                "text": text,
                **({"response_format": wanted} if (wanted := requested_format(body)) else {}),
            }
        )
        span.set_attribute("konstruct.workflow_id", workflow_id)
        return _Asked(body, owner, admission, workflow_id, message, idempotency_key is not None)

    async def _answered(
        self,
        asked: _Asked[Body],
        running: asyncio.Future[HandleMessageResult | Pending] | None = None,
    ) -> tuple[HandleMessageResult, dict[str, str]] | Response:
        """The message run to its reply (or the `running` run's), with the answer's
        headers; or the 202 of a message that waits for an approval."""
        try:
            outcome = await (
                running
                if running is not None
                else self._answer(asked.workflow_id, asked.message, retry=asked.retry)
            )
        except WorkflowFailureError as exc:
            raise self._failure(exc, asked.body.model) from None
        if isinstance(outcome, Pending):
            return JSONResponse(
                outcome.body(),
                status_code=202,
                headers={"X-Konstruct-Workflow-Id": asked.workflow_id},
            )
        await self._spend(asked.owner, outcome.usage.total_tokens)
        headers = {**asked.headers(), "X-Konstruct-Degraded": str(outcome.degraded).lower()}
        return outcome, headers

    @staticmethod
    def _failure(exc: WorkflowFailureError, model: str) -> GatewayError:
        """What a failed message workflow answers: an agent the tenant does not have is
        the same 404 as another tenant's model (no probing); anything else says why."""
        if is_failure(innermost_application_error(exc), UnknownAgent):
            return model_not_found(model)
        return workflow_failure(exc)

    async def _streamed(
        self, asked: _Asked[Body], write: StreamWriter, include_usage: bool
    ) -> Response:
        """The reply as it is written: each model step's text as the model makes it,
        tool calls as they start and end (Konstruct events), then the stored reply's
        rest (`konstruct.agents.streaming.StreamView`: nothing shown twice), the stop,
        and the usage when asked for.

        The stream begins with the message's first live event; a message that fails
        or waits for an approval before that is answered as without `stream` (an
        error, or the 202). A wait for approval after text was shown ends the stream
        with a Konstruct event carrying the 202's body.
        """
        message = asked.message.model_copy(update={"stream": True})
        # Subscribed before the workflow starts: no event can come before we listen.
        queue = self.notices.subscribe(asked.workflow_id)
        answering = asyncio.ensure_future(
            self._answer(asked.workflow_id, message, retry=asked.retry)
        )
        first = asyncio.ensure_future(queue.get())

        def let_go() -> None:
            self.notices.unsubscribe(asked.workflow_id, queue)
            for future in (first, answering):
                if not future.done():
                    future.cancel()

        try:
            await asyncio.wait({first, answering}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done() and (
                answering.exception() is not None or isinstance(answering.result(), Pending)
            ):
                answered = await self._answered(asked, answering)
                assert isinstance(answered, Response)  # a failure raised; a wait is the 202
                return answered
        except BaseException:
            let_go()
            raise

        async def events() -> AsyncIterator[bytes]:
            view = StreamView()
            try:
                yield write.start()
                async for event in events_until(queue, answering, first):
                    for shown in view.feed(event):
                        yield _shown(write, shown)
                try:
                    outcome = answering.result()
                except WorkflowFailureError as exc:
                    failure = self._failure(exc, asked.body.model)
                    yield error_event(failure.message, failure.type)
                    return
                if isinstance(outcome, Pending):
                    yield write.pending(outcome)
                    return
                for shown in view.finish(outcome.response, max(0, outcome.steps - 1)):
                    yield _shown(write, shown)
                await self._spend(asked.owner, outcome.usage.total_tokens)
                yield write.finish(outcome, include_usage)
            finally:
                let_go()

        return StreamingResponse(events(), media_type="text/event-stream", headers=asked.headers())

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


def _shown(write: StreamWriter, shown: Shown) -> bytes:
    if shown.event is not None:
        return write.konstruct(shown.event)
    return write.text(shown.text)


@dataclass(frozen=True)
class _Asked(Generic[Body]):
    """A request made ready to run: its body, whose key, the key's admission, and
    the message and its workflow id (`retry`: the client named the message id)."""

    body: Body
    owner: KeyOwner
    admission: Admission | None
    workflow_id: str
    message: HandleMessageInput
    retry: bool

    def headers(self) -> dict[str, str]:
        return {
            "X-Konstruct-Workflow-Id": self.workflow_id,
            **(self.admission.headers() if self.admission is not None else {}),
        }
