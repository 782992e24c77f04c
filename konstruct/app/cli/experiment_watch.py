"""`konstruct experiments watch`: an experiment's progress followed live, then its summary."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import TYPE_CHECKING

import click
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

from konstruct.app.cli.common import CliState, pass_state, run_async, temporal_client, tenant_option
from konstruct.app.cli.experiment_ids import experiment_argument, experiment_workflow_id
from konstruct.app.cli.output import LiveView, print_table
from konstruct.experiments.models import (
    ExperimentProgress,
    ExperimentResult,
    ExperimentSummary,
    usd,
)
from konstruct.experiments.progress_text import budget_line
from konstruct.platform.errors import NotFound

if TYPE_CHECKING:
    from temporalio.client import Client

FINISHED = ("completed", "incomplete", "failed", "stopped")


class ItemRate:
    """Items per second over the polls of the last `window_s` seconds.

    The workflow's own figure moves only when its provider monitor samples,
    so the watcher measures what it sees between polls.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> float | None:
        """Record `done` items at time `at` (seconds); the rate, once two polls are apart."""
        self._samples.append((at, done))
        # Keep the newest sample that is at least a window old, and all after it.
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        first_at, first_done = self._samples[0]
        if at <= first_at:
            return None
        return max(done - first_done, 0) / (at - first_at)


def _figures(p: ExperimentProgress, rate: float) -> str:
    done = p.evaluated + p.failed
    eta_s = (p.total - done) / rate if rate > 0 else p.eta_s
    # Only a running experiment gets closer to its end: no ETA while paused or stopped.
    eta = f"ETA {eta_s:5.0f}s" if eta_s is not None and p.status == "running" else "ETA     -"
    throttled = sum(x.throttled_per_s for x in p.providers)
    breakers = ",".join(f"{x.provider}:{x.breaker}" for x in p.providers) or "-"
    rates = ",".join(f"{x.provider}:{x.rate_rps:.1f}/s" for x in p.providers) or "-"
    cost = f" cost {usd(p.cost_usd)}{'' if p.cost_known else '+?'}"
    if p.cache_hits:
        cost += f" ({p.cache_hits} cached)"
    return (
        f"{done}/{p.total} failed {p.failed} in-flight {p.in_flight} {rate:6.1f} items/s {eta}"
        f" 429/s {throttled:.1f} rate {rates} breaker {breakers}{cost}"
    )


def _notes(p: ExperimentProgress) -> list[str]:
    notes = []
    if p.paused_reason:
        notes.append(f"  paused: {p.paused_reason}")
    budget = budget_line(p.budget)
    if budget:
        notes.append(f"  {budget}")
    if p.last_refusal is not None:
        notes.append(f"  last refused {p.last_refusal.action}: {p.last_refusal.reason}")
    if p.incomplete_reason:
        notes.append(f"  incomplete: {p.incomplete_reason}")
    elif p.unfinished:
        notes.append(f"  {p.unfinished} items without a result: dispatching them again")
    return notes


def progress_view(p: ExperimentProgress, rate: float) -> RenderableType:
    """One poll on a terminal: status, a rich progress bar, the figures, then any notes."""
    line = Table.grid(Column(no_wrap=True), Column(), Column(), padding=(0, 1))
    line.add_row(
        Text(f"{p.status:<9}"),
        ProgressBar(total=max(p.total, 1), completed=p.evaluated + p.failed, width=30),
        Text(_figures(p, rate)),
    )
    return Group(line, *(Text(n) for n in _notes(p)))


async def experiment_progress(client: Client, workflow_id: str) -> ExperimentProgress:
    from temporalio.service import RPCError, RPCStatusCode

    from konstruct.platform.temporal.results import query_workflow
    from workflows.experiment import Experiment

    try:
        return await query_workflow(client.get_workflow_handle(workflow_id), Experiment.progress)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        raise NotFound(
            f"no experiment workflow {workflow_id!r}: {exc.message}; "
            "see `konstruct experiments list`"
        ) from None


async def _follow(client: Client, workflow_id: str, interval: float) -> ExperimentProgress:
    """Poll until the experiment ends: a live bar on a terminal, one line per poll otherwise."""
    rate = ItemRate()
    with LiveView() as view:
        while True:
            p = await experiment_progress(client, workflow_id)
            measured = rate.add(time.monotonic(), p.evaluated + p.failed)
            shown = p.items_per_s if measured is None else measured
            if view.is_live:
                view.update(progress_view(p, shown))
            else:
                view.say("\n".join([f"{p.status:<9} {_figures(p, shown)}", *_notes(p)]))
            if p.status in FINISHED or waits_for_you(p):
                return p
            await asyncio.sleep(interval)


