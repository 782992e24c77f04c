"""Guesses of a call's tokens before it goes out, learned per provider from its answers.

A metered provider's token clock books a call's tokens before the answer says
what it used, and a budget holds its estimated cost: both need a guess close to
the answer, because booked slots are spaced by it. Pure: no I/O.
"""

from __future__ import annotations

from konstruct.providers.adapter import Completion

# A completion's tokens guessed before any answer taught the worker better.
_FIRST_COMPLETION_GUESS = 64


class TokenEstimates:
    """A call's prompt + completion tokens guessed before it goes out, so a
    metered provider's token clock can book them: the prompt at four characters a
    token, corrected by what this provider's answers reported for their prompts,
    and the completion at `max_tokens` or what its answers used on average. The
    answer's usage settles the difference; a guess close to it matters because
    booked slots are spaced by the guess."""

    def __init__(self) -> None:
        self._completion: dict[str, float] = {}
        self._prompt_ratio: dict[str, float] = {}

    @staticmethod
    def _characters(messages: list[dict[str, str]]) -> int:
        return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages)

    def estimate(
        self, provider: str, messages: list[dict[str, str]], max_tokens: int | None
    ) -> int:
        prompt = self._characters(messages) * self._prompt_ratio.get(provider, 1.0)
        guess = self._completion.get(provider, _FIRST_COMPLETION_GUESS)
        return round(prompt + (max_tokens if max_tokens is not None else guess))

    def split(
        self, provider: str, messages: list[dict[str, str]], max_tokens: int | None
    ) -> tuple[int, int]:
        """`estimate` as (prompt, completion) tokens, which are priced apart."""
        prompt = round(self._characters(messages) * self._prompt_ratio.get(provider, 1.0))
        guess = self._completion.get(provider, _FIRST_COMPLETION_GUESS)
        return prompt, round(max_tokens if max_tokens is not None else guess)

    def used(self, provider: str, messages: list[dict[str, str]], completion: Completion) -> int:
        """The tokens an answer used; teaches the guesses (the first answer at once)."""

        def learn(table: dict[str, float], value: float) -> None:
            last = table.get(provider)
            table[provider] = value if last is None else 0.9 * last + 0.1 * value

        learn(self._completion, float(completion.completion_tokens))
        if completion.prompt_tokens:
            learn(self._prompt_ratio, completion.prompt_tokens / self._characters(messages))
        return completion.total_tokens or completion.prompt_tokens + completion.completion_tokens
