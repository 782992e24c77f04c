"""HandleMessage end-to-end latency and throughput against a direct litellm call.

Starts its own dev stack exactly as `konstruct up` does (persistent dev-server
state file, embedded PostgreSQL, simulator at 0 latency, one worker process,
the HTTP gateway) on free ports, then at each concurrency measures, in the same run:
  - direct: `litellm.acompletion` to the simulator (the floor: provider + client),
  - cli: `HandleMessage` started as `konstruct send` starts it (no eager start;
    the stack's worker process runs it),
  - gateway: the official `openai` client against `konstruct gateway` (eager
    start in the gateway's own worker),
  - gateway_tool: the same, a message that makes one `calculator` call,
  - noop / noop_eager: the engine's floor, a workflow that does nothing, started
    from this process (an in-process worker), without and with eager start.
The orchestration overhead of a path is its percentile minus direct's.

Then, streamed (the simulator's `sim-fast` paced at STREAM_TTFT_MS to its first
token and STREAM_INTER_TOKEN_MS between tokens):
  - time to first token at concurrency 1: `litellm.acompletion(stream=True)` to the
    simulator (direct_stream) against the openai client's `stream=True` through the
    gateway (gateway_stream); the gateway's extra is the difference;
  - messages a second at concurrency 32 through the gateway, streamed against not.

    .venv/bin/python bench/messages.py            # writes bench/results/messages.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio import workflow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack_bench import running_stack, write_results  # noqa: E402
from konstruct.app.stack import Stack  # noqa: E402
from konstruct.config import load_settings  # noqa: E402
from konstruct.platform.temporal.client import connect  # noqa: E402
from konstruct.providers.adapter import load_litellm  # noqa: E402

MODELS = ("sim-fast", "sim-quality")
RESULTS = ROOT / "bench" / "results" / "messages.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(
    call: Callable[[int], Awaitable[float | None]], total: int, concurrency: int
) -> dict[str, float]:
    """Latency percentiles and throughput of `call`; for a call that returns when its
    first token came (perf_counter seconds), time-to-first-token percentiles too."""
    latencies: list[float] = []
    first_tokens: list[float] = []
    counter = iter(range(total))

    async def lane() -> None:
        for i in counter:
            started = time.perf_counter()
            first = await call(i)
            latencies.append((time.perf_counter() - started) * 1000)
            if first is not None:
                first_tokens.append((first - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "n": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies),
        "per_second": len(latencies) / elapsed,
        **(
            {
                "ttft_p50_ms": percentile(first_tokens, 50),
                "ttft_p99_ms": percentile(first_tokens, 99),
            }
            if first_tokens
            else {}
        ),
    }


@workflow.defn(name="BenchNoOp", sandboxed=False)
class NoOp:
    @workflow.run
    async def run(self, _value: int) -> int:
        return 0


async def run_bench(
    config: Path, levels: list[tuple[int, int]], stream_levels: tuple[int, int], stack: Stack
) -> dict:
    litellm = load_litellm()
    import openai
    from temporalio.worker import Worker

    from konstruct.agents.models import AgentProfile
    from konstruct.agents.store.agents import put_agent
    from konstruct.agents.store.keys import create_key
    from konstruct.platform import db
    from konstruct.platform.temporal.search_attributes import message_search_attributes
    from workflows.handle_message import HandleMessage

    settings = load_settings(config)
    client = await connect(settings)
    api_key = os.environ[settings.simulator.api_key_env]
    system = "You are Kay, a helpful assistant. You are an AI."
    pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=2)
    async with db.tenant_transaction(pool, "demo") as conn:
        await put_agent(
            conn,
            "demo",
            AgentProfile(
                agent_id="calc",
                name="Cal",
                role="an assistant that uses a calculator",
                fallback_reply="Sorry.",
                tools=["calculator"],
            ),
        )
        _, gateway_key = await create_key(conn, "demo", "bench")
    await pool.close()
    assert stack.gateway_url is not None
    gateway = openai.AsyncOpenAI(base_url=stack.gateway_url, api_key=gateway_key, max_retries=0)

    direct = direct_call(litellm, stack, api_key, system, stream=False)

    run_id = uuid.uuid4().hex[:6]

    async def cli(i: int) -> None:
        message_id = f"bench-{run_id}-{i}-{uuid.uuid4().hex[:6]}"
        await client.execute_workflow(
            HandleMessage.run,
            {
                "message_id": message_id,
                "tenant_id": "demo",
                "agent_id": "assistant",
                "thread_id": f"bench-{message_id}",
                "channel": "bench",
                "sender": "bench",
                "text": f"hi {i}",
            },
            id=f"msg-demo-{message_id}",
            task_queue=settings.temporal.task_queue,
            search_attributes=message_search_attributes("demo"),
        )

    async def via_gateway(i: int) -> None:
        answer = await gateway.chat.completions.create(
            model="demo/assistant", messages=[{"role": "user", "content": f"hi {i}"}]
        )
        assert answer.choices[0].message.content

    async def via_gateway_tool(i: int) -> None:
        answer = await gateway.chat.completions.create(
            model="demo/calc", messages=[{"role": "user", "content": f"What is {i} * 7?"}]
        )
        assert answer.choices[0].message.content == f"The answer is {i * 7}."

    noop_queue = f"bench-noop-{run_id}"

    def noop(eager: bool) -> Callable[[int], Awaitable[float | None]]:
        async def start(i: int) -> None:
            handle = await client.start_workflow(
                NoOp.run,
                i,
                id=f"bench-noop-{run_id}-{eager}-{i}-{uuid.uuid4().hex[:6]}",
                task_queue=noop_queue,
                request_eager_start=eager,
            )
            await handle.result()

        return start

    paths: dict[str, Callable[[int], Awaitable[float | None]]] = {
        "direct": direct,
        "cli": cli,
        "gateway": via_gateway,
        "gateway_tool": via_gateway_tool,
        "noop": noop(False),
        "noop_eager": noop(True),
    }
    rows = []
    async with Worker(client, task_queue=noop_queue, workflows=[NoOp]):
        # Warm every path (imports, connection pools, workflow caches).
        for call in paths.values():
            await measure(call, 20, 4)
        for concurrency, total in levels:
            row: dict[str, Any] = {"concurrency": concurrency}
            for name, call in paths.items():
                row[name] = await measure(call, total, concurrency)
            base = row["direct"]
            for name in paths:
                if name != "direct":
                    row[name]["overhead_p50_ms"] = row[name]["p50_ms"] - base["p50_ms"]
                    row[name]["overhead_p99_ms"] = row[name]["p99_ms"] - base["p99_ms"]
                    row[name]["ratio_to_direct"] = row[name]["per_second"] / base["per_second"]
            row["gateway_vs_cli_per_second"] = (
                row["gateway"]["per_second"] / row["cli"]["per_second"]
            )
            rows.append(row)
        streamed = await measure_streaming(
            stack, gateway, direct_call(litellm, stack, api_key, system, stream=True), stream_levels
        )
    await gateway.close()
    return {
        "rows": rows,
        "streaming": streamed,
        "dev_server_state": "file (--db-filename, sqlite journal_mode=wal, synchronous=normal)",
        "workers": "one worker process (cli path) + the gateway's in-process worker",
        "cpus": os.cpu_count(),
    }


PATHS = ("direct", "cli", "gateway", "gateway_tool", "noop", "noop_eager")
# The streamed model's pace: a first token after a realistic wait, then tokens
# about as fast as a fast hosted model writes them.
STREAM_TTFT_MS = 150
STREAM_INTER_TOKEN_MS = 10


def direct_call(
    litellm: Any, stack: Stack, api_key: str, system: str, stream: bool
) -> Callable[[int], Awaitable[float | None]]:
    """`litellm.acompletion` straight to the simulator; streamed, it returns when
    the first token came."""

    async def direct(i: int) -> float | None:
        answer = await litellm.acompletion(
            model="openai/sim-fast",
            api_base=stack.simulator_url,
            api_key=api_key,
            messages=[
                {"role": "system", "content": system},
                {
                    "role": "user",
                    "content": f"stream a few words back {i}" if stream else f"hi {i}",
                },
            ],
            max_retries=0,
            stream=stream,
        )
        if not stream:
            return None
        first = None
        async for chunk in answer:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        return first

    return direct


async def measure_streaming(
    stack: Stack,
    gateway: Any,
    direct_stream: Callable[[int], Awaitable[float | None]],
    levels: tuple[int, int],
) -> dict[str, Any]:
    """Time to first token at concurrency 1 and messages a second at 32, streamed
    through the gateway against the direct stream and the gateway unstreamed."""
    from konstruct.providers.simulator.admin import SimulatorAdmin

    assert stack.simulator_url is not None
    admin = SimulatorAdmin(stack.simulator_url.removesuffix("/v1"))
    await admin.set_profile(
        "sim-fast", ttft_ms=STREAM_TTFT_MS, inter_token_ms=STREAM_INTER_TOKEN_MS
    )

    def via_gateway(stream: bool) -> Callable[[int], Awaitable[float | None]]:
        async def call(i: int) -> float | None:
            messages = [{"role": "user", "content": f"stream a few words back {i}"}]
            if not stream:
                answer = await gateway.chat.completions.create(
                    model="demo/assistant", messages=messages
                )
                assert answer.choices[0].message.content
                return None
            first = None
            chunks = await gateway.chat.completions.create(
                model="demo/assistant", messages=messages, stream=True
            )
            async for chunk in chunks:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
            assert first is not None
            return first

        return call

    first_n, busy_n = levels
    try:
        for call in (direct_stream, via_gateway(True), via_gateway(False)):
            await measure(call, 10, 4)  # warm
        one = {
            "direct_stream": await measure(direct_stream, first_n, 1),
            "gateway_stream": await measure(via_gateway(True), first_n, 1),
        }
        busy = {
            "gateway": await measure(via_gateway(False), busy_n, 32),
            "gateway_stream": await measure(via_gateway(True), busy_n, 32),
        }
    finally:
        await admin.set_profile("sim-fast", ttft_ms=0, inter_token_ms=0)
        await admin.close()
    return {
        "model_pace_ms": {"ttft": STREAM_TTFT_MS, "inter_token": STREAM_INTER_TOKEN_MS},
        "concurrency_1": one,
        "ttft_extra_p50_ms": one["gateway_stream"]["ttft_p50_ms"]
        - one["direct_stream"]["ttft_p50_ms"],
        "ttft_extra_p99_ms": one["gateway_stream"]["ttft_p99_ms"]
        - one["direct_stream"]["ttft_p99_ms"],
        "concurrency_32": busy,
        "stream_vs_plain_per_second": busy["gateway_stream"]["per_second"]
        / busy["gateway"]["per_second"],
    }


def print_table(result: dict) -> None:
    print(
        f"{'conc':>4} | {'path':<12} | {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} | "
        f"{'overhead p50/p99 ms':>19} | {'per s':>7}"
    )
    for row in result["rows"]:
        for name in PATHS:
            m = row[name]
            overhead = (
                f"{m['overhead_p50_ms']:8.1f} {m['overhead_p99_ms']:9.1f}"
                if "overhead_p50_ms" in m
                else f"{'':>19}"
            )
            print(
                f"{row['concurrency']:>4} | {name:<12} | {m['p50_ms']:7.1f} {m['p95_ms']:7.1f} "
                f"{m['p99_ms']:7.1f} | {overhead} | {m['per_second']:7.1f}"
            )
        print(f"     gateway / cli messages per second: {row['gateway_vs_cli_per_second']:.2f}")
    streamed = result.get("streaming")
    if streamed:
        one, busy = streamed["concurrency_1"], streamed["concurrency_32"]
        pace = streamed["model_pace_ms"]
        print(
            f"streamed (model: first token {pace['ttft']} ms, then one per"
            f" {pace['inter_token']} ms)"
        )
        for name in ("direct_stream", "gateway_stream"):
            m = one[name]
            print(
                f"   1 | {name:<14} | first token p50 {m['ttft_p50_ms']:6.1f} ms,"
                f" p99 {m['ttft_p99_ms']:6.1f} ms | whole reply p50 {m['p50_ms']:6.1f} ms"
            )
        print(
            f"     gateway's extra to the first token: p50 {streamed['ttft_extra_p50_ms']:.1f} ms,"
            f" p99 {streamed['ttft_extra_p99_ms']:.1f} ms"
        )
        for name in ("gateway", "gateway_stream"):
            m = busy[name]
            print(
                f"  32 | {name:<14} | {m['per_second']:7.1f} messages/s, p50 {m['p50_ms']:.1f} ms"
            )
        print(
            f"     streamed / not, messages per second: {streamed['stream_vs_plain_per_second']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages per level")
    args = parser.parse_args()
    levels = [(1, 100), (8, 300), (32, 600)] if not args.quick else [(1, 20), (8, 40), (32, 64)]
    stream_levels = (200, 600) if not args.quick else (30, 96)
    with running_stack("konstruct-bench-", MODELS, gateway=True) as (config, stack):
        result = asyncio.run(run_bench(config, levels, stream_levels, stack))
    print_table(result)
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
