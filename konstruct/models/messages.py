from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from konstruct.models.base import StrictModel
from konstruct.models.llm import ChatTurn, TokenUsage

_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
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


class AgentContext(StrictModel):
    agent: AgentProfile
    history: list[ChatTurn] = []
    # Set when this message was already answered: redelivery returns it as is.
    existing: HandleMessageResult | None = None


class StoreTurnInput(StrictModel):
    message: HandleMessageInput
    result: HandleMessageResult
    workflow_id: str
