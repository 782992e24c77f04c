"""Pydantic inputs and results, side-effect free so workflows can import them."""

from konstruct.models.llm import ChatTurn, LlmCallInput, LlmCallResult, TokenUsage
from konstruct.models.messages import (
    AgentContext,
    AgentProfile,
    HandleMessageInput,
    HandleMessageResult,
    LoadAgentInput,
    StoreTurnInput,
)

__all__ = [
    "AgentContext",
    "AgentProfile",
    "ChatTurn",
    "HandleMessageInput",
    "HandleMessageResult",
    "LlmCallInput",
    "LlmCallResult",
    "LoadAgentInput",
    "StoreTurnInput",
    "TokenUsage",
]
