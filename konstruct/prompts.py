"""System prompt assembly. Pure: workflows call it directly."""

from __future__ import annotations

from konstruct.models import AgentProfile, ChatTurn

# Unconditional by design: no agent configuration can remove or override it.
AI_TRANSPARENCY_CLAUSE = (
    "You are an AI. If anyone asks whether they are talking to a human or an AI, "
    "say plainly that you are an AI assistant. Never claim or imply that you are human."
)


def build_system_prompt(agent: AgentProfile) -> str:
    parts = [
        agent.system_prompt.strip(),
        f"Your name is {agent.name}. You are {agent.role}.",
        f"Persona: {agent.persona.strip()}" if agent.persona.strip() else "",
        AI_TRANSPARENCY_CLAUSE,
    ]
    return "\n\n".join(p for p in parts if p)


def build_messages(agent: AgentProfile, history: list[ChatTurn], text: str) -> list[ChatTurn]:
    return [
        ChatTurn(role="system", content=build_system_prompt(agent)),
        *history,
        ChatTurn(role="user", content=text),
    ]
