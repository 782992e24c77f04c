"""Server-side rate-limiter shapes: one strategy class per `rate_limit_shape`.

Every limiter answers `admit(now, model, tokens)` with a `Verdict`: whether the
request may pass, the headers to put on the answer (200 or 429), and for a
refusal the OpenAI-style error body. `now` is the simulator's clock (`clock`:
monotonic, frozen or advanced by tests); `tokens` is the request's prompt +
completion tokens, which only `tokens_per_minute` reads. `reset` puts a limiter back in its initial state (the admin reset).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from konstruct.providers.simulator.profiles import ModelProfile

RateLimitShape = Literal[
    "token_bucket", "sliding_window", "leaky_bucket", "tokens_per_minute", "daily_quota"
]
# The profile field each shape needs set; the others have defaults.
REQUIRED_FIELD: dict[str, str] = {
    "sliding_window": "rate_limit_requests",
    "leaky_bucket": "rate_limit_rps",
    "tokens_per_minute": "rate_limit_tokens",
    "daily_quota": "quota_requests",
}
# A client that waits exactly the announced time is let in, whatever the
# floating-point rounding of `now` (the leaky bucket uses the same tolerance).
_EPSILON = 1e-9
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""
    kind: str = ""
    code: str = ""


ALLOW = Verdict(True)


class Limiter(Protocol):
    # The profile fields the limiter is built from: a profile change that
    # leaves them alone keeps the limiter (and its state).
    fields: ClassVar[tuple[str, ...]]

    def admit(self, now: float, model: str, tokens: int) -> Verdict: ...

    def reset(self, now: float) -> None: ...


def openai_duration(seconds: float) -> str:
    """A wait in OpenAI's x-ratelimit-reset-* format: 120ms, 1s, 7.66s, 6m0s, 1h0m0s.

    Rounded up to the millisecond so a client waiting that long is not early.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class TokenBucket:
    """The default shape: burst = max(1, rate), 429 with Retry-After and retry-after-ms."""

    fields: ClassVar[tuple[str, ...]] = ("rate_limit_rps",)

    rate: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate, max(1.0, rate), now)

    @classmethod
    def from_profile(cls, profile: ModelProfile, now: float) -> TokenBucket | None:
        rate = profile.rate_limit_rps
        return None if rate is None else cls.full(rate, now)

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        burst = max(1.0, self.rate)
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1 - _EPSILON:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def admit(self, now: float, model: str, tokens: int) -> Verdict:
        wait_s = self.take(now)
        if wait_s <= 0:
            return ALLOW
        headers = {
            "Retry-After": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
        }
        message = f"rate limit of {self.rate} requests/s exceeded for {model}"
        return Verdict(False, headers, message, "requests", "rate_limit_exceeded")

    def reset(self, now: float) -> None:
        """Kept as it is: the admin reset never refilled the bucket."""


