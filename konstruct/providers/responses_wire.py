"""OpenAI's Responses API (`POST /v1/responses`) on the wire, for text answers: its
input as chat messages, the response object, and the events of a streamed one.

Shared by the simulator (which answers it as a provider) and the gateway (which
answers it for a tenant's agent): clients that call `/v1/responses` by default
(Inspect AI's OpenAI provider, the openai client's `responses.create`) work with both.
"""

from __future__ import annotations

import time
from typing import Any


def input_messages(instructions: Any, given: Any) -> list[dict[str, Any]] | None:
    """`instructions` and `input` as chat messages; None when `input` is neither a
    string nor a list of messages (items with a role and string or text-part content)."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list):
        return None
    for item in given:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            return None
        role, content = item.get("role"), item.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            return None
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    return None
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def _message(response_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "id": f"msg_{response_id.removeprefix('resp_')}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def response_object(
    response_id: str,
    model: str,
    text: str,
    input_tokens: int,
    output_tokens: int,
    status: str = "completed",
) -> dict[str, Any]:
    """The response object of a text answer (`status` "in_progress": no output yet)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [_message(response_id, text, status)] if status == "completed" else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def response_events(
    response_id: str,
    model: str,
    pieces: list[str],
    input_tokens: int,
    output_tokens: int,
) -> list[dict[str, Any]]:
    """The events of a streamed text answer, `pieces` its text deltas in order."""
    text = "".join(pieces)
    item_id = _message(response_id, text, "completed")["id"]
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    started = response_object(response_id, model, "", input_tokens, output_tokens, "in_progress")
    done = response_object(response_id, model, text, input_tokens, output_tokens)
    part = {"type": "output_text", "text": text, "annotations": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _message(response_id, "", "in_progress"),
        },
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []}
            for piece in pieces
        ),
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
        {"type": "response.completed", "response": done},
    ]
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]
