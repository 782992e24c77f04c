"""The HTTP server: OpenAI-compatible endpoints, fault injection, admin API and CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic import ValidationError

from konstruct.providers.responses_wire import input_messages, response_events, response_object
from konstruct.providers.simulator.clock import Clock, ClockChange
from konstruct.providers.simulator.profiles import TICK_S, ModelProfile, ModelState, SimulatorConfig
from konstruct.providers.simulator.responders import (
    ToolReply,
    assistant_reply,
    content_key,
    count_tokens,
    embed_text,
    last_user_text,
    message_text,
    reply_tokens,
    seeded_rng,
    structured_reply,
)

# Hung requests would otherwise hold shutdown for aiohttp's default 60 s.
_SHUTDOWN_GRACE_S = 0.5


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def model_not_found(model: str) -> web.Response:
    message = f"The model `{model}` does not exist"
    return error_response(404, message, "invalid_request_error", "model_not_found")


async def json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def bad_request(message: str) -> web.Response:
    return error_response(400, message, "invalid_request_error")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    def __init__(self, config: SimulatorConfig, api_key: str | None) -> None:
        self.config = config
        self.api_key = api_key
        self.models: dict[str, ModelState] = {}
        self.attempts: Counter[tuple[str, str]] = Counter()
        # Rate limits, windows, quotas and the timeline read this clock; tests
        # freeze and advance it through /admin/clock (latency sleeps do not).
        self.clock = Clock()
        self.started_at = time.time()
        self._started_mono = self.clock.now()
        for name, profile in config.models.items():
            self._create_model(name, profile)

    def _create_model(self, name: str, profile: ModelProfile) -> ModelState:
        state = ModelState(profile)
        state.set_profile(profile, self.clock.now())
        self.models[name] = state
        return state

    def _known_model(self, name: str) -> ModelState | None:
        state = self.models.get(name)
        if state is None and self.config.auto_create:
            state = self._create_model(name, self.config.default)
        return state

    def _since_start(self) -> float:
        return self.clock.now() - self._started_mono

    def _authorised(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _unauthorised(self) -> web.Response:
        return error_response(
            401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"
        )

    async def _apply_faults(
        self, name: str, state: ModelState, key: str, tokens: Callable[[], int]
    ) -> tuple[web.Response | None, dict[str, str]]:
        """Count the request and play the profile's limiter, faults and latency.

        Returns the refusal (None means answer) and the limiter's headers, which
        go on every answer after the limiter; `tokens` is called only by a
        limiter that counts tokens.
        """
        profile, counters = state.profile, state.counters
        counters["requests"] += 1
        state.by_content[key] += 1
        self.attempts[(name, key)] += 1
        if profile.outage:
            counters["outage"] += 1
            message = f"{name} is unavailable (simulated outage)"
            refusal = error_response(503, message, "service_unavailable", "service_unavailable")
            return refusal, {}
        headers: dict[str, str] = {}
        if state.limiter is not None:
            verdict = state.limiter.admit(self.clock.now(), name, tokens())
            headers = verdict.headers
            if not verdict.allowed:
                state.record_rate_limited(self._since_start())
                refusal = error_response(429, verdict.message, verdict.kind, verdict.code, headers)
                return refusal, headers
        rng = seeded_rng(profile.seed, name, key, self.attempts[(name, key)])
        if rng.random() < profile.error_rate:
            counters["errors"] += 1
            error = error_response(500, "simulated internal error", "server_error", None, headers)
            return error, headers
        hang = rng.random() < profile.hang_rate
        delay_ms = max(0.0, profile.latency_ms + rng.uniform(-1, 1) * profile.latency_jitter_ms)
        counters["in_flight"] += 1
        counters["max_in_flight"] = max(counters["max_in_flight"], counters["in_flight"])
        try:
            if hang:
                counters["hangs"] += 1
                await asyncio.sleep(profile.hang_seconds)
            elif delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
        finally:
            counters["in_flight"] -= 1
        return None, headers

    @staticmethod
    def _pace(state: ModelState, first: int, tokens: int) -> Callable[[int], float]:
        """Seconds (on the clock) before chunk i of a stream whose `tokens` token
        chunks start at index `first`: the profile's time to first token, then its
        delay between tokens, as the profile says when the chunk is due (a test may
        change it mid-stream); other chunks at once."""

        def wait(i: int) -> float:
            if not first <= i < first + tokens:
                return 0.0
            profile = state.profile
            return (profile.ttft_ms if i == first else profile.inter_token_ms) / 1000

        return wait

    async def _answer_paced(self, pace: Callable[[int], float], tokens: int) -> None:
        """An answer not streamed: wait as long as its stream would have."""
        for i in range(tokens):
            await self.clock.sleep(pace(i))

    async def _send_event_stream(
        self,
        request: web.Request,
        chunks: list[dict[str, Any]],
        pace: Callable[[int], float],
        headers: dict[str, str] | None = None,
        named: bool = False,
    ) -> web.StreamResponse:
        """Server-sent events, each after its `pace` on the clock: chat chunks ending
        `[DONE]`, or (`named`) the Responses API's events, each with its `event:`
        line and no `[DONE]`."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **(headers or {}),
            }
        )
        await response.prepare(request)
        for index, chunk in enumerate(chunks):
            if (wait := pace(index)) > 0:
                await self.clock.sleep(wait)
            event = f"event: {chunk['type']}\n" if named else ""
            await response.write(f"{event}data: {json.dumps(chunk)}\n\n".encode())
        if not named:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return self._unauthorised()
        body = await json_object(request)
        if body is None or not isinstance(body.get("messages"), list):
            return bad_request("the body must be a JSON object with a `messages` list")
        name = str(body.get("model", ""))
        state = self._known_model(name)
        if state is None:
            return model_not_found(name)
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        key = content_key(last_user_text(messages))
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages)

        tools, tool_choice = body.get("tools"), body.get("tool_choice")

        wanted_format = body.get("response_format")

        def build_reply(mismatch: bool = False) -> ToolReply:
            reply = assistant_reply(name, state.profile, messages, tools, tool_choice)
            return structured_reply(reply, wanted_format, state.profile, key, mismatch)

        def request_tokens() -> int:
            # The usage this request will report, as a token limit counts it.
            return prompt_tokens + reply_tokens(build_reply())

        refused, limit_headers = await self._apply_faults(name, state, key, request_tokens)
        if refused is not None:
            return refused
        # The profile's first `json_mismatch_first` structured answers do not fit.
        forced = (
            isinstance(wanted_format, dict)
            and wanted_format.get("type") in ("json_object", "json_schema")
            and state.counters["json_forced"] < state.profile.json_mismatch_first
        )
        if forced:
            state.counters["json_forced"] += 1
        reply = build_reply(mismatch=forced)
        state.record_ok(key, self._since_start())
        completion_tokens = reply_tokens(reply)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-{key}-{state.counters['ok']}"
        pieces = token_pieces(reply)
        pace = self._pace(state, 0, len(pieces))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = stream_chunks(
                completion_id, name, reply, pieces, usage if include_usage else None
            )
            return await self._send_event_stream(request, chunks, pace, limit_headers)
        await self._answer_paced(pace, len(pieces))
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", **reply_message(reply)},
                        "finish_reason": finish_reason(reply),
                    }
                ],
                "usage": usage,
            },
            headers=limit_headers,
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/responses`, for text answers (`konstruct.providers.responses_wire`):
        the same replies, limits and faults as a chat completion of the same messages."""
        if not self._authorised(request):
            return self._unauthorised()
        body = await json_object(request)
        if body is None or "input" not in body:
            return bad_request("the body must be a JSON object with an `input`")
        messages = input_messages(body.get("instructions"), body["input"])
        if messages is None:
            return bad_request("`input` must be a string or a list of messages with text")
        name = str(body.get("model", ""))
        state = self._known_model(name)
        if state is None:
            return model_not_found(name)
        key = content_key(last_user_text(messages))
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages)

        def build_reply() -> ToolReply:
            return assistant_reply(name, state.profile, messages, None, None)

        refused, limit_headers = await self._apply_faults(
            name, state, key, lambda: prompt_tokens + reply_tokens(build_reply())
        )
        if refused is not None:
            return refused
        reply = build_reply()
        state.record_ok(key, self._since_start())
        text, completion_tokens = str(reply.get("content") or ""), reply_tokens(reply)
        response_id = f"resp_{key}{state.counters['ok']}"
        pieces = token_pieces(reply) or [""]
        if body.get("stream"):
            events = response_events(response_id, name, pieces, prompt_tokens, completion_tokens)
            # The text deltas follow the four events that open the answer.
            pace = self._pace(state, 4, len(pieces))
            return await self._send_event_stream(request, events, pace, limit_headers, named=True)
        await self._answer_paced(self._pace(state, 0, len(pieces)), len(pieces))
        answer = response_object(response_id, name, text, prompt_tokens, completion_tokens)
        return web.json_response(answer, headers=limit_headers)

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._unauthorised()
        body = await json_object(request)
        if body is None or "input" not in body:
            return bad_request("the body must be a JSON object with an `input`")
        name = str(body.get("model", ""))
        state = self._known_model(name)
        if state is None:
            return model_not_found(name)
        raw = body["input"]
        inputs = [str(item) for item in (raw if isinstance(raw, list) else [raw])]
        key = content_key(json.dumps(inputs))
        tokens = sum(count_tokens(text) for text in inputs)
        refused, limit_headers = await self._apply_faults(name, state, key, lambda: tokens)
        if refused is not None:
            return refused
        state.record_ok(key, self._since_start())
        data = [
            {"object": "embedding", "index": i, "embedding": embed_text(text)}
            for i, text in enumerate(inputs)
        ]
        return web.json_response(
            {
                "object": "list",
                "model": name,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=limit_headers,
        )

    async def list_models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._unauthorised()
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "konstruct-simulator"}
            for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(self, _request: web.Request) -> web.Response:
        models = {name: state.stats() for name, state in self.models.items()}
        return web.json_response({"models": models, "started_at": self.started_at})

    async def timeline(self, request: web.Request) -> web.Response:
        """ok and 429 answers per bucket since start (or the last reset); index i is bucket i."""
        try:
            bucket_s = float(request.query.get("bucket_s", "1"))
        except ValueError:
            return bad_request("bucket_s must be a number")
        ticks_per_bucket = max(1, round(bucket_s / TICK_S))
        bucket_count = int(self._since_start() / TICK_S) // ticks_per_bucket + 1
        state = self.models.get(request.match_info["model"])

        def per_bucket(ticks: Counter[int]) -> list[int]:
            counts = [0] * bucket_count
            for tick, count in ticks.items():
                counts[min(tick // ticks_per_bucket, bucket_count - 1)] += count
            return counts

        return web.json_response(
            {
                "model": request.match_info["model"],
                "bucket_s": ticks_per_bucket * TICK_S,
                "started_at": self.started_at,
                "ok": per_bucket(state.ok_per_tick if state else Counter()),
                "rate_limited": per_bucket(state.rate_limited_per_tick if state else Counter()),
            }
        )

    async def requests_by_content(self, request: web.Request) -> web.Response:
        state = self.models.get(request.match_info["model"])
        if state is None:
            return web.json_response({"requests": {}, "ok_by_content": {}})
        return web.json_response(
            {"requests": dict(state.by_content), "ok_by_content": dict(state.ok_by_content)}
        )

    async def list_profiles(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {name: state.profile.model_dump() for name, state in self.models.items()}
        )

    async def put_profile(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        fields = await json_object(request)
        if fields is None:
            return bad_request("the body must be a JSON object of profile fields")
        state = self.models.get(name)
        current = state.profile if state else self.config.default
        try:
            merged = ModelProfile.model_validate({**current.model_dump(), **fields})
        except ValidationError as exc:
            return bad_request(str(exc))
        if state is None:
            self._create_model(name, merged)
        else:
            state.set_profile(merged, self.clock.now())
        return web.json_response(merged.model_dump())

    async def reset(self, _request: web.Request) -> web.Response:
        # The clock is left as it is: a test may reset (a new day for a quota)
        # while it holds the clock frozen.
        self.started_at = time.time()
        self._started_mono = self.clock.now()
        self.attempts.clear()
        for state in self.models.values():
            state.reset_counters(self._started_mono)
        return web.json_response({"reset": True})

    def _clock_reading(self) -> web.Response:
        return web.json_response({"now_s": self.clock.now(), "frozen": self.clock.frozen})

    async def get_clock(self, _request: web.Request) -> web.Response:
        return self._clock_reading()

    async def set_clock(self, request: web.Request) -> web.Response:
        """`{"frozen": true|false, "advance_s": N}`, either or both: freeze (or resume
        real time from the current reading), then move forward N seconds."""
        fields = await json_object(request)
        if fields is None:
            return bad_request('the body must be a JSON object: {"frozen": bool, "advance_s": N}')
        try:
            change = ClockChange.model_validate(fields)
        except ValidationError as exc:
            return bad_request(str(exc))
        change.apply(self.clock)
        return self._clock_reading()

    def app(self) -> web.Application:
        app = web.Application()
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/chat/completions", self.chat),
            ("POST", "/v1/responses", self.responses),
            ("POST", "/v1/embeddings", self.embeddings),
            ("GET", "/v1/models", self.list_models),
            ("GET", "/health", self.health),
            ("GET", "/admin/stats", self.stats),
            ("GET", "/admin/stats/{model}/timeline", self.timeline),
            ("GET", "/admin/requests/{model}", self.requests_by_content),
            ("GET", "/admin/models", self.list_profiles),
            ("PUT", "/admin/models/{model}", self.put_profile),
            ("POST", "/admin/reset", self.reset),
            ("GET", "/admin/clock", self.get_clock),
            ("POST", "/admin/clock", self.set_clock),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        return app


def reply_message(reply: ToolReply) -> dict[str, Any]:
    """The assistant message's fields past `role`: content, or null content and tool_calls."""
    if "tool_calls" in reply:
        return {"content": None, "tool_calls": reply["tool_calls"]}
    return {"content": reply["content"]}


def finish_reason(reply: ToolReply) -> str:
    return "tool_calls" if "tool_calls" in reply else "stop"


def token_pieces(reply: ToolReply) -> list[str]:
    """A reply as the tokens it streams: each word with the spaces before it (one
    piece for a reply of tool calls, none for an empty one)."""
    if "tool_calls" in reply:
        return [""]
    return re.findall(r"\s*\S+|\s+$", str(reply.get("content") or ""))


def stream_chunks(
    completion_id: str,
    model: str,
    reply: ToolReply,
    pieces: list[str],
    usage: dict[str, int] | None,
) -> list[dict[str, Any]]:
    """The chat.completion.chunk events of one streamed reply: the role with the
    first token (or the tool calls), one chunk per further token, the finish, and
    the usage when asked for."""
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    if "tool_calls" in reply:
        calls = [{"index": index, **call} for index, call in enumerate(reply["tool_calls"])]
        chunks = [chunk({"role": "assistant", "content": None, "tool_calls": calls})]
    else:
        first, *rest = pieces or [""]
        chunks = [chunk({"role": "assistant", "content": first})]
        chunks += [chunk({"content": piece}) for piece in rest]
    chunks.append(chunk({}, finish_reason(reply)))
    if usage is not None:
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


@dataclass
class SimulatorHandle:
    runner: web.AppRunner
    host: str
    port: int
    simulator: Simulator

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    config: SimulatorConfig | None = None,
    api_key: str | None = None,
) -> SimulatorHandle:
    """Serve in the running event loop; port 0 picks a free port (see handle.port)."""
    simulator = Simulator(config or SimulatorConfig(), api_key)
    runner = web.AppRunner(
        simulator.app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return SimulatorHandle(runner, host, int(bound), simulator)


async def _serve(host: str, port: int, config: SimulatorConfig, api_key: str | None) -> None:
    handle = await start_simulator(host, port, config, api_key)
    print(f"simulator listening on {handle.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m konstruct.providers.simulator",
        description="OpenAI-compatible LLM provider simulator",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--config", type=Path, help="YAML with `models: {name: profile}`")
    parser.add_argument("--api-key-env", help="env variable holding the key clients must send")
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig.from_yaml(args.config) if args.config else SimulatorConfig()
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        parser.error(f"cannot load {args.config}: {exc}")
    api_key = None
    if args.api_key_env:
        # A named but empty variable would silently switch auth off.
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env names {args.api_key_env}, which is not set")
    asyncio.run(_serve(args.host, args.port, config, api_key))
