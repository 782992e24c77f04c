"""The provider simulator, over HTTP and through litellm as the platform reaches it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest

from konstruct.app.stack import simulator_command
from konstruct.providers.simulator import (
    ModelProfile,
    SimulatorConfig,
    SimulatorHandle,
    main,
    start_simulator,
)
from konstruct.providers.simulator.admin import SimulatorAdmin
from konstruct.providers.simulator.limiters import openai_duration

KEY = "sk-sim-unit"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def server() -> AsyncIterator[SimulatorHandle]:
    config = SimulatorConfig(
        models={
            "sim-fast": ModelProfile(),
            "arith": ModelProfile(accuracy=1.0),
            "e": ModelProfile(),
        }
    )
    handle = await start_simulator("127.0.0.1", 0, config, KEY)
    yield handle
    await handle.stop()


@pytest.fixture
async def http(server: SimulatorHandle) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=5) as client:
        yield client


@pytest.fixture
async def admin(server: SimulatorHandle) -> AsyncIterator[SimulatorAdmin]:
    client = SimulatorAdmin(server.url)
    yield client
    await client.close()


async def chat(
    http: httpx.AsyncClient, model: str, text: str, system: str | None = None, **kw: Any
) -> httpx.Response:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return await http.post(
        "/v1/chat/completions", json={"model": model, "messages": messages}, **kw
    )


async def reply(http: httpx.AsyncClient, model: str, text: str, system: str | None = None) -> str:
    response = await chat(http, model, text, system)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def test_chat_completion_has_the_openai_shape(http: httpx.AsyncClient) -> None:
    body = (await chat(http, "sim-fast", "hello there")).json()
    assert body["object"] == "chat.completion" and body["model"] == "sim-fast"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "[sim-fast] hello there"}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_arithmetic_accuracy_is_honoured(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    for i in range(20):
        assert await reply(http, "arith", f"Answer with a number only: What is {i} + 7?") == str(
            i + 7
        )
    assert await reply(http, "arith", "100 - 58") == "42"
    assert await reply(http, "arith", "3*4") == "12"
    assert await reply(http, "arith", "8 / 2") == "4"
    assert await reply(http, "arith", "What is 2 + 3 * 4?") == "14"
    await admin.set_profile("arith", accuracy=0.0)
    for i in range(20):
        assert await reply(http, "arith", f"What is {i} * 3?") != str(i * 3)
    wrong = await reply(http, "arith", "What is 10 * 3?")
    assert wrong == await reply(http, "arith", "What is 10 * 3?")
    assert 0 < abs(int(wrong) - 30) <= 3


async def test_responders_are_deterministic(http: httpx.AsyncClient) -> None:
    rubric = "Grade the answer against the rubric and give a score."
    verdict = json.loads(await reply(http, "sim-fast", "Answer: 42", system=rubric))
    assert 0 <= verdict["score"] <= 1 and round(verdict["score"], 2) == verdict["score"]
    assert verdict == json.loads(await reply(http, "sim-fast", "Answer: 42", system=rubric))
    promote = await reply(http, "sim-fast", "Candidate has lower WAPE. Promote or hold?")
    assert promote.startswith("Decision: PROMOTE\nRationale: ")
    hold = await reply(http, "sim-fast", "Candidate WAPE 14.2 vs 12.1. Promote or hold?")
    assert hold.startswith("Decision: HOLD\nRationale: ")
    for question in ("Are you an AI?", "are you human", "What are you?"):
        assert "AI assistant" in await reply(http, "sim-fast", question)


async def test_rate_limit_answers_429_with_retry_after(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    # Frozen clock: requests slower than the refill on a loaded machine no longer pass.
    await admin.freeze_clock()
    await admin.set_profile("sim-fast", rate_limit_rps=1)
    statuses = [await chat(http, "sim-fast", f"q{i}") for i in range(3)]
    assert [r.status_code for r in statuses] == [200, 429, 429]
    limited = statuses[1]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["retry-after-ms"] == "1000"
    assert (await admin.model_stats("sim-fast"))["rate_limited"] == 2
    timeline = await admin.timeline("sim-fast", bucket_s=60)
    assert (timeline["ok"], timeline["rate_limited"]) == ([1], [2])

    await admin.set_profile("sim-fast", rate_limit_rps=2)  # burst 2, a token every 500 ms
    burst = [await chat(http, "sim-fast", f"b{i}") for i in range(3)]
    assert [r.status_code for r in burst] == [200, 200, 429]
    wait_ms = int(burst[2].headers["retry-after-ms"])
    assert wait_ms == 500
    await admin.advance_clock(wait_ms / 1000)  # exactly the announced wait is enough
    assert (await chat(http, "sim-fast", "after the wait")).status_code == 200


async def test_the_admin_clock_freezes_and_advances_the_limiters(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    assert (await admin.clock())["frozen"] is False
    frozen = await admin.freeze_clock()
    assert frozen["frozen"] is True
    await admin.set_profile("sim-fast", rate_limit_rps=2)  # burst 2, a token every 500 ms
    assert [(await chat(http, "sim-fast", f"c{i}")).status_code for i in range(2)] == [200, 200]
    # Frozen: wall time past the refill gives no token (the answer holds for any sleep).
    await asyncio.sleep(0.6)
    refused = await chat(http, "sim-fast", "frozen")
    assert refused.status_code == 429 and refused.headers["retry-after-ms"] == "500"
    assert await admin.clock() == frozen
    await admin.reset()  # a reset leaves the clock as it is
    assert await admin.clock() == frozen

    # Advance: the refill is exactly the time advanced.
    assert (await admin.advance_clock(0.25))["now_s"] == frozen["now_s"] + 0.25
    half = await chat(http, "sim-fast", "half a token")
    assert half.status_code == 429 and half.headers["retry-after-ms"] == "250"
    await admin.advance_clock(0.25)
    assert (await chat(http, "sim-fast", "a whole token")).status_code == 200

    # Real time again, from the frozen reading: the clock neither jumps nor goes back.
    before = (await admin.clock())["now_s"]
    started = time.monotonic()
    resumed = await admin.real_clock()
    assert resumed["frozen"] is False
    assert before <= resumed["now_s"] <= before + (time.monotonic() - started)

    # Advancing a running clock: an idle gap of 1000 s made short.
    await admin.set_profile("sim-fast", rate_limit_rps=0.001)
    assert (await chat(http, "sim-fast", "the only token")).status_code == 200
    limited = await chat(http, "sim-fast", "a thousand seconds early")
    assert limited.status_code == 429
    await admin.advance_clock(int(limited.headers["retry-after-ms"]) / 1000)
    assert (await chat(http, "sim-fast", "after the idle gap")).status_code == 200
    # The timeline saw the gap too: the last ok is ~1000 s (17 minute buckets) later.
    ok = (await admin.timeline("sim-fast", bucket_s=60))["ok"]
    assert (ok[0], ok[-1], sum(ok), len(ok) >= 17) == (2, 1, 3, True)

    for body, field in [
        ({"advance_s": -1}, "advance_s"),
        ({"advance_s": "soon"}, "advance_s"),
        ({"frozen": "yes"}, "frozen"),
        ({"speed": 2}, "speed"),
        ([], "JSON object"),
    ]:
        response = await http.post("/admin/clock", json=body)
        assert response.status_code == 400 and field in response.text, (body, response.text)
    infinite = await http.post("/admin/clock", content=b'{"advance_s": 1e999}')
    assert infinite.status_code == 400 and "advance_s" in infinite.text


def seconds(duration: str) -> float:
    """An OpenAI x-ratelimit-reset-* value (120ms, 1s, 6m0s, 1h0m0s) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_reset_durations_are_in_openai_format() -> None:
    cases = {0: "0s", 0.12: "120ms", 0.0001: "1ms", 1: "1s", 7.66: "7.66s", 360: "6m0s"}
    assert {s: openai_duration(s) for s in cases} == cases
    assert openai_duration(3600 + 61.5) == "1h1m1.5s"
    assert seconds("6m0s") == 360 and seconds("120ms") == 0.12


