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
from konstruct.models.tools import (
    BUILTIN_NAMES,
    AgentStepInput,
    AgentStepResult,
    AnnounceInput,
    PlannedCall,
    RunToolInput,
    SummarizeInput,
    ToolDecision,
    ToolDecisionInput,
    ToolOutcome,
    ToolSpec,
)

__all__ = [
    "BUILTIN_NAMES",
    "AgentStepInput",
    "AgentStepResult",
    "AnnounceInput",
    "PlannedCall",
    "RunToolInput",
    "SummarizeInput",
    "ToolDecision",
    "ToolDecisionInput",
    "ToolOutcome",
    "ToolSpec",
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
