"""Token streaming end to end: the simulator streams at its profile's pace (on its own
clock, so a frozen clock holds a stream after its first token), the worker publishes
each model step's text as it comes (PostgreSQL NOTIFY), the gateway and
`konstruct send --stream` show it at once, and a step run again after a kill -9
shows the client nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from temporalio.client import Client

from konstruct.agents.streaming import MAX_TEXT_PER_EVENT, StreamEvent, StreamView
from konstruct.config import Settings
from konstruct.platform.db import tenant_transaction
from konstruct.providers.simulator.admin import SimulatorAdmin
from tests.support import KONSTRUCT, ROOT, WorkerProcess, gateway_process
from tests.test_agent_tools import make_agent

pytestmark = pytest.mark.slow  # its file is scheduled first (tests/conftest.py)

# --- what a client is shown -----------------------------------------------------------


def shown_text(view: StreamView, *events: StreamEvent) -> str:
    return "".join(s.text for e in events for s in view.feed(e) if s.event is None)


def test_a_step_run_again_shows_only_what_the_client_has_not_seen() -> None:
    view = StreamView()
    first = [StreamEvent("w", "text", 0, "run1", t) for t in ("Hello", " there", " my")]
    assert shown_text(view, *first) == "Hello there my"
    # The worker died; the step runs again and writes the same text from the start.
    again = [StreamEvent("w", "text", 0, "run2", t) for t in ("Hello", " there", " my", " friend")]
    assert shown_text(view, *again) == " friend"
    assert view.finish("Hello there my friend", last_step=0) == []


def test_a_step_run_again_that_writes_otherwise_is_superseded_by_the_stored_reply() -> None:
    view = StreamView()
    assert shown_text(view, StreamEvent("w", "text", 0, "run1", "Hello there")) == "Hello there"
    # The new run disagrees: nothing more of its live text is shown...
    assert shown_text(view, StreamEvent("w", "text", 0, "run2", "Goodbye now")) == ""
    # ...and the end says what was superseded, then gives the stored reply whole.
    end = view.finish("Goodbye now", last_step=0)
    assert end[0].event == {"type": "step_restarted", "step": 0, "superseded_chars": 11}
    assert end[1].text == "Goodbye now"


def test_missed_events_are_completed_from_the_stored_reply() -> None:
    view = StreamView()
    assert shown_text(view, StreamEvent("w", "text", 1, "r", "The answer")) == "The answer"
    [rest] = view.finish("The answer is 42.", last_step=1)
    assert rest.text == " is 42."
    # Text of an earlier step (beside its tool calls) is not the reply's.
    assert StreamView().finish("Only this", last_step=2)[0].text == "Only this"


def test_tool_calls_are_shown_as_konstruct_events() -> None:
    view = StreamView()
    started = StreamEvent("w", "tool", 0, call_id="c1", tool="calculator", status="started")
    ended = StreamEvent("w", "tool", 0, call_id="c1", tool="calculator", status="ok")
    assert [s.event for s in view.feed(started) + view.feed(ended)] == [
        {"type": "tool_call.started", "step": 0, "call_id": "c1", "tool": "calculator"},
        {
            "type": "tool_call.ended",
            "step": 0,
            "call_id": "c1",
            "tool": "calculator",
            "status": "ok",
        },
    ]


def test_an_event_fits_a_notify_payload_and_reads_back() -> None:
    widest = StreamEvent("msg-demo-x", "text", 3, "r1", "\U0001f600" * MAX_TEXT_PER_EVENT)
    payload = widest.encode()
    assert len(payload.encode()) < 8000  # PostgreSQL's limit for a NOTIFY payload
    assert StreamEvent.decode(payload) == widest
    assert StreamEvent.decode("w\nnot json") is None


# --- through the gateway, the official openai client ---------------------------------


async def content_chunks(
    stream: openai.AsyncStream[ChatCompletionChunk],
) -> AsyncIterator[str | None]:
    """Each chunk's text as it comes (None for a chunk without text)."""
    async for chunk in stream:
        yield (chunk.choices[0].delta.content or None) if chunk.choices else None


async def next_text(chunks: AsyncIterator[str | None]) -> str | None:
    """The next piece of text (None: the stream ended), waiting at most 120 s."""

    async def read() -> str | None:
        async for piece in chunks:
            if piece:
                return piece
        return None

    return await asyncio.wait_for(read(), 120)


async def stored_reply(app_pool: asyncpg.Pool, tenant: str) -> str:
    async with tenant_transaction(app_pool, tenant) as conn:
        return str(await conn.fetchval("select reply_text from message_turns"))


async def hold_each_token(sim: SimulatorAdmin) -> None:
    """Frozen, the simulator's clock holds a stream after each token until the test
    moves it on by the delay between tokens: a token the client has seen was sent
    before the next one was made."""
    await sim.freeze_clock()
    await sim.set_profile("sim-fast", inter_token_ms=1000)


async def token_by_token(sim: SimulatorAdmin, pieces: AsyncIterator[str | None]) -> list[str]:
    """The stream's text pieces, read one token at a time: the first, then after each
    move of the held clock the next, until the stream ends."""
    seen = [await next_text(pieces)]
    while seen[-1] is not None:
        await sim.advance_clock(1.0)  # lets exactly one more token go
        seen.append(await next_text(pieces))
    return [piece for piece in seen if piece is not None]


