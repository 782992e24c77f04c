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

from konstruct.simulator.profiles import ModelProfile

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
