"""The agent loop's payloads: a message's input and result, tools, steps and approvals.

Side-effect free, so `HandleMessage` imports them in its sandbox.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from konstruct.platform.models import StrictModel
from konstruct.providers.models import ChatTurn, TokenUsage
from konstruct.providers.structured import ResponseFormat

_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
# An MCP server's name: its tools are SERVER__TOOL, so no "_" in it (the separator stays
# unambiguous) and short enough to leave room for the tool's name in 64 characters.
MCP_SERVER_NAME = r"^[a-zA-Z0-9-]{1,24}$"
# Text a person must give: not empty, not only spaces, not a novel.
Named = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class HandleMessageInput(StrictModel):
    message_id: str = Field(min_length=1, max_length=200)
    tenant_id: str = Field(pattern=_ID)
    agent_id: str = Field(pattern=_ID)
    thread_id: str = Field(min_length=1, max_length=200)
    channel: str = Field(min_length=1, max_length=50)
    sender: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=20_000)
    # Publish the reply's text and tool calls as they happen (`konstruct.agents.streaming`),
    # for a client that streams it; the stored reply is the same either way.
    stream: bool = False
    # The reply must be JSON in this format (a gateway request's `response_format`);
    # default: the agent's.
    response_format: ResponseFormat = None


class HandleMessageResult(StrictModel):
    message_id: str
    tenant_id: str
    agent_id: str
    thread_id: str
    response: str
    model_group: str
    model: str
    fallback_used: bool
    degraded: bool
    usage: TokenUsage = TokenUsage()
    # Model steps taken and tool calls made for this reply.
    steps: int = 1
    tool_calls: int = 0

    @classmethod
    def reply_to(cls, message: HandleMessageInput, **fields: Any) -> HandleMessageResult:
        """The result answering `message`: its ids, and the reply's own fields."""
        return cls(
            message_id=message.message_id,
            tenant_id=message.tenant_id,
            agent_id=message.agent_id,
            thread_id=message.thread_id,
            **fields,
        )


class LoadAgentInput(StrictModel):
    tenant_id: str
    agent_id: str
    thread_id: str
    message_id: str
    history_turns: int = 10


class AgentProfile(StrictModel):
    agent_id: str = Field(pattern=_ID)
    name: Named
    role: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
    persona: str = Field("", max_length=4000)
    system_prompt: str = Field("", max_length=20_000)
    model_group: Literal["fast", "quality"] = "fast"
    fallback_reply: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)
    ]
    # Names of the tools the agent may call: built-in ones or the tenant's own.
    tools: list[Annotated[str, StringConstraints(pattern=TOOL_NAME)]] = Field(
        default_factory=list, max_length=32
    )
    # Model steps one message may take (each step may call several tools).
    max_steps: int = Field(8, ge=1, le=32)
    # The prompt gets the thread's last `history_turns` turns, newest first while
    # they fit in `memory_tokens`, after a rolling summary of older turns.
    history_turns: int = Field(10, ge=0, le=100)
    memory_tokens: int = Field(2000, ge=200, le=100_000)
    # The final answer must be JSON in this format (OpenAI's `response_format`;
    # `konstruct.providers.structured`); a message's own format takes its place.
    response_format: ResponseFormat = None


class AgentContext(StrictModel):
    agent: AgentProfile
    history: list[ChatTurn] = []
    # Set when this message was already answered: redelivery returns it as is.
    existing: HandleMessageResult | None = None


class StoreTurnInput(StrictModel):
    message: HandleMessageInput
    result: HandleMessageResult
    workflow_id: str


BUILTIN_NAMES = ("calculator", "http_request", "knowledge_search")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_HEADER_NAME = r"^[A-Za-z0-9-]{1,100}$"


