"""Deterministic replies and embeddings: what a simulated model says to a prompt."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
from fractions import Fraction
from typing import Any

from konstruct.providers.simulator.profiles import ModelProfile

EMBEDDING_DIMS = 64
_WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)


def seeded_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_EXPRESSION = re.compile(r"(?<![\w.])-?\d+(?:\s*[-+*/×x]\s*-?\d+)+")
_FIRST_OPERAND = re.compile(r"-?\d+")
_OPERATION = re.compile(r"([-+*/×x])\s*(-?\d+)")
_TRANSPARENCY = re.compile(
    r"\b(are you (an? )?(ai|bot|chatbot|robot|machine|human|person|real)"
    r"|am i (talking|speaking|chatting) (to|with) (an? )?(ai|bot|human|person|real|machine)"
    r"|what are you|who are you)\b",
    re.IGNORECASE,
)


def message_text(content: Any) -> str:
    """A message's text, whether content is a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        ).strip()
    return "" if content is None else str(content)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def system_text(messages: list[dict[str, Any]]) -> str:
    return " ".join(
        message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
    )


def evaluate_expression(expression: str) -> Fraction | None:
    """Integer arithmetic with * and / before + and -; None on division by zero."""
    first = _FIRST_OPERAND.match(expression)
    if first is None:
        return None
    terms = [Fraction(int(first.group()))]
    for operator, raw in _OPERATION.findall(expression[first.end() :]):
        operand = int(raw)
        if operator in "*×x":
            terms[-1] *= operand
        elif operator == "/":
            if operand == 0:
                return None
            terms[-1] /= operand
        else:
            terms.append(Fraction(operand if operator == "+" else -operand))
    return sum(terms, Fraction(0))


def format_number(value: Fraction | float) -> str:
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    rounded = round(float(value), 4)
    return str(int(rounded)) if rounded.is_integer() else str(rounded)


def arithmetic_reply(text: str, accuracy: float, rng: random.Random) -> str | None:
    match = _EXPRESSION.search(text)
    if match is None:
        return None
    correct = evaluate_expression(match.group())
    if correct is None:
        return None
    if rng.random() < accuracy:
        return format_number(correct)
    return format_number(correct + rng.choice(_WRONG_OFFSETS))


def judge_reply(model: str, rng: random.Random) -> str:
    score = round(rng.uniform(0.55, 1.0), 2)
    return json.dumps({"score": score, "reason": f"[{model}] judged against the rubric"})


def decision_reply(prompt: str) -> str:
    if "improv" in prompt or "lower wape" in prompt:
        return "Decision: PROMOTE\nRationale: the candidate's backtest improves on the champion."
    return "Decision: HOLD\nRationale: the candidate's backtest does not clearly beat the champion."


def simulated_reply(model: str, profile: ModelProfile, messages: list[dict[str, Any]]) -> str:
    """The deterministic reply of `model` to a conversation."""
    text = last_user_text(messages)
    prompt = f"{system_text(messages)}\n{text}".lower()
    rng = seeded_rng(profile.seed, model, text)
    # Judge and decision prompts quote answers and metrics that contain
    # numbers, so they are recognised before arithmetic.
    if "score" in prompt and "rubric" in prompt:
        return judge_reply(model, rng)
    if "promote or hold" in prompt:
        return decision_reply(prompt)
    arithmetic = arithmetic_reply(text, profile.accuracy, rng)
    if arithmetic is not None:
        return arithmetic
    if _TRANSPARENCY.search(text):
        return f"I am an AI assistant (simulated model {model}), not a human."
    return f"[{model}] {text[:80]}"


# Scripted tool calling (OpenAI function-calling format). A line of the last
# user message `/tool NAME {json-object}` calls NAME with that object (the
# object may be left out for no arguments); `/tool-repeat` keeps calling after
# tool results instead of answering, to exercise a step limit.
_DIRECTIVE = re.compile(r"^\s*/tool\s+([A-Za-z0-9_.:-]+)(?:\s+(\{.*\}))?\s*$")
_REPEAT = re.compile(r"^\s*/tool-repeat\s*$", re.MULTILINE)
_SEARCH_PREFIX = re.compile(r"^\s*search:", re.IGNORECASE)
TOOL_RESULT_CHARS = 500

ToolReply = dict[str, Any]


def offered_tool_names(tools: Any) -> list[str]:
    """The function names in an OpenAI `tools` list, in order; malformed entries skipped."""
    if not isinstance(tools, list):
        return []
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


