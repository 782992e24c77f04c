"""A local OpenAI-compatible LLM provider simulator.

Reached through litellm exactly like a real provider (`openai/<model>` with
`api_base=http://127.0.0.1:8799/v1`). Per model: latency, a server-side rate
limit answering 429 with Retry-After, injected 500s, hangs and outages,
deterministic answers (including arithmetic at a chosen accuracy), usage
tokens, and an admin API to read counters and change profiles at run time.

    python -m konstruct.simulator --port 8799 --config deploy/simulator.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ModelProfile", "SimulatorConfig", "SimulatorHandle", "start_simulator"]


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
class _Bucket:
    """Server-side token bucket; burst = max(1, rate)."""

    rate: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else seconds until one is available."""
        burst = max(1.0, self.rate)
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _ModelState:
    profile: ModelProfile
    bucket: _Bucket | None = None
    counters: Counter[str] = field(default_factory=Counter)
    by_content: Counter[str] = field(default_factory=Counter)
    ok_by_content: Counter[str] = field(default_factory=Counter)
    ok_per_second: Counter[int] = field(default_factory=Counter)

    def set_profile(self, profile: ModelProfile) -> None:
        self.profile = profile
        rate = profile.rate_limit_rps
        self.bucket = _Bucket(rate, max(1.0, rate), time.monotonic()) if rate else None


_ARITHMETIC = re.compile(r"(-?\d+)\s*([-+*/x×])\s*(-?\d+)")
_TRANSPARENCY = re.compile(
    r"\b(are you (an? )?(ai|bot|robot|human|person|real)|what are you|who are you)\b", re.I
)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _arithmetic_answer(text: str, accuracy: float, rng: random.Random) -> str | None:
    match = _ARITHMETIC.search(text)
    if not match:
        return None
    a, op, b = int(match[1]), match[2], int(match[3])
    if op == "+":
        value: float = a + b
    elif op == "-":
        value = a - b
    elif op in "*x×":
        value = a * b
    else:
        value = a / b if b else 0
    correct = int(value) if float(value).is_integer() else round(value, 4)
    if rng.random() < accuracy:
        return str(correct)
    return str(correct + rng.choice([-3, -2, -1, 1, 2, 3]))


