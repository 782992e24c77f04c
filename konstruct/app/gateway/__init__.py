"""`konstruct gateway`: an OpenAI-compatible HTTP front door to `HandleMessage`.

    GET  /v1/models            the agents of the key's tenant, as `TENANT/AGENT` models
    POST /v1/chat/completions  one message to an agent; the reply as a `chat.completion`
                               (or, with `stream: true`, `chat.completion.chunk` events
                               carrying the text as the model writes it)
    POST /v1/responses         the same, as a Responses API object or its events
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
the workflow announces it (PostgreSQL `NOTIFY konstruct_awaiting_approval`); a
streamed message's live text comes the same way (`konstruct.agents.streaming`),
through the process's one listener (`konstruct.app.notices`).

    errors     GatewayError: the non-2xx answers
    wire       the request body, the completion and its chunks, the 202
    handlers   Gateway: the handlers, the workflow run, the wait for an approval
    app        the Starlette app and `serve`
"""

from konstruct.app.gateway.app import create_app, serve
from konstruct.app.gateway.errors import GatewayError
from konstruct.app.gateway.handlers import Gateway
from konstruct.app.gateway.wire import (
    ChatCompletionRequest,
    ChunkWriter,
    Pending,
    completion_body,
    inbound_text,
    parse_chat_request,
    split_model,
)
from konstruct.app.notices import AWAITING_APPROVAL_CHANNEL, Notices

__all__ = [
    "AWAITING_APPROVAL_CHANNEL",
    "Notices",
    "ChatCompletionRequest",
    "ChunkWriter",
    "Gateway",
    "GatewayError",
    "Pending",
    "completion_body",
    "create_app",
    "inbound_text",
    "parse_chat_request",
    "serve",
    "split_model",
]
