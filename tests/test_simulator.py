"""The provider simulator, over HTTP and through litellm as the platform reaches it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import litellm
import pytest

from activities.llm import retry_after_seconds
from konstruct.simulator import ModelProfile, SimulatorConfig, SimulatorHandle, start_simulator
from konstruct.simulator_admin import SimulatorAdmin

KEY = "sk-sim-unit"


@pytest.fixture
async def server() -> AsyncIterator[SimulatorHandle]:
    config = SimulatorConfig(
        models={"m": ModelProfile(), "arith": ModelProfile(accuracy=1.0), "e": ModelProfile()}
    )
    handle = await start_simulator("127.0.0.1", 0, config, KEY)
    yield handle
    await handle.stop()


async def chat(handle: SimulatorHandle, model: str, text: str, key: str = KEY) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{handle.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": f"Bearer {key}"},
        )


async def test_chat_completion_has_the_openai_shape(server: SimulatorHandle) -> None:
    body = (await chat(server, "m", "hello there")).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


async def test_arithmetic_accuracy_is_honoured(server: SimulatorHandle) -> None:
    admin = SimulatorAdmin(server.url)
    right = [(await chat(server, "arith", f"What is {i} + 7?")).json() for i in range(20)]
    assert all(r["choices"][0]["message"]["content"] == str(i + 7) for i, r in enumerate(right))
    await admin.set_profile("arith", accuracy=0.0)
    wrong = [(await chat(server, "arith", f"What is {i} * 3?")).json() for i in range(20)]
    assert all(r["choices"][0]["message"]["content"] != str(i * 3) for i, r in enumerate(wrong))
    await admin.close()


async def test_rate_limit_answers_429_with_retry_after(server: SimulatorHandle) -> None:
    admin = SimulatorAdmin(server.url)
    await admin.set_profile("m", rate_limit_rps=1)
    statuses = [(await chat(server, "m", f"q{i}")) for i in range(3)]
    assert [r.status_code for r in statuses] == [200, 429, 429]
    assert int(statuses[1].headers["Retry-After"]) >= 1
    assert (await admin.model_stats("m"))["rate_limited"] == 2
    await admin.close()


async def test_faults_and_counters_change_at_run_time(server: SimulatorHandle) -> None:
    admin = SimulatorAdmin(server.url)
    await admin.set_profile("m", error_rate=1.0)
    assert (await chat(server, "m", "x")).status_code == 500
    await admin.set_profile("m", error_rate=0.0, outage=True)
    assert (await chat(server, "m", "x")).status_code == 503
    await admin.set_profile("m", outage=False)
    assert (await chat(server, "m", "x")).status_code == 200
    stats = await admin.model_stats("m")
    assert (stats["requests"], stats["errors"], stats["outage"], stats["ok"]) == (3, 1, 1, 1)
    by_content = await admin.requests_by_content("m")
    assert list(by_content["requests"].values()) == [3]
    assert list(by_content["ok_by_content"].values()) == [1]
    await admin.reset()
    assert (await admin.model_stats("m"))["requests"] == 0
    await admin.close()


async def test_auth_and_unknown_model(server: SimulatorHandle) -> None:
    assert (await chat(server, "m", "x", key="wrong")).status_code == 401
    response = await chat(server, "nope", "x")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


async def test_embeddings_are_deterministic_and_normalised(server: SimulatorHandle) -> None:
    async with httpx.AsyncClient() as http:

        async def embed(texts: list[str]) -> list[list[float]]:
            response = await http.post(
                f"{server.url}/v1/embeddings",
                json={"model": "e", "input": texts},
                headers={"Authorization": f"Bearer {KEY}"},
            )
            return [d["embedding"] for d in response.json()["data"]]

        first, again = (
            await embed(["sales forecast by store"]),
            await embed(["sales forecast by store"]),
        )
    assert first == again and len(first[0]) == 64
    assert abs(sum(v * v for v in first[0]) - 1) < 1e-9


async def test_reached_through_litellm_like_a_real_provider(server: SimulatorHandle) -> None:
    response = await litellm.acompletion(
        model="openai/arith",
        api_base=server.url + "/v1",
        api_key=KEY,
        messages=[{"role": "user", "content": "Answer with a number only: 12 + 30"}],
        num_retries=0,
        max_retries=0,
    )
    assert response.choices[0].message.content == "42"


async def test_a_429_reaches_litellm_callers_with_its_retry_after(server: SimulatorHandle) -> None:
    admin = SimulatorAdmin(server.url)
    await admin.set_profile("m", rate_limit_rps=0.25)
    await chat(server, "m", "take the only token")
    with pytest.raises(litellm.RateLimitError) as info:
        await litellm.acompletion(
            model="openai/m",
            api_base=server.url + "/v1",
            api_key=KEY,
            messages=[{"role": "user", "content": "again"}],
            num_retries=0,
            max_retries=0,
        )
    delay = retry_after_seconds(info.value)
    assert delay is not None and 1 <= delay <= 4.1
    await admin.close()