async def response_deltas(stream: Any, final: list[str]) -> AsyncIterator[str | None]:
    """A Responses API stream's text deltas as they come; its completed text into `final`."""
    async for event in stream:
        if event.type == "response.output_text.delta":
            yield event.delta
        elif event.type == "response.completed":
            final.append(event.response.output_text)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_the_openai_client_gets_each_token_before_the_next_is_made(
    client: Client,
    settings: Settings,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    talker_tenant: tuple[str, str],
    api: str,
) -> None:
    tenant, key = talker_tenant
    await hold_each_token(sim)
    final: list[str] = []
    async with gateway_process(client, settings) as (url, _gateway):
        oc = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        text = "please stream these seven words back"
        if api == "chat":
            chat = await oc.chat.completions.create(
                model=f"{tenant}/talker", messages=[{"role": "user", "content": text}], stream=True
            )
            pieces = await token_by_token(sim, content_chunks(chat))
        else:
            events = await oc.responses.create(model=f"{tenant}/talker", input=text, stream=True)
            pieces = await token_by_token(sim, response_deltas(events, final))
    reply = await stored_reply(app_pool, tenant)
    assert "".join(pieces) == reply
    assert final in ([], [reply])  # the Responses API's completed text is the reply
    # One piece per token, each shown while the next was still held back.
    assert len(pieces) == len(reply.split()) >= 5, pieces


async def test_tool_calls_appear_in_the_stream_as_they_start_and_end(
    client: Client, settings: Settings, app_pool: asyncpg.Pool, talker_tenant: tuple[str, str]
) -> None:
    tenant, key = talker_tenant
    await make_agent(app_pool, tenant, ["calculator"])  # `helper`, with the calculator
    async with gateway_process(client, settings) as (url, _gateway):
        oc = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        stream = await oc.chat.completions.create(
            model=f"{tenant}/helper",
            messages=[{"role": "user", "content": '/tool calculator {"expression": "6*7"}'}],
            stream=True,
        )
        raw = [chunk async for chunk in stream]
    events = [
        c.model_extra["konstruct"] for c in raw if c.model_extra and "konstruct" in c.model_extra
    ]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["tool_call.started", "tool_call.ended"], events
    assert events[0]["tool"] == "calculator" and events[1]["status"] == "ok"
    assert kinds[-1] == "outcome" and events[-1]["degraded"] is False
    text = "".join(c.choices[0].delta.content or "" for c in raw if c.choices)
    assert text == await stored_reply(app_pool, tenant)
    assert "42" in text


async def test_a_worker_killed_mid_stream_shows_the_client_no_text_twice(
    client: Client,
    settings: Settings,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    talker_tenant: tuple[str, str],
    task_queue: str,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    tenant, key = talker_tenant
    await hold_each_token(sim)
    doomed = worker_process("a")
    async with gateway_process(client, settings, task_queue) as (url, _gateway):
        oc = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        stream = await oc.chat.completions.create(
            model=f"{tenant}/talker",
            messages=[{"role": "user", "content": "a doomed worker streams this long answer"}],
            stream=True,
        )
        chunks = content_chunks(stream)
        seen = [await next_text(chunks)]
        for _ in range(2):
            await sim.advance_clock(1.0)
            seen.append(await next_text(chunks))
        requests = (await sim.model_stats("sim-fast"))["requests"]
        doomed.kill()
        # The next worker runs the step again once the dead one's task times out: it
        # streams the same answer from its first token, which the client already has.
        worker_process("b")
        for _ in range(1200):
            if (await sim.model_stats("sim-fast"))["requests"] > requests:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the step never ran again")
        # Let the rest go at once: no delay between tokens, and the held one released.
        await sim.set_profile("sim-fast", inter_token_ms=0)
        await sim.advance_clock(1.0)
        while seen[-1] is not None:
            seen.append(await next_text(chunks))
    reply = await stored_reply(app_pool, tenant)
    shown = "".join(p for p in seen if p is not None)
    assert shown == reply, (seen, reply)
    assert len(seen) > 4  # three tokens before the kill, the rest after it


async def test_konstruct_send_stream_prints_each_token_as_it_comes(
    environ: dict[str, str],
    worker: str,
    sim: SimulatorAdmin,
    app_pool: asyncpg.Pool,
    talker_tenant: tuple[str, str],
) -> None:
    tenant, _key = talker_tenant
    env = dict(environ, KONSTRUCT_TASK_QUEUE=worker)
    await hold_each_token(sim)
    process = await asyncio.create_subprocess_exec(
        *KONSTRUCT,
        "send",
        tenant,
        "talker",
        "print me token by token",
        "--stream",
        cwd=str(ROOT),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    # The first token is printed while the clock holds the second back.
    first = await asyncio.wait_for(process.stdout.read(1), 120)
    assert first and process.returncode is None
    await sim.real_clock()
    await sim.set_profile("sim-fast", inter_token_ms=0)
    await sim.advance_clock(1.0)
    rest, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert (first + rest).decode() == await stored_reply(app_pool, tenant) + "\n"