class ToolSpec(StrictModel):
    """A tenant's tool: a webhook it defines, or its settings for a built-in tool.

    A webhook's secret is never stored: `secret_env` names the environment
    variable the worker reads the value of `secret_header` from.
    """

    name: str = Field(pattern=TOOL_NAME)
    kind: Literal["builtin", "webhook", "mcp"] = "webhook"
    description: str = Field("", max_length=2000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: str | None = Field(None, max_length=2000)
    secret_header: str | None = Field(None, pattern=_HEADER_NAME)
    secret_env: str | None = Field(None, pattern=_ENV_NAME)
    requires_approval: bool = False
    timeout_s: float = Field(30.0, gt=0, le=3600)
    approval_timeout_s: float = Field(600.0, gt=0, le=7 * 86400)
    # An MCP tool's server (its name) and the tool's own name there (kind "mcp").
    mcp_server: str | None = Field(None, pattern=MCP_SERVER_NAME)
    remote_name: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError('must be a JSON schema with "type": "object"')
        if not isinstance(value.get("properties", {}), dict):
            raise ValueError('"properties" must be an object')
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def check_kind(self) -> ToolSpec:
        """Raise ValueError when the fields do not fit the kind."""
        if self.kind == "builtin" and self.name not in BUILTIN_NAMES:
            raise ValueError(
                f"no built-in tool {self.name!r}; built in: {', '.join(BUILTIN_NAMES)}"
            )
        if self.kind == "webhook":
            if self.name in BUILTIN_NAMES:
                raise ValueError(f"{self.name!r} is a built-in tool's name")
            if not self.url:
                raise ValueError("a webhook tool needs a url")
            if (self.secret_header is None) != (self.secret_env is None):
                raise ValueError("secret_header and secret_env go together")
        if self.kind == "mcp" and not (self.url and self.mcp_server and self.remote_name):
            raise ValueError("an MCP tool needs its server's url and name and its own name")
        return self


class AgentStepInput(StrictModel):
    """One model step of a message. Step 0 carries the message; later steps only ids."""

    tenant_id: str = Field(pattern=_ID)
    message_id: str
    step: int = Field(ge=0)
    workflow_id: str
    message: HandleMessageInput | None = None
    stream: bool = False
    # The message's own format for the final answer (else the agent's).
    response_format: ResponseFormat = None


class PlannedCall(StrictModel):
    """A tool call the model asked for; its arguments stay in PostgreSQL.

    `preview` (the arguments, cut short) is kept only for calls a person must
    approve, so the workflow can show what is being approved.
    """

    call_id: str
    tool: str
    requires_approval: bool = False
    timeout_s: float = 30.0
    approval_timeout_s: float = 600.0
    preview: str = ""


class AgentStepResult(StrictModel):
    # The stored turn when the model answered (or the loop ended).
    reply: HandleMessageResult | None = None
    calls: list[PlannedCall] = []
    # The thread's unsummarised turns passed the agent's memory budget.
    summarize: bool = False


class RunToolInput(StrictModel):
    tenant_id: str
    message_id: str
    call_id: str
    # Who approved the call, for a tool that needs approval.
    approved_by: str = ""
    # For a streamed message: the workflow whose stream shows the call start and end.
    stream_to: str = ""


class ToolOutcome(StrictModel):
    call_id: str
    status: Literal["ok", "error", "rejected", "timed_out"]
    chars: int = 0


class ToolDecisionInput(StrictModel):
    """The record of a call that was not run: a person rejected it, or no one answered."""

    tenant_id: str
    message_id: str
    call_id: str
    status: Literal["rejected", "timed_out"]
    note: str = ""
    decided_by: str = ""


class ToolDecision(StrictModel):
    """The argument of the `approve_tool` and `reject_tool` updates."""

    call_id: str = Field(min_length=1, max_length=200)
    by: str = Field("", max_length=200)
    reason: str = Field("", max_length=2000)


class AnnounceInput(StrictModel):
    tenant_id: str
    workflow_id: str


class SummarizeInput(StrictModel):
    tenant_id: str
    thread_id: str
    agent_id: str