def tool_directives(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The `/tool NAME {json}` lines of `text`, in order; lines whose JSON is no object skipped."""
    directives = []
    for line in text.splitlines():
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        try:
            arguments = json.loads(match.group(2)) if match.group(2) else {}
        except ValueError:
            continue
        if isinstance(arguments, dict):
            directives.append((match.group(1), arguments))
    return directives


def _after_last_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return messages[index + 1 :]
    return list(messages)


def _collapsed(content: Any, limit: int = TOOL_RESULT_CHARS) -> str:
    return " ".join(message_text(content).split())[:limit]


def tool_call_id(text: str, step: int, position: int) -> str:
    """Deterministic id of the call at `position` in the reply after `step` assistant messages."""
    digest = hashlib.sha256(f"{text}|{step}|{position}".encode()).hexdigest()
    return "call_" + digest[:20]


def _planned_calls(text: str, offered: list[str]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """What the scripted model calls for `text`: (kind, [(name, arguments)]); kind "" for none."""
    directives = tool_directives(text)
    if directives:
        return "directive", [(name, args) for name, args in directives if name in offered]
    # The explicit prefix wins: a search query may well contain "2023 - 2024".
    if "knowledge_search" in offered and _SEARCH_PREFIX.match(text):
        query = _SEARCH_PREFIX.sub("", text, count=1).strip()
        return "knowledge_search", [("knowledge_search", {"query": query})]
    if "calculator" in offered:
        match = _EXPRESSION.search(text)
        if match is not None:
            return "calculator", [("calculator", {"expression": match.group().strip()})]
    return "", []


def _tool_calls(
    text: str, step: int, calls: list[tuple[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    return [
        {
            "id": tool_call_id(text, step, position),
            "type": "function",
            "function": {
                "name": name,
                "arguments": json.dumps(arguments, separators=(",", ":"), sort_keys=True),
            },
        }
        for position, (name, arguments) in enumerate(calls)
    ]


def _called_names(tail: list[dict[str, Any]]) -> dict[str, str]:
    """tool_call id -> function name, from the assistant messages of `tail`."""
    names: dict[str, str] = {}
    for message in tail:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                names[call["id"]] = str(function.get("name", ""))
    return names


def scripted_tool_reply(messages: list[dict[str, Any]], tools: Any) -> ToolReply | None:
    """The scripted model's turn when the request offers `tools`.

    `{"tool_calls": [...]}` to call tools, `{"content": ...}` to answer after
    their results, or None to answer as usual (no tools offered, nothing to
    call, or a conversation that does not end in a tool result).
    """
    offered = offered_tool_names(tools)
    if not offered:
        return None
    text = last_user_text(messages)
    kind, calls = _planned_calls(text, offered)
    if not calls:
        return None
    tail = _after_last_user(messages)
    results = [m for m in tail if m.get("role") == "tool"]
    step = sum(1 for m in tail if m.get("role") == "assistant")
    if not results:
        return {"tool_calls": _tool_calls(text, step, calls)}
    if tail[-1].get("role") != "tool":
        return None
    if _REPEAT.search(text):
        return {"tool_calls": _tool_calls(text, step, calls)}
    if kind == "calculator":
        return {"content": f"The answer is {_collapsed(results[-1].get('content'))}."}
    if kind == "knowledge_search":
        return {"content": f"From the knowledge base: {_collapsed(results[-1].get('content'))}"}
    names = _called_names(tail)
    lines = []
    for result in results:
        name = names.get(str(result.get("tool_call_id")), str(result.get("name") or "unknown"))
        lines.append(f"Tool {name} returned: {_collapsed(result.get('content'))}")
    return {"content": "\n".join(lines)}


def assistant_reply(
    model: str,
    profile: ModelProfile,
    messages: list[dict[str, Any]],
    tools: Any = None,
    tool_choice: Any = None,
) -> ToolReply:
    """The simulated assistant turn: `{"tool_calls": [...]}` or `{"content": str}`."""
    if tools and tool_choice != "none":
        scripted = scripted_tool_reply(messages, tools)
        if scripted is not None:
            return scripted
    return {"content": simulated_reply(model, profile, messages)}


def _fitting(schema: Any, text: str) -> Any:
    """A value that fits `schema` (the JSON Schema subset structured outputs use),
    made from the reply's `text`."""
    if not isinstance(schema, dict):
        return text
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties") or {}
        keys = schema.get("required") or list(properties)
        return {key: _fitting(properties.get(key, {}), text) for key in keys}
    if kind == "array":
        return [_fitting(schema.get("items", {}), text)] * int(schema.get("minItems", 0))
    if kind in ("integer", "number"):
        found = re.search(r"-?\d+(?:\.\d+)?", text)
        number = float(found.group()) if found else 0.0
        return int(number) if kind == "integer" else number
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def structured_reply(
    reply: ToolReply, response_format: Any, profile: ModelProfile, key: str, mismatch: bool = False
) -> ToolReply:
    """The reply as the JSON a `response_format` asks for: `{"answer": text}` for a
    json_object, a document that fits the schema for a json_schema; one that does
    not fit for the prompts `json_mismatch_rate` picks, or when told (`mismatch`):
    not JSON at all for a json_object, `{"unexpected": text}` for a schema."""
    if "tool_calls" in reply or not isinstance(response_format, dict):
        return reply
    text = str(reply.get("content") or "")
    kind = response_format.get("type")
    if kind == "json_object":
        document: Any = {"answer": text}
    elif kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        document = _fitting(schema, text)
    else:
        return reply
    if mismatch and kind == "json_object":
        return {"content": f"Sure! {text}"}
    if mismatch or seeded_rng(profile.seed, "json", key).random() < profile.json_mismatch_rate:
        document = {"unexpected": text}
    return {"content": json.dumps(document, ensure_ascii=False)}


def reply_tokens(reply: ToolReply) -> int:
    """Completion tokens of an assistant_reply: its content, or its calls' arguments."""
    if "tool_calls" in reply:
        return count_tokens(" ".join(c["function"]["arguments"] for c in reply["tool_calls"]))
    return count_tokens(str(reply.get("content") or ""))


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


@functools.lru_cache(maxsize=65536)
def _word_slot(word: str) -> tuple[int, float]:
    digest = hashlib.sha256(word.encode()).digest()
    return digest[0] % EMBEDDING_DIMS, 1.0 if digest[1] % 2 else -1.0


def embed_text(text: str) -> list[float]:
    """Hashed bag of words, L2-normalised: texts sharing words get close vectors."""
    vector = [0.0] * EMBEDDING_DIMS
    for word in re.findall(r"\w+", text.lower()):
        slot, sign = _word_slot(word)
        vector[slot] += sign
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]
