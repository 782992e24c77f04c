"""Simulated model profiles, the configuration file, and per-model run-time state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from konstruct.providers.simulator.limiters import (
    REQUIRED_FIELD,
    Limiter,
    RateLimitShape,
    build_limiter,
    limiter_key,
)

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
    rate_limit_shape: RateLimitShape = "token_bucket"
    rate_limit_rps: float | None = Field(None, gt=0)
    rate_limit_burst: int = Field(1, ge=1)
    rate_limit_window_s: float = Field(60.0, gt=0)
    rate_limit_requests: int | None = Field(None, ge=1)
    rate_limit_tokens: int | None = Field(None, ge=1)
    quota_requests: int | None = Field(None, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)
    hang_seconds: float = Field(600.0, ge=0)
    outage: bool = False
    accuracy: float = Field(1.0, ge=0, le=1)
    # Asked for a structured answer (`response_format`), the share of replies whose
    # JSON does not fit the schema (decided per prompt: the same prompt, the same).
    json_mismatch_rate: float = Field(0.0, ge=0, le=1)
    # The model's first this-many structured answers (since its counters were reset)
    # do not fit, whatever the prompt: a test makes a repair step happen, or fail.
    json_mismatch_first: int = Field(0, ge=0)
    # A reply's pace after `latency_ms`: its first token after `ttft_ms`, each next one
    # `inter_token_ms` later (streamed as made; an answer not streamed waits for all).
    # Read on the simulator's clock: a frozen clock holds a stream after its first token.
    ttft_ms: float = Field(0.0, ge=0)
    inter_token_ms: float = Field(0.0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _shape_has_its_limit(self) -> ModelProfile:
        name = REQUIRED_FIELD.get(self.rate_limit_shape)
        if name is not None and getattr(self, name) is None:
            raise ValueError(f"rate_limit_shape {self.rate_limit_shape} needs {name} set")
        return self


class SimulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelProfile] = Field(default_factory=dict)
    default: ModelProfile = ModelProfile()
    auto_create: bool = False

    @classmethod
    def from_yaml(cls, path: Path) -> SimulatorConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


@dataclass
class ModelState:
    profile: ModelProfile
    limiter: Limiter | None = None
    limiter_key: tuple[object, ...] | None = None
    counters: Counter[str] = field(default_factory=Counter)
    by_content: Counter[str] = field(default_factory=Counter)
    ok_by_content: Counter[str] = field(default_factory=Counter)
    ok_per_tick: Counter[int] = field(default_factory=Counter)
    rate_limited_per_tick: Counter[int] = field(default_factory=Counter)

    def set_profile(self, profile: ModelProfile, now: float) -> None:
        # Keep a draining limiter when only other fields change, so a PUT of
        # error_rate cannot hand out a fresh burst (or window, or quota).
        # `now` is the simulator's clock (see `clock`), as for the limiters.
        key = limiter_key(profile)
        if key != self.limiter_key:
            self.limiter = build_limiter(profile, now)
            self.limiter_key = key
        self.profile = profile

    def record_ok(self, content_key: str, since_start_s: float) -> None:
        self.counters["ok"] += 1
        self.ok_by_content[content_key] += 1
        self.ok_per_tick[int(since_start_s / TICK_S)] += 1

    def record_rate_limited(self, since_start_s: float) -> None:
        self.counters["rate_limited"] += 1
        self.rate_limited_per_tick[int(since_start_s / TICK_S)] += 1

    def reset_counters(self, now: float) -> None:
        # Requests still sleeping will decrement in_flight when they finish.
        in_flight = self.counters["in_flight"]
        self.counters.clear()
        self.counters["in_flight"] = in_flight
        self.by_content.clear()
        self.ok_by_content.clear()
        self.ok_per_tick.clear()
        self.rate_limited_per_tick.clear()
        if self.limiter is not None:
            self.limiter.reset(now)

    def stats(self) -> dict[str, int]:
        return {key: self.counters[key] for key in STATS_KEYS}
