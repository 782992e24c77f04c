"""DemoCascade wall time per step and in total, and how much of it is orchestration.

Starts its own dev stack exactly as `konstruct up` does (dev server with its
state file, embedded PostgreSQL, the simulator at 0 latency, one worker
process) on free ports, then runs `demo_minimal` and `showcase_rich` several
times each and reports, from the same runs:
  - wall: from `start_workflow` to the result, as the client sees it;
  - per step: the step's duration as the workflow saw it, and `work`, the time
    its activities spent inside their own code (SQL, model fitting, provider
    calls), as they measured it themselves;
  - orchestration = wall - work: workflow tasks, local-activity and child
    workflow scheduling, history writes, the client's round trips. The
    workflow-task count and their schedule-to-start latency come from history.

    .venv/bin/python bench/demo.py            # writes bench/results/demo.json
    .venv/bin/python bench/demo.py --runs 1   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack_bench import running_stack, write_results  # noqa: E402
from konstruct.config import load_settings  # noqa: E402
from konstruct.platform.temporal.client import connect  # noqa: E402

MODELS = ("sim-fast", "sim-quality", "sim-judge", "sim-arith", "sim-embed")
RESULTS = ROOT / "bench" / "results" / "demo.json"
SCENARIOS = ("demo_minimal", "showcase_rich")
TARGET_S = {"demo_minimal": 15.0, "showcase_rich": 60.0}


def _seconds(timestamp: Any) -> float:
    return float(timestamp.seconds) + timestamp.nanos / 1e9


def workflow_task_stats(history: Any) -> dict[str, float]:
    """Workflow tasks of a history: how many, and how long each waited to be picked up."""
    scheduled: dict[int, float] = {}
    waits: list[float] = []
    tasks = 0
    for event in history.events:
        if event.HasField("workflow_task_scheduled_event_attributes"):
            scheduled[event.event_id] = _seconds(event.event_time)
        elif event.HasField("workflow_task_started_event_attributes"):
            tasks += 1
            attrs = event.workflow_task_started_event_attributes
            if attrs.scheduled_event_id in scheduled:
                waits.append(_seconds(event.event_time) - scheduled[attrs.scheduled_event_id])
    return {
        "workflow_tasks": tasks,
        "history_events": len(history.events),
        "task_wait_ms": sum(waits) * 1000,
    }


async def run_once(client: Any, task_queue: str, scenario: str) -> dict[str, Any]:
    from workflows.demo_cascade import DemoCascade

    workflow_id = f"bench-demo-{scenario}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    handle = await client.start_workflow(
        DemoCascade.run,
        {"scenario": scenario, "seed": 42, "approval": "auto", "fail_at": None},
        id=workflow_id,
        task_queue=task_queue,
    )
    result = await handle.result()
    wall_ms = (time.perf_counter() - started) * 1000
    if result.overall_status != "pass":
        raise RuntimeError(f"{workflow_id} did not pass: {result}")
    history = await handle.fetch_history()
    children = {}
    for event in history.events:
        if event.HasField("start_child_workflow_execution_initiated_event_attributes"):
            attrs = event.start_child_workflow_execution_initiated_event_attributes
            child = client.get_workflow_handle(attrs.workflow_id)
            children[attrs.workflow_type.name] = workflow_task_stats(await child.fetch_history())
    work_ms = sum(s.work_ms for s in result.steps)
    return {
        "workflow_id": workflow_id,
        "wall_ms": wall_ms,
        "work_ms": work_ms,
        "orchestration_ms": wall_ms - work_ms,
        "steps": [
            {"name": s.name, "duration_ms": s.duration_ms, "work_ms": s.work_ms}
            for s in result.steps
        ],
        "history": workflow_task_stats(history),
        "children": children,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    names = [s["name"] for s in runs[0]["steps"]]
    steps = []
    for i, name in enumerate(names):
        duration = med([r["steps"][i]["duration_ms"] for r in runs])
        work = med([r["steps"][i]["work_ms"] for r in runs])
        steps.append(
            {"name": name, "duration_ms": duration, "work_ms": work, "other_ms": duration - work}
        )
    wall = med([r["wall_ms"] for r in runs])
    work = med([r["work_ms"] for r in runs])
    return {
        "runs": len(runs),
        "wall_ms": wall,
        "wall_ms_all": [r["wall_ms"] for r in runs],
        "work_ms": work,
        "orchestration_ms": wall - work,
        "orchestration_share": (wall - work) / wall,
        "workflow_tasks": med([r["history"]["workflow_tasks"] for r in runs]),
        "history_events": med([r["history"]["history_events"] for r in runs]),
        "task_wait_ms": med([r["history"]["task_wait_ms"] for r in runs]),
        "steps": steps,
        "detail": runs,
    }


async def run_bench(config: Path, runs: int) -> dict[str, Any]:
    settings = load_settings(config)
    client = await connect(settings)
    task_queue = settings.temporal.task_queue
    await run_once(client, task_queue, "demo_minimal")  # warm up imports, pools, caches
    result: dict[str, Any] = {"cpus": os.cpu_count(), "scenarios": {}}
    for scenario in SCENARIOS:
        result["scenarios"][scenario] = summarise(
            [await run_once(client, task_queue, scenario) for _ in range(runs)]
        )
    return result


def print_table(result: dict[str, Any]) -> None:
    for scenario, s in result["scenarios"].items():
        print(
            f"\n{scenario}: wall {s['wall_ms'] / 1000:.2f} s (median of {s['runs']};"
            f" target <= {TARGET_S[scenario]:.0f} s), work {s['work_ms']:.0f} ms,"
            f" orchestration {s['orchestration_ms']:.0f} ms"
            f" ({s['orchestration_share'] * 100:.0f} %),"
            f" {s['workflow_tasks']:.0f} workflow tasks, {s['history_events']:.0f} events"
        )
        print(f"  {'step':<28} {'wall ms':>8} {'work ms':>8} {'other ms':>9}")
        for step in s["steps"]:
            print(
                f"  {step['name']:<28} {step['duration_ms']:>8.1f} {step['work_ms']:>8.1f}"
                f" {step['other_ms']:>9.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median)")
    args = parser.parse_args()
    with running_stack("konstruct-bench-demo-", MODELS) as (config, stack):
        result = asyncio.run(run_bench(config, args.runs))
    print_table(result)
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
