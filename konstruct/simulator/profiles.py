"""Simulated model profiles, the configuration file, and per-model run-time state."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

STATS_KEYS = (
    "requests",
    "ok",
    "rate_limited",
    "errors",
    "outage",
    "hangs",
    "in_flight",
    "max_in_flight",
)
# Resolution of the ok-count timeline; coarser buckets are sums of these ticks.
TICK_S = 0.1


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(0.0, ge=0)
    latency_jitter_ms: float = Field(0.0, ge=0)
    rate_limit_rps: float | None = Field(None, gt=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)
    hang_seconds: float = Field(600.0, ge=0)
    outage: bool = False
    accuracy: float = Field(1.0, ge=0, le=1)
    seed: int = 0


class SimulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelProfile] = Field(default_factory=dict)
    default: ModelProfile = ModelProfile()
    auto_create: bool = False

    @classmethod
    def from_yaml(cls, path: Path) -> SimulatorConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


@dataclass
class TokenBucket:
    """Server-side token bucket with burst = max(1, rate)."""

    rate: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate, max(1.0, rate), now)

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        burst = max(1.0, self.rate)
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class ModelState:
    profile: ModelProfile
    bucket: TokenBucket | None = None
    counters: Counter[str] = field(default_factory=Counter)
    by_content: Counter[str] = field(default_factory=Counter)
    ok_by_content: Counter[str] = field(default_factory=Counter)
    ok_per_tick: Counter[int] = field(default_factory=Counter)
    rate_limited_per_tick: Counter[int] = field(default_factory=Counter)

    def set_profile(self, profile: ModelProfile) -> None:
        rate = profile.rate_limit_rps
        # Keep a draining bucket when only other fields change, so a PUT of
        # error_rate cannot hand out a fresh burst.
        if rate is None:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket.full(rate, time.monotonic())
        self.profile = profile

    def record_ok(self, content_key: str, since_start_s: float) -> None:
        self.counters["ok"] += 1
        self.ok_by_content[content_key] += 1
        self.ok_per_tick[int(since_start_s / TICK_S)] += 1

    def record_rate_limited(self, since_start_s: float) -> None:
        self.counters["rate_limited"] += 1
        self.rate_limited_per_tick[int(since_start_s / TICK_S)] += 1

    def reset_counters(self) -> None:
        # Requests still sleeping will decrement in_flight when they finish.
        in_flight = self.counters["in_flight"]
        self.counters.clear()
        self.counters["in_flight"] = in_flight
        self.by_content.clear()
        self.ok_by_content.clear()
        self.ok_per_tick.clear()
        self.rate_limited_per_tick.clear()

    def stats(self) -> dict[str, int]:
        return {key: self.counters[key] for key in STATS_KEYS}
