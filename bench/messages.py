"""HandleMessage end-to-end latency and throughput against a direct litellm call.

Starts its own dev stack exactly as `konstruct up` does (persistent dev-server
state file, embedded PostgreSQL, simulator at 0 latency, one worker process) on
free ports, then at each concurrency measures, in the same run:
  - direct: `litellm.acompletion` to the simulator (the floor: provider + client),
  - workflow: `HandleMessage` through Temporal (load agent, LLM call, store turn).
The orchestration overhead is the difference of the two, percentile by percentile.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack_bench import running_stack, write_results  # noqa: E402
from konstruct.config import load_settings  # noqa: E402
from konstruct.stack import Stack  # noqa: E402
from konstruct.temporal_client import connect  # noqa: E402

MODELS = ("sim-fast", "sim-quality")
RESULTS = ROOT / "bench" / "results" / "messages.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(
    call: Callable[[int], Awaitable[None]], total: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def lane() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - started) * 1000)

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
    }


async def run_bench(config: Path, levels: list[tuple[int, int]], stack: Stack) -> dict:
    import litellm

    from workflows.handle_message import HandleMessage

    settings = load_settings(config)
    client = await connect(settings)
    api_key = os.environ[settings.simulator.api_key_env]
    system = "You are Kay, a helpful assistant. You are an AI."

    async def direct(i: int) -> None:
        await litellm.acompletion(
            model="openai/sim-fast",
            api_base=stack.simulator_url,
            api_key=api_key,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": f"hi {i}"},
            ],
            max_retries=0,
        )

    run_id = uuid.uuid4().hex[:6]

    async def workflow(i: int) -> None:
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
        )

    # Warm both paths (imports, connection pools, workflow cache).
    await measure(direct, 20, 4)
    await measure(workflow, 20, 4)
    rows = []
    for concurrency, total in levels:
        base = await measure(direct, total, concurrency)
        flow = await measure(workflow, total, concurrency)
        rows.append(
            {
                "concurrency": concurrency,
                "direct": base,
                "workflow": flow,
                "overhead_p50_ms": flow["p50_ms"] - base["p50_ms"],
                "overhead_p95_ms": flow["p95_ms"] - base["p95_ms"],
                "overhead_p99_ms": flow["p99_ms"] - base["p99_ms"],
                "throughput_ratio": flow["per_second"] / base["per_second"],
            }
        )
    return {
        "rows": rows,
        "dev_server_state": "file (--db-filename, sqlite journal_mode=wal, synchronous=normal)",
        "cpus": os.cpu_count(),
    }


def print_table(result: dict) -> None:
    print(
        f"{'conc':>4} | {'direct p50/p95/p99 ms':>22} | {'workflow p50/p95/p99 ms':>24} | "
        f"{'overhead p50/p99 ms':>19} | {'direct/s':>8} | {'workflow/s':>10} | ratio"
    )
    for row in result["rows"]:
        d, w = row["direct"], row["workflow"]
        print(
            f"{row['concurrency']:>4} | {d['p50_ms']:6.1f} {d['p95_ms']:6.1f} {d['p99_ms']:7.1f}  | "
            f"{w['p50_ms']:7.1f} {w['p95_ms']:7.1f} {w['p99_ms']:7.1f} | "
            f"{row['overhead_p50_ms']:8.1f} {row['overhead_p99_ms']:9.1f} | "
            f"{d['per_second']:8.1f} | {w['per_second']:10.1f} | {row['throughput_ratio']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages per level")
    args = parser.parse_args()
    levels = [(1, 100), (8, 300), (32, 600)] if not args.quick else [(1, 20), (8, 40), (32, 64)]
    with running_stack("konstruct-bench-", MODELS) as (config, stack):
        result = asyncio.run(run_bench(config, levels, stack))
    print_table(result)
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