async def test_sliding_window_reports_openai_request_headers(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    # Frozen clock: the window no longer moves between the requests on a loaded machine.
    await admin.freeze_clock()
    await admin.set_profile(
        "sim-fast", rate_limit_shape="sliding_window", rate_limit_requests=3, rate_limit_window_s=1
    )
    answers = [await chat(http, "sim-fast", f"w{i}") for i in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"3"}
    limited = answers[3]
    assert "Retry-After" not in limited.headers and "retry-after-ms" not in limited.headers
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Limit 3, Used 3, Requested 1" in error["message"]
    wait_s = seconds(limited.headers["x-ratelimit-reset-requests"])
    assert wait_s == 1
    await admin.advance_clock(wait_s)  # the oldest request leaves the window
    after = await chat(http, "sim-fast", "after the window moved")
    # The first three came at the same (frozen) instant, so all of them have left.
    assert after.status_code == 200
    assert after.headers["x-ratelimit-remaining-requests"] == "2"
    assert seconds(after.headers["x-ratelimit-reset-requests"]) == 1
    await admin.advance_clock(seconds(after.headers["x-ratelimit-reset-requests"]))
    streamed = await http.post(
        "/v1/chat/completions",
        json={"model": "sim-fast", "messages": [{"role": "user", "content": "s"}], "stream": True},
    )
    assert streamed.status_code == 200 and "x-ratelimit-reset-requests" in streamed.headers
    stats = await admin.model_stats("sim-fast")
    assert (stats["ok"], stats["rate_limited"]) == (5, 1)
    timeline = await admin.timeline("sim-fast", bucket_s=60)
    assert (timeline["ok"], timeline["rate_limited"]) == ([5], [1])


async def test_leaky_bucket_refuses_without_retry_after(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    # Frozen clock: a request slower than the leak on a loaded machine no longer passes.
    await admin.freeze_clock()
    await admin.set_profile("sim-fast", rate_limit_shape="leaky_bucket", rate_limit_rps=2)
    first, second = [await chat(http, "sim-fast", f"l{i}") for i in range(2)]
    assert (first.status_code, second.status_code) == (200, 429)
    assert not {"retry-after", "retry-after-ms"} & {h.lower() for h in second.headers}
    assert not any(h.lower().startswith("x-ratelimit") for h in second.headers)
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    await admin.advance_clock(0.5)  # one request leaks out at 2 a second
    assert (await chat(http, "sim-fast", "leaked")).status_code == 200

    await admin.set_profile("sim-fast", rate_limit_burst=3, rate_limit_rps=1)
    burst = [(await chat(http, "sim-fast", f"b{i}")).status_code for i in range(5)]
    assert burst == [200, 200, 200, 429, 429]
    await admin.advance_clock(1)
    assert (await chat(http, "sim-fast", "after a second")).status_code == 200
    timeline = await admin.timeline("sim-fast", bucket_s=60)
    assert (sum(timeline["ok"]), sum(timeline["rate_limited"])) == (6, 3)
    assert (await admin.model_stats("sim-fast"))["rate_limited"] == 3


async def test_tokens_per_minute_counts_prompt_and_completion_tokens(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    text = "how many tokens is this"
    tokens = (await chat(http, "sim-fast", text)).json()["usage"]["total_tokens"]
    await admin.reset()
    # Frozen clock: the window no longer moves between the requests on a loaded machine.
    await admin.freeze_clock()
    limit = 2 * tokens + 1
    await admin.set_profile(
        "sim-fast",
        rate_limit_shape="tokens_per_minute",
        rate_limit_tokens=limit,
        rate_limit_window_s=1,
    )
    answers = [await chat(http, "sim-fast", text) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    remaining = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in answers]
    assert remaining == [tokens + 1, 1, 1]
    assert {r.headers["x-ratelimit-limit-tokens"] for r in answers} == {str(limit)}
    error = answers[2].json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert f"Limit {limit}, Used {2 * tokens}, Requested {tokens}" in error["message"]
    assert "Retry-After" not in answers[2].headers
    wait_s = seconds(answers[2].headers["x-ratelimit-reset-tokens"])
    assert wait_s == 1
    await admin.advance_clock(wait_s)
    assert (await chat(http, "sim-fast", text)).status_code == 200
    timeline = await admin.timeline("sim-fast", bucket_s=60)
    assert (timeline["ok"], timeline["rate_limited"]) == ([3], [1])


async def test_daily_quota_holds_until_the_admin_reset(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    await admin.set_profile("sim-fast", rate_limit_shape="daily_quota", quota_requests=2)
    statuses = [(await chat(http, "sim-fast", f"d{i}")).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    await admin.set_profile("sim-fast", latency_ms=1)  # other fields keep the quota spent
    refused = await chat(http, "sim-fast", "still over")
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    error = refused.json()["error"]
    assert error["message"].startswith("You exceeded your current quota")
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    timeline = await admin.timeline("sim-fast", bucket_s=60)
    assert (timeline["ok"], timeline["rate_limited"]) == ([2], [2])
    await admin.reset()
    assert (await chat(http, "sim-fast", "a new day")).status_code == 200


async def test_limiter_fields_are_validated(http: httpx.AsyncClient, admin: SimulatorAdmin) -> None:
    bad = [
        ({"rate_limit_shape": "fixed_window"}, "rate_limit_shape"),
        ({"rate_limit_shape": "sliding_window"}, "rate_limit_requests"),
        ({"rate_limit_shape": "sliding_window", "rate_limit_requests": -1}, "rate_limit_requests"),
        ({"rate_limit_tokens": 0}, "rate_limit_tokens"),
        ({"quota_requests": -1}, "quota_requests"),
        ({"rate_limit_window_s": 0}, "rate_limit_window_s"),
        ({"rate_limit_burst": 0}, "rate_limit_burst"),
        ({"rate_limit_shape": "leaky_bucket"}, "rate_limit_rps"),
    ]
    for fields, name in bad:
        response = await http.put("/admin/models/sim-fast", json=fields)
        assert response.status_code == 400 and name in response.text, (fields, response.text)
    profile = await admin.set_profile("sim-fast", latency_ms=0)
    assert (profile["rate_limit_shape"], profile["rate_limit_window_s"]) == ("token_bucket", 60)
    assert (profile["rate_limit_burst"], profile["quota_requests"]) == (1, None)


def test_limiter_shapes_load_from_the_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "simulator.yaml"
    path.write_text(
        "models:\n"
        "  sim-rpm: {rate_limit_shape: sliding_window, rate_limit_requests: 60}\n"
        "  sim-quota: {rate_limit_shape: daily_quota, quota_requests: 100}\n"
    )
    models = SimulatorConfig.from_yaml(path).models
    assert models["sim-rpm"].rate_limit_window_s == 60
    assert models["sim-quota"].quota_requests == 100


async def test_faults_and_counters_change_at_run_time(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    await admin.set_profile("sim-fast", error_rate=1.0)
    assert (await chat(http, "sim-fast", "x")).status_code == 500
    await admin.set_profile("sim-fast", error_rate=0.0, outage=True)
    outage = await chat(http, "sim-fast", "x")
    assert outage.status_code == 503 and "error" in outage.json()
    await admin.set_profile("sim-fast", outage=False)
    assert (await chat(http, "sim-fast", "x")).status_code == 200
    stats = await admin.model_stats("sim-fast")
    assert (stats["requests"], stats["errors"], stats["outage"], stats["ok"]) == (3, 1, 1, 1)
    assert stats["in_flight"] == 0 and stats["max_in_flight"] == 1
    by_content = await admin.requests_by_content("sim-fast")
    assert list(by_content["requests"].values()) == [3]
    assert list(by_content["ok_by_content"].values()) == [1]
    timeline = (await http.get("/admin/stats/sim-fast/timeline", params={"bucket_s": 1})).json()
    assert timeline["bucket_s"] == 1 and sum(timeline["ok"]) == 1
    await admin.reset()
    assert (await admin.model_stats("sim-fast"))["requests"] == 0


async def test_a_retried_request_can_pass_a_partial_error_rate(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    await admin.set_profile("sim-fast", error_rate=0.5)
    statuses = [(await chat(http, "sim-fast", "same question")).status_code for _ in range(12)]
    assert set(statuses) == {200, 500}
    await admin.reset()
    again = [(await chat(http, "sim-fast", "same question")).status_code for _ in range(12)]
    assert again == statuses


async def test_hangs_hold_the_request_and_count_in_flight(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    await admin.set_profile("sim-fast", hang_rate=1.0, hang_seconds=30)
    with pytest.raises(httpx.ReadTimeout):
        await chat(http, "sim-fast", "never answered", timeout=0.2)
    stats = await admin.model_stats("sim-fast")
    assert (stats["hangs"], stats["in_flight"], stats["ok"]) == (1, 1, 0)


async def test_admin_put_validates_and_creates_models(
    http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    assert (await http.put("/admin/models/sim-fast", json={"latency": 5})).status_code == 400
    created = await admin.set_profile("brand-new", latency_ms=1)
    assert created["latency_ms"] == 1 and created["accuracy"] == 1.0
    assert (await chat(http, "brand-new", "hi")).status_code == 200
    models = (await http.get("/v1/models")).json()["data"]
    assert {m["id"] for m in models} == {"sim-fast", "arith", "e", "brand-new"}


async def test_auth_and_unknown_model(server: SimulatorHandle, http: httpx.AsyncClient) -> None:
    wrong = {"Authorization": "Bearer wrong"}
    assert (await chat(http, "sim-fast", "x", headers=wrong)).status_code == 401
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        denied = await anonymous.post("/v1/embeddings", json={"model": "e", "input": "x"})
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        assert (await anonymous.get("/v1/models")).status_code == 401
        assert (await anonymous.get("/health")).status_code == 200
    response = await chat(http, "nope", "x")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "model_not_found"


async def test_embeddings_are_deterministic_normalised_and_similar(
    http: httpx.AsyncClient,
) -> None:
    async def embed(texts: list[str]) -> list[list[float]]:
        response = await http.post("/v1/embeddings", json={"model": "e", "input": texts})
        body = response.json()
        assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
        return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

    texts = ["sales forecast by store", "sales forecast by region", "the cat sat on a mat"]
    vectors = await embed(texts)
    assert vectors == await embed(texts)
    assert all(len(v) == 64 and abs(sum(x * x for x in v) - 1) < 1e-9 for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


async def _through_litellm(server: SimulatorHandle, model: str, text: str, **options: Any) -> Any:
    """One chat completion through litellm, which must not retry on its own."""
    return await litellm.acompletion(
        model=f"openai/{model}",
        api_base=server.api_base,
        api_key=KEY,
        messages=[{"role": "user", "content": text}],
        num_retries=0,
        max_retries=0,
        **options,
    )


async def test_reached_through_litellm_like_a_real_provider(server: SimulatorHandle) -> None:
    response = await _through_litellm(server, "sim-fast", "hello from litellm")
    assert response.choices[0].message.content == "[sim-fast] hello from litellm"
    assert response.usage.total_tokens > 0
    arithmetic = await _through_litellm(
        server, "arith", "Answer with a number only: What is 12 + 30?"
    )
    assert arithmetic.choices[0].message.content == "42"


async def test_streaming_through_litellm(server: SimulatorHandle) -> None:
    stream = await _through_litellm(server, "sim-fast", "stream me", stream=True)
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(parts) == "[sim-fast] stream me"


async def test_a_429_reaches_litellm_callers_with_its_retry_after(
    server: SimulatorHandle, http: httpx.AsyncClient, admin: SimulatorAdmin
) -> None:
    # Frozen clock: the announced wait no longer shrinks by however long the calls took.
    await admin.freeze_clock()
    await admin.set_profile("sim-fast", rate_limit_rps=0.25)
    await chat(http, "sim-fast", "take the only token")
    with pytest.raises(litellm.RateLimitError) as info:
        await _through_litellm(server, "sim-fast", "again")
    # In litellm 1.102.4 the provider's headers are on `litellm_response_headers`
    # (an httpx.Headers); `error.response` is a placeholder without them.
    headers = getattr(info.value, "litellm_response_headers", None) or {}
    assert info.value.status_code == 429
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("4", "4000")


async def test_litellm_surfaces_quota_and_window_refusals(
    server: SimulatorHandle, admin: SimulatorAdmin
) -> None:
    await admin.set_profile("sim-fast", rate_limit_shape="daily_quota", quota_requests=0)
    with pytest.raises(litellm.RateLimitError) as info:
        await _through_litellm(server, "sim-fast", "over quota")
    headers = getattr(info.value, "litellm_response_headers", None) or {}
    assert info.value.status_code == 429
    assert "You exceeded your current quota" in str(info.value)
    # litellm 1.102.4 keeps only the message: `body` is None and `type` is its own
    # "throttling_error", so a caller tells a spent quota from a rate limit by the text.
    assert info.value.body is None and info.value.type == "throttling_error"
    assert "retry-after" not in headers and "retry-after-ms" not in headers

    # Frozen clock: the announced reset no longer shrinks by however long the calls took.
    await admin.freeze_clock()
    await admin.set_profile(
        "sim-fast", rate_limit_shape="sliding_window", rate_limit_requests=1, rate_limit_window_s=5
    )
    response = await _through_litellm(server, "sim-fast", "the one request")
    passed = response._hidden_params["additional_headers"]
    assert passed["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(litellm.RateLimitError) as info:
        await _through_litellm(server, "sim-fast", "one too many")
    headers = getattr(info.value, "litellm_response_headers", None) or {}
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-reset-requests"] == "5s"
    # Again only the message survives litellm, not the body's code.
    assert "Rate limit reached for sim-fast on requests" in str(info.value)


def test_cli_serves_prints_its_port_and_stops_on_sigterm() -> None:
    env = dict(os.environ, SIM_TEST_KEY="cli-key")
    command = simulator_command(0, ROOT / "deploy" / "simulator.yaml", "SIM_TEST_KEY")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer cli-key"})
        assert {m["id"] for m in models.json()["data"]} == {
            "sim-fast",
            "sim-quality",
            "sim-judge",
            "sim-arith",
            "sim-embed",
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_cli_refuses_an_unset_key_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SIM_UNSET_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--api-key-env", "SIM_UNSET_KEY"])
    assert exit_info.value.code == 2 and "SIM_UNSET_KEY" in capsys.readouterr().err


def _tools(*names: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"the {name} tool",
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for name in names
    ]


async def _tool_turn(
    http: httpx.AsyncClient, messages: list[dict[str, Any]], tools: list[dict[str, Any]], **kw: Any
) -> dict[str, Any]:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "sim-fast", "messages": messages, "tools": tools, **kw},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _with_results(
    messages: list[dict[str, Any]], body: dict[str, Any], results: list[str]
) -> list[dict[str, Any]]:
    """The conversation after `body`'s tool calls, answered by `results` in order."""
    message = body["choices"][0]["message"]
    calls = message["tool_calls"]
    answered = [
        {"role": "tool", "tool_call_id": call["id"], "content": result}
        for call, result in zip(calls, results, strict=True)
    ]
    return [*messages, message, *answered]


async def test_directives_call_the_offered_tools_with_stable_ids(http: httpx.AsyncClient) -> None:
    text = (
        "Look these up.\n"
        '/tool lookup {"sku": "A-1", "store": 7}\n'
        '/tool not_offered {"x": 1}\n'
        '  /tool weather {"city":"Oslo","days":[1, 2]}  \n'
        "/tool lookup {not json}"
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    tools = _tools("lookup", "weather")
    first = await _tool_turn(http, messages, tools)
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    calls = message["tool_calls"]
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("function", "lookup", '{"sku":"A-1","store":7}'),
        ("function", "weather", '{"city":"Oslo","days":[1,2]}'),
    ]
    assert all(re.fullmatch(r"call_[0-9a-f]{20}", c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    second = await _tool_turn(http, messages, tools)
    assert second["choices"][0]["message"]["tool_calls"] == calls
    usage = first["usage"]
    assert usage["completion_tokens"] == 2  # the two compact argument strings
    assert usage["prompt_tokens"] == 2 + len(text.split())

    answered = _with_results(messages, first, ["  SKU A-1:\n 12 units ", "x" * 600])
    final = await _tool_turn(http, answered, tools)
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["message"] == {
        "role": "assistant",
        "content": f"Tool lookup returned: SKU A-1: 12 units\nTool weather returned: {'x' * 500}",
    }
    # The null-content assistant message and the tool messages count as prompt.
    assert final["usage"]["prompt_tokens"] == usage["prompt_tokens"] + 1 + 4 + 1


async def test_tool_repeat_keeps_calling_with_new_ids(http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": '/tool-repeat\n/tool ping {"n": 1}'}]
    tools = _tools("ping")
    body = await _tool_turn(http, messages, tools)
    seen: list[str] = []
    for _ in range(4):
        calls = body["choices"][0]["message"]["tool_calls"]
        assert body["choices"][0]["finish_reason"] == "tool_calls"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            ("ping", '{"n":1}')
        ]
        seen.append(calls[0]["id"])
        messages = _with_results(messages, body, ["pong"])
        body = await _tool_turn(http, messages, tools)
    assert len(set(seen)) == 4


async def test_tools_not_offered_or_refused_answer_as_usual(http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": '/tool missing {"a": 1}'}]
    plain = await _tool_turn(http, messages, _tools("other"))
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["choices"][0]["message"] == {
        "role": "assistant",
        "content": '[sim-fast] /tool missing {"a": 1}',
    }
    refused = await _tool_turn(
        http, [{"role": "user", "content": "/tool other {}"}], _tools("other"), tool_choice="none"
    )
    assert refused["choices"][0]["message"]["content"] == "[sim-fast] /tool other {}"
    # Without `tools`, a directive is just text, and 2 + 3 is arithmetic as before.
    assert await reply(http, "sim-fast", "/tool other {}") == "[sim-fast] /tool other {}"
    no_calculator = await _tool_turn(http, [{"role": "user", "content": "2 + 3"}], _tools("x"))
    assert no_calculator["choices"][0]["message"]["content"] == "5"


async def test_knowledge_search_is_called_for_a_search_prefix(http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "Search:  sales in 2023 - 2024 "}]
    tools = _tools("calculator", "knowledge_search")
    body = await _tool_turn(http, messages, tools)
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {
        "name": "knowledge_search",
        "arguments": '{"query":"sales in 2023 - 2024"}',
    }
    final = await _tool_turn(http, _with_results(messages, body, ["Q4 sales rose\n8%."]), tools)
    assert final["choices"][0]["message"]["content"] == "From the knowledge base: Q4 sales rose 8%."


async def test_calculator_tool_through_litellm(server: SimulatorHandle) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is 12 * 3 + 6?"}]
    options: dict[str, Any] = {
        "model": "openai/arith",
        "api_base": server.api_base,
        "api_key": KEY,
        "tools": _tools("calculator"),
        "num_retries": 0,
        "max_retries": 0,
    }
    first = await litellm.acompletion(messages=messages, **options)
    assert first.choices[0].finish_reason == "tool_calls"
    message = first.choices[0].message
    (call,) = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "calculator",
        {"expression": "12 * 3 + 6"},
    )
    # Completion tokens are the words of {"expression":"12 * 3 + 6"}.
    assert call.id.startswith("call_") and first.usage.completion_tokens == 5
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    final = await litellm.acompletion(messages=messages, **options)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "The answer is 42."


async def test_streamed_tool_calls_parse_with_the_openai_client(
    server: SimulatorHandle,
) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=server.api_base, api_key=KEY, max_retries=0)
    text = '/tool lookup {"sku": "A-1"}\n/tool weather {"city": "Oslo"}'
    # The SDK's TypedDict parameters, as plain JSON.
    request: Any = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": text}],
        "tools": _tools("lookup", "weather"),
    }
    try:
        stream = await client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        calls: dict[int, dict[str, str]] = {}
        finish, usage = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        plain = await client.chat.completions.create(**request)
    finally:
        await client.close()
    assert finish == "tool_calls" and usage is not None and usage.completion_tokens == 2
    expected: list[Any] = plain.choices[0].message.tool_calls or []
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in expected
    ]
    assert [c["arguments"] for c in calls.values()] == ['{"sku":"A-1"}', '{"city":"Oslo"}']


async def test_the_responses_api_answers_the_openai_client_plain_and_streamed(
    server: SimulatorHandle,
) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=server.api_base, api_key=KEY, max_retries=0)
    try:
        plain = await client.responses.create(
            model="sim-fast", input="hello there", instructions="Be brief."
        )
        # The chat completion's answer to the same messages.
        assert plain.output_text == "[sim-fast] hello there"
        assert plain.status == "completed" and plain.usage is not None
        assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
        listed = await client.responses.create(
            model="sim-fast",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "What is 2 + 3?"}]}],
        )
        assert listed.output_text.strip() != ""
        stream = await client.responses.create(model="sim-fast", input="hello there", stream=True)
        kinds, deltas, final = [], [], None
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                final = event.response
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "".join(deltas) == "[sim-fast] hello there"
        assert final is not None and final.output_text == "[sim-fast] hello there"
        with pytest.raises(openai.BadRequestError, match="input"):
            await client.responses.create(model="sim-fast", input=[{"role": "robot"}])  # type: ignore[list-item]
    finally:
        await client.close()
