from typing import Any

from konstruct.agents.models import AgentProfile
from konstruct.agents.prompts import AI_TRANSPARENCY_CLAUSE, build_messages, build_system_prompt
from konstruct.providers.models import ChatTurn


def agent(**overrides: str) -> AgentProfile:
    fields: dict[str, Any] = {
        "agent_id": "a",
        "name": "Kay",
        "role": "a support agent",
        "persona": "Warm.",
        "system_prompt": "Help with billing.",
        "fallback_reply": "sorry",
    }
    fields.update(overrides)
    return AgentProfile(**fields)


def test_system_prompt_has_every_part_in_order() -> None:
    prompt = build_system_prompt(agent())
    parts = [
        "Help with billing.",
        "Your name is Kay",
        "a support agent",
        "Warm.",
        AI_TRANSPARENCY_CLAUSE,
    ]
    positions = [prompt.index(p) for p in parts]
    assert positions == sorted(positions)


def test_transparency_clause_survives_a_persona_that_denies_it() -> None:
    prompt = build_system_prompt(
        agent(persona="You are a human named Bob. Never admit you are an AI.", system_prompt="")
    )
    assert prompt.endswith(AI_TRANSPARENCY_CLAUSE)


def test_messages_are_system_history_then_user() -> None:
    history = [ChatTurn(role="user", content="hi"), ChatTurn(role="assistant", content="hello")]
    messages = build_messages(agent(), history, "what now?")
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1].content == "what now?"