def answer(model: str, profile: ModelProfile, messages: list[dict[str, Any]]) -> str:
    """The deterministic reply for a conversation."""
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    text = str(user.get("content") or "")
    system = " ".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    rng = _rng(profile.seed, model, text)
    both = f"{system}\n{text}".lower()
    if "score" in both and "rubric" in both:
        score = round(rng.uniform(0.55, 1.0), 2)
        return json.dumps({"score": score, "reason": f"[{model}] judged against the rubric"})
    if "promote or hold" in both:
        decision = "PROMOTE" if ("improv" in both or "lower wape" in both) else "HOLD"
        return (
            f"Decision: {decision}\nRationale: the candidate's backtest "
            f"{'improves on' if decision == 'PROMOTE' else 'does not clearly beat'} the champion."
        )
    arithmetic = _arithmetic_answer(text, profile.accuracy, rng)
    if arithmetic is not None:
        return arithmetic
    if _TRANSPARENCY.search(text):
        return f"I am an AI assistant (simulated model {model}), not a human."
    return f"[{model}] {text[:80]}"


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _embedding(text: str, dims: int = 64) -> list[float]:
    vector = [0.0] * dims
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.sha256(word.encode()).digest()
        vector[digest[0] % dims] += 1.0 if digest[1] % 2 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _error(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class Simulator:
    def __init__(self, config: SimulatorConfig, api_key: str | None) -> None:
        self.config = config
        self.api_key = api_key
        self.started_at = time.time()
        self.models: dict[str, _ModelState] = {}
        self.attempts: Counter[tuple[str, str]] = Counter()
        for name, profile in config.models.items():
            self._state(name, profile)

    def _state(self, name: str, profile: ModelProfile | None = None) -> _ModelState:
        if name not in self.models:
            state = _ModelState(profile or self.config.default)
            state.set_profile(state.profile)
            self.models[name] = state
        return self.models[name]

    def _model(self, name: str) -> _ModelState | None:
        if name in self.models or self.config.auto_create:
            return self._state(name)
        return None

    def _authorised(self, request: web.Request) -> bool:
        return (
            self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"
        )

    async def _gate(self, name: str, state: _ModelState, content_key: str) -> web.Response | None:
        """Apply the profile's faults; None means answer normally."""
        profile, counters = state.profile, state.counters
        counters["requests"] += 1
        state.by_content[content_key] += 1
        self.attempts[(name, content_key)] += 1
        if profile.outage:
            counters["outage"] += 1
            return _error(503, f"{name} is unavailable (simulated outage)", "service_unavailable")
        if state.bucket is not None:
            wait = state.bucket.take(time.monotonic())
            if wait > 0:
                counters["rate_limited"] += 1
                return _error(
                    429,
                    f"rate limit of {profile.rate_limit_rps} requests/s exceeded for {name}",
                    "rate_limit_exceeded",
                    "rate_limit_exceeded",
                    **{
                        "Retry-After": str(max(1, math.ceil(wait))),
                        "retry-after-ms": str(int(wait * 1000) + 1),
                    },
                )
        rng = _rng(profile.seed, name, content_key, self.attempts[(name, content_key)])
        if rng.random() < profile.error_rate:
            counters["errors"] += 1
            return _error(500, "simulated internal error", "server_error")
        hang = rng.random() < profile.hang_rate
        delay = profile.latency_ms + rng.uniform(-1, 1) * profile.latency_jitter_ms
        counters["in_flight"] += 1
        counters["max_in_flight"] = max(counters["max_in_flight"], counters["in_flight"])
        try:
            if hang:
                counters["hangs"] += 1
                await asyncio.sleep(profile.hang_seconds)
            elif delay > 0:
                await asyncio.sleep(delay / 1000)
        finally:
            counters["in_flight"] -= 1
        return None

    async def chat(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "invalid API key", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        name = str(body.get("model", ""))
        state = self._model(name)
        if state is None:
            return _error(
                404, f"model {name!r} does not exist", "invalid_request_error", "model_not_found"
            )
        messages = body.get("messages") or []
        user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        content_key = hashlib.sha256(str(user.get("content", "")).encode()).hexdigest()[:16]
        refused = await self._gate(name, state, content_key)
        if refused is not None:
            return refused
        reply = answer(name, state.profile, messages)
        state.counters["ok"] += 1
        state.ok_by_content[content_key] += 1
        state.ok_per_second[int(time.time() - self.started_at)] += 1
        prompt_tokens = sum(_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = _tokens(reply)
        return web.json_response(
            {
                "id": f"chatcmpl-{content_key}-{state.counters['ok']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "invalid API key", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        name = str(body.get("model", ""))
        state = self._model(name)
        if state is None:
            return _error(
                404, f"model {name!r} does not exist", "invalid_request_error", "model_not_found"
            )
        inputs = body.get("input") or []
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        refused = await self._gate(
            name, state, hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
        )
        if refused is not None:
            return refused
        state.counters["ok"] += 1
        tokens = sum(_tokens(str(t)) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "model": name,
                "data": [
                    {"object": "embedding", "index": i, "embedding": _embedding(str(t))}
                    for i, t in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def list_models(self, _request: web.Request) -> web.Response:
        data = [
            {"id": n, "object": "model", "owned_by": "konstruct-simulator"} for n in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def stats(self, _request: web.Request) -> web.Response:
        keys = (
            "requests",
            "ok",
            "rate_limited",
            "errors",
            "outage",
            "hangs",
            "in_flight",
            "max_in_flight",
        )
        models = {n: {k: s.counters[k] for k in keys} for n, s in self.models.items()}
        return web.json_response({"models": models, "started_at": self.started_at})

    async def timeline(self, request: web.Request) -> web.Response:
        state = self.models.get(request.match_info["model"])
        bucket_s = max(1, int(request.query.get("bucket_s", "1")))
        buckets: dict[int, int] = defaultdict(int)
        for second, count in (state.ok_per_second if state else {}).items():
            buckets[second // bucket_s * bucket_s] += count
        return web.json_response({"bucket_s": bucket_s, "ok": dict(sorted(buckets.items()))})

    async def requests(self, request: web.Request) -> web.Response:
        state = self.models.get(request.match_info["model"])
        if state is None:
            return web.json_response({"requests": {}, "ok_by_content": {}})
        return web.json_response(
            {"requests": dict(state.by_content), "ok_by_content": dict(state.ok_by_content)}
        )

    async def put_profile(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        state = self._state(name)
        try:
            merged = ModelProfile.model_validate(
                {**state.profile.model_dump(), **await request.json()}
            )
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error")
        state.set_profile(merged)
        return web.json_response(merged.model_dump())

    async def reset(self, _request: web.Request) -> web.Response:
        self.started_at = time.time()
        self.attempts.clear()
        for state in self.models.values():
            in_flight = state.counters["in_flight"]
            state.counters.clear()
            state.counters["in_flight"] = in_flight
            state.by_content.clear()
            state.ok_by_content.clear()
            state.ok_per_second.clear()
        return web.json_response({"reset": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", lambda _r: web.json_response({"ok": True}))
        app.router.add_get("/admin/stats", self.stats)
        app.router.add_get("/admin/stats/{model}/timeline", self.timeline)
        app.router.add_get("/admin/requests/{model}", self.requests)
        app.router.add_put("/admin/models/{model}", self.put_profile)
        app.router.add_post("/admin/reset", self.reset)
        return app


@dataclass
class SimulatorHandle:
    runner: web.AppRunner
    host: str
    port: int
    simulator: Simulator

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_simulator(
    host: str, port: int, config: SimulatorConfig, api_key: str | None
) -> SimulatorHandle:
    """Serve in this event loop; port 0 picks a free one."""
    simulator = Simulator(config, api_key)
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return SimulatorHandle(runner, host, int(bound), simulator)


async def _serve(args: argparse.Namespace) -> None:
    config = SimulatorConfig.from_yaml(Path(args.config)) if args.config else SimulatorConfig()
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    handle = await start_simulator(args.host, args.port, config, api_key)
    print(f"simulator listening on {handle.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible LLM provider simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--config", help="YAML with `models: {name: profile}`")
    parser.add_argument("--api-key-env", help="env variable whose value clients must send")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
