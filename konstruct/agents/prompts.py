"""System prompt assembly. Pure: workflows call it directly."""

from __future__ import annotations

from typing import Any

from konstruct.agents.models import AgentProfile
from konstruct.providers.models import ChatTurn

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


SUMMARY_PREFIX = "Summary of the earlier conversation in this thread:"
SUMMARIZER_PROMPT = (
    "You keep the memory of a long conversation. Rewrite the summary so far together with "
    "the new turns below into one short summary: the facts, names, numbers, decisions and "
    "open questions a helpful assistant needs later. Plain text, no preamble."
)


def build_agent_messages(
    agent: AgentProfile,
    summary: str,
    history: list[ChatTurn],
    text: str,
    transcript: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The prompt of one model step: system prompt, the thread's memory (summary and
    last turns), the message, and this message's tool calls and results so far."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": build_system_prompt(agent)}]
    if summary:
        messages.append({"role": "system", "content": f"{SUMMARY_PREFIX}\n{summary}"})
    messages.extend(turn.model_dump() for turn in history)
    messages.append({"role": "user", "content": text})
    messages.extend(transcript)
    return messages


def summary_request(
    summary: str, turns: list[tuple[str, str]], max_chars: int
) -> list[dict[str, str]]:
    """The `fast` group's prompt that folds `turns` into the running `summary`."""
    lines = [
        f"Summary so far: {summary}" if summary else "Summary so far: (none)",
        "",
        "New turns:",
    ]
    for user, reply in turns:
        lines.append(f"User: {user}")
        lines.append(f"Assistant: {reply}")
    body = "\n".join(lines)
    if len(body) > max_chars:
        # The oldest new turns go first: the summary so far is kept whole.
        head = lines[0]
        body = head + "\n…\n" + body[-(max_chars - len(head) - 3) :]
    return [
        {"role": "system", "content": SUMMARIZER_PROMPT},
        {"role": "user", "content": body},
    ]


def repair_request(problem: str) -> str:
    """The one repair step's request when a final answer does not fit its format."""
    return (
        f"Your answer does not fit the required response format: {problem}. "
        "Answer again with only the JSON, fitting the format exactly."
    )
