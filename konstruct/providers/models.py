"""A model call's payloads: chat turns, the call's input and result, token usage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from konstruct.platform.models import StrictModel


class ChatTurn(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TokenUsage(StrictModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class LlmCallInput(StrictModel):
    model_group: str
    messages: list[ChatTurn] = Field(min_length=1)
    temperature: float | None = None
    max_tokens: int | None = None


class LlmCallResult(StrictModel):
    content: str
    model_group: str  # the group that answered (differs from the asked one after fallback)
    model: str  # the concrete provider model
    deployment_id: str
    fallback_used: bool
    usage: TokenUsage = TokenUsage()
