"""Limits that change while Konstruct is idle or paused: does the flow follow the provider?

Scenarios of `bench/experiments.py --scenario` (issue 22, goal 1), each on the
bench's own stack (one worker process, the simulator's token bucket):

  idle-raise  an experiment learns a limit of L = H/5 req/s; the stack idles
              `--gap-s`; the provider's limit is raised to H; a second
              experiment runs. Baselines in the same run: the same second
              experiment from a fresh provider (cold), and the naive runner.
  idle-drop   learned at H, idle, the limit lowered to L, a second experiment.
  pause       an experiment at L is stopped, the limit raised to H while it is
              stopped, and resumed after `--gap-s`.

For each: seconds from the start (or the resume) to the first two seconds at
or above 0.9 of the current limit (`to_0.9_s`; a drop: to the first second at
or under it), the throughput over the run as a fraction of the limit, and the
429 share, from the experiment's result rows and the simulator's counters.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.experiments import Bench

SCENARIOS = ("idle-raise", "idle-drop", "pause")


def per_second(times: list[float], start: float, end: float) -> list[int]:
    counts = Counter(int(t - start) for t in times if start <= t < end)
    return [counts.get(i, 0) for i in range(int(end - start) + 1)]


def seconds_to_reach(series: list[int], limit: float) -> int | None:
    """The end of the first two whole seconds at or above 0.9 of `limit`."""
    for i in range(len(series) - 1):
        if min(series[i : i + 2]) >= 0.9 * limit:
            return i + 2
    return None


def seconds_to_fall(series: list[int], limit: float) -> int | None:
    """The end of the first whole second at or under `limit` (after the first)."""
    for i in range(1, len(series)):
        if series[i] <= limit:
            return i + 1
    return None


async def _run(bench: Bench, n: int, prefix: str) -> tuple[Any, list[float], float, float]:
    """One experiment to its end: handle, result times, start, end."""
    started = time.time()
    handle = await bench.start_experiment(n, prefix)
    await handle.result()
    return handle, await bench.completions(handle.id), started, time.time()


async def _measured(
    bench: Bench, n: int, prefix: str, limit: float, falling: bool = False
) -> dict[str, Any]:
    """A second experiment after the change, with the simulator's counters reset."""
    await bench.sim.reset()
    _, times, started, ended = await _run(bench, n, prefix)
    requests, limited = await bench.sim_counts()
    series = per_second(times, started, ended)
    reach = seconds_to_fall(series, limit) if falling else seconds_to_reach(series, limit)
    timeline = (await bench.sim.timeline("sim-fast"))["rate_limited"]
    return {
        "items": n,
        "limit_rps": limit,
        "total_s": round(ended - started, 1),
        "fraction_of_limit": round(n / (ended - started) / limit, 3),
        "to_0.9_s" if not falling else "to_under_s": reach,
        "share_429": round(limited / requests, 4) if requests else 0.0,
        "share_429_first_2s": round(sum(timeline[:2]) / max(1, requests), 4),
        "ok_per_second": series[:30],
    }


async def _after_idle(
    bench: Bench, scenario: str, learned: float, now: float, gap_s: float
) -> dict[str, Any]:
    """An experiment learns a limit of `learned`, the stack idles `gap_s`, the limit
    becomes `now`, and a second experiment runs; then, as baselines, the same
    second experiment from a fresh provider and the naive runner."""
    n = round(now * 20)
    await bench.fresh(learned)
    await _run(bench, round(learned * 8), "learn")
    await asyncio.sleep(gap_s)
    await bench.sim.set_profile("sim-fast", rate_limit_rps=now)
    after = await _measured(bench, n, "after", now, falling=now < learned)
    await bench.fresh(now)
    cold = await _measured(bench, n, "cold", now)
    naive = await bench.naive(n, now)
    return {"scenario": scenario, "gap_s": gap_s, "after": after, "cold": cold, "naive": naive}


async def idle_raise(bench: Bench, high: float, gap_s: float) -> dict[str, Any]:
    return await _after_idle(bench, "idle-raise", high / 5, high, gap_s)


async def idle_drop(bench: Bench, high: float, gap_s: float) -> dict[str, Any]:
    return await _after_idle(bench, "idle-drop", high, high / 5, gap_s)


async def pause(bench: Bench, high: float, gap_s: float) -> dict[str, Any]:
    from workflows.experiment import Experiment

    low = high / 5
    await bench.fresh(low)
    n = round(low * 5 + high * 20)
    handle = await bench.start_experiment(n, "paused")

    async def until(condition: Any) -> None:
        for _ in range(3000):  # polled every 0.2 s, 10 minutes at most
            if await condition():
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the experiment never got there")

    async def learned() -> bool:
        return len(await bench.completions(handle.id)) >= low * 4

    async def stopped() -> bool:
        return (await handle.query(Experiment.progress)).status == "stopped"

    await until(learned)
    await handle.signal(Experiment.stop)
    await until(stopped)
    await bench.sim.set_profile("sim-fast", rate_limit_rps=high)
    await asyncio.sleep(gap_s)
    await bench.sim.reset()
    resumed = time.time()
    before = len(await bench.completions(handle.id))
    await handle.signal(Experiment.resume)
    await handle.result()
    ended = time.time()
    times = [t for t in await bench.completions(handle.id) if t >= resumed]
    requests, limited = await bench.sim_counts()
    series = per_second(times, resumed, ended)
    return {
        "scenario": "pause",
        "gap_s": gap_s,
        "after": {
            "items": n - before,
            "limit_rps": high,
            "total_s": round(ended - resumed, 1),
            "fraction_of_limit": round((n - before) / (ended - resumed) / high, 3),
            "to_0.9_s": seconds_to_reach(series, high),
            "share_429": round(limited / requests, 4) if requests else 0.0,
            "ok_per_second": series[:30],
        },
    }


async def run_scenarios(names: list[str], bench: Bench, high: float, gap_s: float) -> list[Any]:
    runs = {"idle-raise": idle_raise, "idle-drop": idle_drop, "pause": pause}
    out = []
    for name in names:
        row = await runs[name](bench, high, gap_s)
        print(row, flush=True)
        out.append(row)
    return out


def print_scenarios(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| scenario | gap | limit after | to 0.9 (drop: under) | Konstruct / limit | 429 share"
        " | cold Konstruct / limit | naive / limit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        a = row["after"]
        reach = a.get("to_0.9_s", a.get("to_under_s"))
        cold = row.get("cold", {}).get("fraction_of_limit", "")
        naive = row.get("naive", {}).get("fraction_of_ceiling", "")
        print(
            f"| {row['scenario']} | {row['gap_s']:g} s | {a['limit_rps']:g} | {reach} s |"
            f" {a['fraction_of_limit']:.3f} | {a['share_429'] * 100:.1f} % | {cold} | {naive} |"
        )