@dataclass
class _Window:
    """Amounts admitted in the last `window_s` seconds, oldest first."""

    window_s: float
    entries: deque[tuple[float, int]] = field(default_factory=deque)
    used: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.window_s + _EPSILON:
            self.used -= self.entries.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        self.entries.append((now, amount))
        self.used += amount

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest admitted amount leaves the window (0 if empty)."""
        return self.entries[0][0] + self.window_s - now if self.entries else 0.0

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


def _admit_in_window(
    window: _Window, limit: int, unit: str, cost: int, now: float, model: str
) -> Verdict:
    """A window limit on `unit` (requests or tokens), answered as OpenAI does:
    x-ratelimit-{limit,remaining,reset}-<unit> on every answer, 429 type <unit>."""
    window.expire(now)
    allowed = window.used + cost <= limit
    if allowed:
        window.add(now, cost)
    reset = openai_duration(window.reset_in(now))
    headers = {
        f"x-ratelimit-limit-{unit}": str(limit),
        f"x-ratelimit-remaining-{unit}": str(max(0, limit - window.used)),
        f"x-ratelimit-reset-{unit}": reset,
    }
    if allowed:
        return Verdict(True, headers)
    message = (
        f"Rate limit reached for {model} on {unit} per {window.window_s:g}s:"
        f" Limit {limit}, Used {window.used}, Requested {cost}."
        f" Please try again in {reset}."
    )
    return Verdict(False, headers, message, unit, "rate_limit_exceeded")


@dataclass
class _WindowLimit:
    """At most `limit` units (requests or tokens) in any `window_s`."""

    unit: ClassVar[str]
    limit: int
    window: _Window

    def cost(self, tokens: int) -> int:
        raise NotImplementedError

    def admit(self, now: float, model: str, tokens: int) -> Verdict:
        return _admit_in_window(self.window, self.limit, self.unit, self.cost(tokens), now, model)

    def reset(self, now: float) -> None:
        self.window.clear()


@dataclass
class SlidingWindow(_WindowLimit):
    """At most `limit` requests in any `window_s`; x-ratelimit-*-requests on every answer."""

    fields: ClassVar[tuple[str, ...]] = ("rate_limit_requests", "rate_limit_window_s")
    unit: ClassVar[str] = "requests"

    @classmethod
    def from_profile(cls, profile: ModelProfile, now: float) -> SlidingWindow:
        assert profile.rate_limit_requests is not None
        return cls(profile.rate_limit_requests, _Window(profile.rate_limit_window_s))

    def cost(self, tokens: int) -> int:
        return 1


@dataclass
class TokensPerMinute(_WindowLimit):
    """At most `limit` prompt + completion tokens in any `window_s`; x-ratelimit-*-tokens."""

    fields: ClassVar[tuple[str, ...]] = ("rate_limit_tokens", "rate_limit_window_s")
    unit: ClassVar[str] = "tokens"

    @classmethod
    def from_profile(cls, profile: ModelProfile, now: float) -> TokensPerMinute:
        assert profile.rate_limit_tokens is not None
        return cls(profile.rate_limit_tokens, _Window(profile.rate_limit_window_s))

    def cost(self, tokens: int) -> int:
        return tokens


@dataclass
class LeakyBucket:
    """A bucket of `burst` leaking `rate` a second; a request that would overflow it
    gets 429 with no Retry-After (nor any other hint of when to come back)."""

    fields: ClassVar[tuple[str, ...]] = ("rate_limit_rps", "rate_limit_burst")

    rate: float
    burst: int
    level: float = 0.0
    stamp: float = 0.0

    @classmethod
    def from_profile(cls, profile: ModelProfile, now: float) -> LeakyBucket:
        assert profile.rate_limit_rps is not None
        return cls(profile.rate_limit_rps, profile.rate_limit_burst, 0.0, now)

    def admit(self, now: float, model: str, tokens: int) -> Verdict:
        self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
        self.stamp = now
        # The tolerance keeps a request exactly 1/rate after the last one in.
        if self.level + 1 <= self.burst + _EPSILON:
            self.level += 1
            return ALLOW
        message = f"rate limit of {self.rate} requests/s exceeded for {model}"
        return Verdict(False, {}, message, "requests", "rate_limit_exceeded")

    def reset(self, now: float) -> None:
        self.level, self.stamp = 0.0, now


@dataclass
class DailyQuota:
    """`limit` requests, then 429 insufficient_quota (no Retry-After) until the admin reset."""

    fields: ClassVar[tuple[str, ...]] = ("quota_requests",)

    limit: int
    used: int = 0

    @classmethod
    def from_profile(cls, profile: ModelProfile, now: float) -> DailyQuota:
        assert profile.quota_requests is not None
        return cls(profile.quota_requests)

    def admit(self, now: float, model: str, tokens: int) -> Verdict:
        if self.used >= self.limit:
            return Verdict(False, {}, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
        self.used += 1
        return ALLOW

    def reset(self, now: float) -> None:
        self.used = 0


class _Factory(Protocol):
    """A limiter class seen as its own factory."""

    @property
    def fields(self) -> tuple[str, ...]: ...

    def from_profile(self, profile: ModelProfile, now: float, /) -> Limiter | None: ...


SHAPES: dict[str, _Factory] = {
    "token_bucket": TokenBucket,
    "sliding_window": SlidingWindow,
    "leaky_bucket": LeakyBucket,
    "tokens_per_minute": TokensPerMinute,
    "daily_quota": DailyQuota,
}


def limiter_key(profile: ModelProfile) -> tuple[object, ...]:
    """What the profile's limiter is built from; equal keys keep the running limiter."""
    shape = profile.rate_limit_shape
    return (shape, *(getattr(profile, name) for name in SHAPES[shape].fields))


def build_limiter(profile: ModelProfile, now: float) -> Limiter | None:
    """The profile's limiter, or None (token_bucket without rate_limit_rps: no limit)."""
    return SHAPES[profile.rate_limit_shape].from_profile(profile, now)