# Exit code of `watch` (and `start --watch`) for an experiment that paused itself
# until a person acts: a spent budget or quota.
EXIT_PAUSED = 3


def waits_for_you(p: ExperimentProgress) -> bool:
    """Paused on a spent budget or quota with nothing in flight: only a resume moves it
    (a breaker's pause ends by itself, so `watch` goes on through it)."""
    return p.status == "paused" and p.paused_kind in ("budget", "quota") and p.in_flight == 0


async def watch_experiment(client: Client, workflow_id: str, interval: float) -> int:
    """Follow the experiment until it ends or waits for a person; its exit code."""
    from temporalio.client import WorkflowFailureError

    from konstruct.app.failures import failure_message
    from konstruct.platform.temporal.results import guarded
    from workflows.experiment import Experiment

    # A worker without this client's key fails at once, naming the key.
    p = await guarded(
        client.get_workflow_handle(workflow_id), _follow(client, workflow_id, interval)
    )
    if waits_for_you(p):
        _say_paused(p)
        return EXIT_PAUSED
    if p.status in ("completed", "incomplete"):
        try:
            handle = client.get_workflow_handle_for(Experiment.run, workflow_id)
            result = await guarded(handle, handle.result())
        except WorkflowFailureError as exc:
            print(f"error: {failure_message(exc)}", file=sys.stderr)
            return 1
        _print_result(result)
    return 0 if p.status in ("completed", "stopped") else 1


def _say_paused(p: ExperimentProgress) -> None:
    reason = p.paused_reason or str(p.paused_kind)
    if "konstruct experiments resume" not in reason:
        raise_flag = " --raise-budget USD" if p.paused_kind == "budget" else ""
        reason += f"; continue with `konstruct experiments resume {p.experiment_id}{raise_flag}`"
    print(f"paused until you resume it: {reason}", file=sys.stderr)


def _print_result(result: ExperimentResult) -> None:
    """The summary of a finished experiment: one row per eval, then latency and cost."""
    summary = result.summary
    k = summary.epochs
    print_table(
        [
            "eval",
            Column("mean", justify="right"),
            Column("± std. error", justify="right"),
            Column("pass rate", justify="right"),
            *([Column(f"pass@{k}", justify="right")] if k > 1 else []),
            "scored",
        ],
        [
            (
                e.name,
                _shown(e.mean),
                _shown(e.stderr),
                _shown(e.pass_rate),
                *([_shown(e.pass_at_k)] if k > 1 else []),
                e.scored,
            )
            for e in summary.evals
        ],
    )
    lat = summary.latency
    figures = " / ".join(_shown(v) for v in (lat.p50_ms, lat.p95_ms, lat.p99_ms))
    note = (
        " (every answer came from the cache)" if lat.p50_ms is None and summary.cache_hits else ""
    )
    print(f"  latency p50/p95/p99 ms: {figures}{note}")
    print(f"  {cost_line(result.summary)}")
    print(f"  registry run {result.registry_run_id}")


def _shown(value: float | None) -> str:
    """A summary figure for a table: 4 significant decimals, or n/a."""
    return "n/a" if value is None else f"{value:.4g}"


def cost_line(summary: ExperimentSummary) -> str:
    """What an experiment's calls cost, and what the cache saved."""
    line = f"cost {usd(summary.cost_usd)} (task {usd(summary.task_cost_usd)}"
    line += f", judges {usd(summary.judge_cost_usd)})"
    if not summary.cost_known:
        line += ", some calls of unknown price counted 0"
    if summary.cache_hits:
        line += f"; {summary.cache_hits} calls from the cache saved {usd(summary.cost_saved_usd)}"
    return line


@click.command("watch")
@experiment_argument
@tenant_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="seconds between polls",
)
@pass_state
def watch(state: CliState, experiment: str, tenant: str, interval: float) -> int:
    """Live progress: done/total, rate, ETA, 429s, breakers."""
    settings = state.settings

    async def run() -> int:
        workflow_id = await experiment_workflow_id(settings, tenant, experiment)
        return await watch_experiment(await temporal_client(settings), workflow_id, interval)

    return run_async(run())
