"""The gateway's wire format: the chat request body, and the completion, chunks and 202 it answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.requests import Request

from konstruct.agents.models import HandleMessageInput, HandleMessageResult
from konstruct.app.gateway.errors import invalid
from konstruct.platform.errors import field_problems
from konstruct.providers.responses_wire import input_messages, response_events, response_object

MAX_HEADER_ID = 200


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


class ResponsesRequest(BaseModel):
    """The body of `POST /v1/responses`: text input (a string or messages), the fields
    used, and the API's usual fields accepted and ignored. Any other field is an error."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    stream: bool = False
    user: str | None = Field(None, min_length=1, max_length=MAX_HEADER_ID)
    # Accepted and ignored: the agent's own settings decide.
    temperature: Any = None
    top_p: Any = None
    max_output_tokens: Any = None
    metadata: Any = None
    store: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    text: Any = None
    reasoning: Any = None
    truncation: Any = None
    include: Any = None
    service_tier: Any = None
    stream_options: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    """The body, or a 400 naming each offending field."""
    return _parsed(ResponsesRequest, raw)


def responses_text(body: ResponsesRequest) -> str:
    """The last user message of `input`: what the agent answers; a 400 naming `input`."""
    messages = input_messages(None, body.input)
    if messages is None:
        raise invalid("input must be a string or a list of messages with text content", "input")
    for message in reversed(messages):
        if message["role"] == "user":
            if not message["content"].strip():
                raise invalid("input: the last user message is empty", "input")
            return str(message["content"])
    raise invalid("input must contain a message with role 'user'", "input")


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """The body, or a 400 whose message names each offending field (`messages.0.role: ...`)."""
    return _parsed(ChatCompletionRequest, raw)


Body = TypeVar("Body", bound=BaseModel)


def _parsed(cls: type[Body], raw: bytes) -> Body:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}", None) from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", None)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = field_problems(exc, root="(body)")
        message = "; ".join(f"{name}: {_problem_text(text)}" for name, text in problems)
        raise invalid(message, problems[0][0]) from None


def split_model(model: str) -> tuple[str, str]:
    """`TENANT/AGENT` → (tenant, agent); a 400 naming `model` otherwise."""
    tenant, slash, agent = model.partition("/")
    if not slash or not tenant or not agent or "/" in agent:
        raise invalid(
            f"model must be TENANT/AGENT (for example demo/assistant), not {model!r}", "model"
        )
    return tenant, agent


def inbound_text(body: ChatCompletionRequest) -> str:
    """The last `user` message's text: what the agent answers; a 400 naming its
    content when it is empty or only whitespace."""
    for i in range(len(body.messages) - 1, -1, -1):
        message = body.messages[i]
        if message.role == "user":
            if not (message.content or "").strip():
                field = f"messages.{i}.content"
                raise invalid(f"{field}: the last user message is empty", field)
            return message.content or ""
    raise invalid("messages must contain a message with role 'user'", "messages")


def header_id(request: Request, name: str) -> str | None:
    """An id given in a header: 1-200 characters, else a 400 naming the header."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_HEADER_ID:
        raise invalid(f"header {name} must be 1-{MAX_HEADER_ID} characters", name)
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


def requested_format(body: object) -> Any:
    """The body's structured-answer format in the chat shape (None: free text): a chat
    request's `response_format`, or a Responses request's `text.format` (whose
    json_schema carries name, schema and strict at its own level)."""
    if isinstance(body, ChatCompletionRequest):
        return body.response_format
    if not isinstance(body, ResponsesRequest) or not isinstance(body.text, dict):
        return None
    wanted = body.text.get("format")
    if isinstance(wanted, dict) and wanted.get("type") == "json_schema":
        inner = {k: v for k, v in wanted.items() if k in ("name", "schema", "strict")}
        return {"type": "json_schema", "json_schema": inner}
    return wanted


def message_input(message: dict[str, Any]) -> HandleMessageInput:
    try:
        return HandleMessageInput.model_validate(message)
    except ValidationError as exc:
        problems = [(_INPUT_ORIGIN.get(name, name), text) for name, text in field_problems(exc)]
        raise invalid(
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


class StreamWriter(Protocol):
    """The server-sent events of a reply streamed as it is written, in one API's shape."""

    def start(self) -> bytes: ...

    def text(self, text: str) -> bytes: ...

    def konstruct(self, event: dict[str, Any]) -> bytes: ...

    def pending(self, pending: Pending) -> bytes: ...

    def finish(self, result: HandleMessageResult, include_usage: bool) -> bytes: ...


def error_event(message: str, kind: str = "server_error") -> bytes:
    """An error after the stream began, as OpenAI sends one (its clients raise it)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ChunkWriter:
    """A streamed chat completion: `chat.completion.chunk` objects ending `[DONE]`.

    Besides OpenAI's chunks it writes Konstruct's events (a tool call starting or
    ending, a step restarted, a wait for approval, the reply's outcome) as chunks
    with no `choices` and a `konstruct` object, which OpenAI's clients pass over.
    """

    completion_id: str
    model: str
    created: int

    def _event(self, body: dict[str, Any]) -> bytes:
        base = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        return f"data: {json.dumps({**base, **body})}\n\n".encode()

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._event({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def start(self) -> bytes:
        return self._delta({"role": "assistant", "content": ""})

    def text(self, text: str) -> bytes:
        return self._delta({"content": text})

    def konstruct(self, event: dict[str, Any]) -> bytes:
        return self._event({"choices": [], "konstruct": event})

    def pending(self, pending: Pending) -> bytes:
        return self.konstruct({"type": "awaiting_approval", **pending.body()}) + DONE

    def finish(self, result: HandleMessageResult, include_usage: bool) -> bytes:
        end = self.konstruct({"type": "outcome", "degraded": result.degraded})
        end += self._delta({}, "stop")
        if include_usage:
            end += self._event({"choices": [], "usage": _usage(result)})
        return end + DONE


@dataclass(frozen=True)
class ResponseEventWriter:
    """A streamed Responses API answer: `response.created` ... one
    `response.output_text.delta` per piece of text ... `response.completed`.
    Konstruct's own events are not sent: they are not Responses API events."""

    response_id: str
    model: str

    @staticmethod
    def _events(events: list[dict[str, Any]]) -> bytes:
        return b"".join(
            f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events
        )

    def start(self) -> bytes:
        # The events of an answer with no text yet: its first four open it.
        return self._events(response_events(self.response_id, self.model, [], 0, 0)[:4])

    def text(self, text: str) -> bytes:
        return self._events([response_events(self.response_id, self.model, [text], 0, 0)[4]])

    def konstruct(self, event: dict[str, Any]) -> bytes:
        return b""

    def pending(self, pending: Pending) -> bytes:
        return error_event(
            "the message waits for a person to approve a tool call"
            f" (workflow {pending.workflow_id}): approve it, then send it again",
            "awaiting_approval",
        )

    def finish(self, result: HandleMessageResult, include_usage: bool) -> bytes:
        usage = result.usage
        events = response_events(
            self.response_id,
            self.model,
            [result.response],
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        return self._events(events[-4:])  # the text done, the part, the item, completed


def response_body(response_id: str, model: str, result: HandleMessageResult) -> dict[str, Any]:
    """The reply as a Responses API object."""
    usage = result.usage
    return response_object(
        response_id, model, result.response, usage.prompt_tokens, usage.completion_tokens
    )


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
