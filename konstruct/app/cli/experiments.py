"""`konstruct experiments start | watch | show | list | stop | resume | retry` (and, from
`experiment_reports`, `compare | report`)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from konstruct.app.cli.common import (
    CliState,
    Query,
    app_pool,
    json_option,
    listing,
    pass_state,
    run_async,
    temporal_client,
    tenant_option,
    with_pool,
    workflow_id_value,
)
from konstruct.app.cli.experiment_reports import COMMANDS as REPORT_COMMANDS
from konstruct.app.cli.output import LiveView, failure_message, print_json, print_table
from konstruct.config import Settings
from konstruct.experiments.datasets import load_items
from konstruct.experiments.models import (
    BudgetProgress,
    ExperimentInput,
    ExperimentProgress,
    ExperimentSummary,
    LlmJudgeEval,
    ToggleInput,
    usd,
)
from konstruct.experiments.store.budgets import raise_budget as raise_experiment_budget
from konstruct.experiments.store.experiments import (
    experiment_detail,
    find_workflow_id,
    forget_failures,
    list_experiments,
)
from konstruct.platform.errors import InvalidInput, NotFound
from konstruct.providers.router import load_router_config
from workflows.experiment import Experiment

DEFAULT_DATASET = "deploy/datasets/arithmetic.jsonl"
FINISHED = ("completed", "incomplete", "failed", "stopped")
experiment_argument = click.argument("experiment")


@click.group("experiments")
def group() -> None:
    """Run and inspect experiments."""


def build_input(
    settings: Settings,
    *,
    file: Path | None = None,
    experiment_id: str | None = None,
    tenant: str = "demo",
    name: str | None = None,
    dataset: str | None = None,
    input_field: str | None = None,
    expected_field: str | None = None,
    id_field: str | None = None,
    model_group: str = "fast",
    template: str = "",
    evals: tuple[str, ...] = (),
    judge: str | None = None,
    rubric: str = "",
    max_concurrency: int | None = None,
    epochs: int | None = None,
    no_cache: bool = False,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
) -> dict[str, Any]:
    """The workflow input, with the experiment settings as its `options` defaults."""
    if file is not None:
        try:
            body = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidInput(f"{file} must hold a JSON object (the Experiment input)")
    else:
        kinds: list[dict[str, Any]] = [{"kind": k} for k in (evals or ("exact_match",))]
        if judge:
            kinds.append({"kind": "llm_judge", "model_group": judge, "rubric": rubric})
        mapping = {
            "input_field": input_field,
            "expected_field": expected_field,
            "id_field": id_field,
        }
        body = {
            "tenant_id": tenant,
            "dataset": {
                "path": dataset or DEFAULT_DATASET,
                **{key: value for key, value in mapping.items() if value is not None},
            },
            "task": {"model_group": model_group, "prompt_template": template},
            "evals": kinds,
        }
    if experiment_id:
        body["experiment_id"] = experiment_id
    body.setdefault("experiment_id", f"exp-{time.strftime('%Y%m%d-%H%M%S')}")
    if name:
        body["name"] = name
    if epochs is not None:
        body["epochs"] = epochs
    if no_cache:
        body["cache"] = False
    if budget_usd is not None or budget_tokens is not None:
        body["budget"] = dict(body.get("budget") or {})
        if budget_usd is not None:
            body["budget"]["max_usd"] = budget_usd
        if budget_tokens is not None:
            body["budget"]["max_tokens"] = budget_tokens
    s = settings.experiments
    body.setdefault("max_concurrency", max_concurrency or s.max_concurrency)
    body["options"] = {**s.workflow_options().model_dump(), **body.get("options", {})}
    try:
        validated = ExperimentInput.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("Experiment", exc) from None
    _check_against_config(settings, body, validated)
    return body


def _check_against_config(
    settings: Settings, body: dict[str, Any], validated: ExperimentInput
) -> None:
    """What the input cannot say about itself: its model groups are in the router
    config, its dataset reads (the file exists and every row maps to an item, as the
    worker will read it) and the template names only fields the items have."""
    config = load_router_config(settings.path(settings.llm.router_config))
    groups = sorted({d.model_name for d in config.model_list})
    named = [("task.model_group", validated.task.model_group)] + [
        (f"evals.{i}.model_group", e.model_group)
        for i, e in enumerate(validated.evals)
        if isinstance(e, LlmJudgeEval)
    ]
    for field, group in named:
        if group not in groups:
            raise InvalidInput(
                f"Experiment: {field}: {group!r} is not a model group of the router config"
                f" ({', '.join(groups)})"
            )
    try:
        load_items(validated.dataset, settings.base_dir, validated.task.prompt_template)
    except InvalidInput as exc:
        raise InvalidInput(f"Experiment: {exc}", exc.fields) from None


@group.command("start")
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--id", "experiment_id", callback=workflow_id_value, help="experiment id (default: new)"
)
@tenant_option
@click.option("--name")
@click.option("--dataset", help=f"a .jsonl, .csv or .parquet file (default: {DEFAULT_DATASET})")
@click.option("--input-field", help="the dataset's column of the input (default: input)")
@click.option(
    "--expected-field", help="the dataset's column of the expected answer (default: expected)"
)
@click.option("--id-field", help="the dataset's column of the item id (default: id, else row-N)")
@click.option("--model-group", default="fast", show_default=True)
@click.option("--template", default="Answer with a number only: {input}", show_default=True)
@click.option(
    "--eval",
    "evals",
    multiple=True,
    help="eval kind (repeatable): exact_match, contains, regex, numeric_close, json_valid",
)
@click.option("--judge", help="add an llm_judge eval with this model group")
@click.option(
    "--rubric", default="Is the answer correct? Score 1 if so, else 0.", show_default=True
)
@click.option("--max-concurrency", type=click.IntRange(min=1))
@click.option("--epochs", type=click.IntRange(1, 100), help="run each item N times (default 1)")
@click.option(
    "--no-cache",
    is_flag=True,
    help="always call the provider (default: answer repeated calls from the cache)",
)
@click.option(
    "--budget-usd",
    type=click.FloatRange(min=0, min_open=True),
    help="pause once the calls have cost this many US dollars",
)
@click.option(
    "--budget-tokens",
    type=click.IntRange(min=1),
    help="pause once the calls have used this many tokens",
)
@click.option("--watch", is_flag=True, help="watch it until it ends")
@pass_state
def start(state: CliState, watch: bool, **fields: Any) -> int:
    """Start an Experiment (from a JSON file or flags)."""
    settings = state.settings
    body = build_input(settings, **fields)
    workflow_id = body["experiment_id"]

    async def run() -> int:
        client = await temporal_client(settings)
        await client.start_workflow(
            Experiment.run,
            body,
            id=workflow_id,
            task_queue=settings.temporal.task_queue,
            static_summary=f"experiment {workflow_id} ({body['task']['model_group']})",
        )
        print(f"started experiment {workflow_id} (workflow id {workflow_id})")
        print(f"  watch: konstruct experiments watch {workflow_id}")
        if watch:
            return await _watch(client, workflow_id, 1.0)
        return 0

    return run_async(run())


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
    eta = f"ETA {eta_s:5.0f}s" if eta_s is not None and p.status not in FINISHED else "ETA     -"
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


def budget_line(b: BudgetProgress | None) -> str | None:
    """The budgets of an experiment and its tenant, in one line (None: it has none)."""
    if b is None:
        return None
    parts = []
    if b.max_usd is not None:
        parts.append(f"{usd(b.spent_usd)} of {usd(b.max_usd)}")
    if b.max_tokens is not None:
        parts.append(f"{b.spent_tokens} of {b.max_tokens} tokens")
    if b.reserved_usd or b.reserved_tokens:
        parts.append(f"{usd(b.reserved_usd)} ({b.reserved_tokens} tokens) reserved in flight")
    if b.tenant_max_usd is not None:
        parts.append(
            f"tenant {b.tenant_month}: {usd(b.tenant_spent_usd)} of {usd(b.tenant_max_usd)}"
        )
    return "budget " + ", ".join(parts)


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


async def _progress(client: Client, workflow_id: str) -> ExperimentProgress:
    try:
        return await client.get_workflow_handle(workflow_id).query(Experiment.progress)
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
            p = await _progress(client, workflow_id)
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


async def _watch(client: Client, workflow_id: str, interval: float) -> int:
    p = await _follow(client, workflow_id, interval)
    if waits_for_you(p):
        reason = p.paused_reason or str(p.paused_kind)
        if "konstruct experiments resume" not in reason:
            raise_flag = " --raise-budget USD" if p.paused_kind == "budget" else ""
            reason += (
                f"; continue with `konstruct experiments resume {p.experiment_id}{raise_flag}`"
            )
        print(f"paused until you resume it: {reason}", file=sys.stderr)
        return EXIT_PAUSED
    if p.status in ("completed", "incomplete"):
        try:
            result = await client.get_workflow_handle_for(Experiment.run, workflow_id).result()
        except WorkflowFailureError as exc:
            print(f"error: {failure_message(exc)}", file=sys.stderr)
            return 1
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
            " (every answer came from the cache)"
            if lat.p50_ms is None and summary.cache_hits
            else ""
        )
        print(f"  latency p50/p95/p99 ms: {figures}{note}")
        print(f"  {cost_line(result.summary)}")
        print(f"  registry run {result.registry_run_id}")
    return 0 if p.status in ("completed", "stopped") else 1


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


async def _workflow_id(settings: Settings, tenant: str, experiment: str) -> str:
    """The experiment's workflow id: recorded in PostgreSQL; else the id itself."""
    async with app_pool(settings) as pool:
        found = await find_workflow_id(pool, tenant, experiment)
    return found or experiment


@group.command("watch")
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
        workflow_id = await _workflow_id(settings, tenant, experiment)
        return await _watch(await temporal_client(settings), workflow_id, interval)

    return run_async(run())


@group.command("show")
@experiment_argument
@tenant_option
@json_option()
@pass_state
def show(state: CliState, experiment: str, tenant: str, as_json: bool) -> int:
    """The experiment with one row per item."""
    data = with_pool(state.settings, lambda pool: experiment_detail(pool, tenant, experiment))
    if as_json:
        print_json(data)
        return 0
    print(f"{data['experiment_id']}  {data['name']}  {data['status']}  {data['total']} items")
    if data.get("paused_reason"):
        print(f"  paused: {data['paused_reason']}")
    spent = f"  cost {usd(data['cost_usd'])}" + ("" if data["cost_known"] else " (+ unknown)")
    if data["cache_hits"]:
        spent += f", {data['cache_hits']} calls from the cache saved {usd(data['cost_saved_usd'])}"
    print(spent)
    budget = budget_line(BudgetProgress.model_validate(data["budget"]) if data["budget"] else None)
    if budget:
        print(f"  {budget}")
    print_table(
        ["item", "status", "output", "scores"],
        [
            (
                item["item_id"],
                item["status"],
                (item["output"] or item["error"] or "").replace("\n", " ")[:40],
                " ".join(
                    f"{k}={v.get('score')}"
                    for k, v in item["scores"].items()
                    if isinstance(v, dict)
                ),
            )
            for item in data["items"]
        ],
    )
    return 0


@group.command("list")
@tenant_option
@listing(
    "tenant {tenant!r} has no experiments",
    ["experiment", "status", Column("results", justify="right"), "name"],
    lambda r: (r["experiment_id"], r["status"], f"{r['results']}/{r['total']}", r["name"]),
)
def list_(tenant: str) -> Query:
    """A tenant's experiments."""
    return lambda pool: list_experiments(pool, tenant)


def _toggle_command(action: str) -> click.Command:
    """`stop` or `resume`: the update's answer, accepted or refused with its reason."""
    update = Experiment.request_stop if action == "stop" else Experiment.request_resume

    @click.command(action, help=f"{action.capitalize()} an experiment (answers accepted/refused).")
    @experiment_argument
    @tenant_option
    @pass_state
    def toggle(
        state: CliState,
        experiment: str,
        tenant: str,
        raise_budget: float | None = None,
        raise_tokens: int | None = None,
    ) -> int:
        settings = state.settings

        async def run() -> int:
            if raise_budget is not None or raise_tokens is not None:
                # In PostgreSQL first: the calls after the resume reserve against it.
                async with app_pool(settings) as pool:
                    now = await raise_experiment_budget(
                        pool,
                        tenant,
                        experiment,
                        usd_more=raise_budget or 0.0,
                        tokens_more=raise_tokens or 0,
                    )
                print(
                    f"budget of {experiment} raised: {usd(now['spent_usd'])} spent of"
                    f" {usd(now['budget_max_usd'])}"
                    + (
                        f", {now['spent_tokens']} of {now['budget_max_tokens']} tokens"
                        if now["budget_max_tokens"] is not None
                        else ""
                    )
                )
            workflow_id = await _workflow_id(settings, tenant, experiment)
            client = await temporal_client(settings)
            handle = client.get_workflow_handle(workflow_id)
            try:
                result = await handle.execute_update(update, ToggleInput(by="cli"))
            except RPCError as exc:
                try:
                    status = (await handle.describe()).status
                except RPCError:
                    raise NotFound(
                        f"no experiment workflow {workflow_id!r}: {exc.message}"
                    ) from None
                word = status.name.lower() if status is not None else "closed"
                print(f"{action} refused: the experiment's workflow is {word}")
                return 1
            word = "accepted" if result.accepted else "refused"
            print(f"{action} {word}: {result.reason} (status {result.status})")
            return 0 if result.accepted else 1

        return run_async(run())

    if action == "resume":
        toggle = click.option(
            "--raise-budget",
            type=click.FloatRange(min=0, min_open=True),
            metavar="USD",
            help="first raise the experiment's budget.max_usd by USD (a budget pause)",
        )(toggle)
        toggle = click.option(
            "--raise-tokens",
            type=click.IntRange(min=1),
            metavar="N",
            help="first raise the experiment's budget.max_tokens by N",
        )(toggle)
    return toggle


group.add_command(_toggle_command("stop"))
group.add_command(_toggle_command("resume"))


@group.command("retry")
@experiment_argument
@tenant_option
@pass_state
def retry(state: CliState, experiment: str, tenant: str) -> int:
    """Re-run only the items that ended failed, keeping every ok result."""
    settings = state.settings

    async def run() -> int:
        workflow_id = await _workflow_id(settings, tenant, experiment)
        client = await temporal_client(settings)
        handle = client.get_workflow_handle(workflow_id)
        try:
            description = await handle.describe()
            history = await handle.fetch_history()
        except RPCError as exc:
            raise NotFound(f"no experiment workflow {workflow_id!r}: {exc.message}") from None
        if description.status == WorkflowExecutionStatus.RUNNING:
            print(
                f"retry refused: experiment {experiment} is still running (a stopped one"
                " waits for `konstruct experiments resume`); retry it once it has ended",
                file=sys.stderr,
            )
            return 1
        # The input the experiment was started with (a continued run also carries
        # its counters, which a new run must not inherit).
        started = history.events[0].workflow_execution_started_event_attributes
        [body] = await client.data_converter.decode(started.input.payloads, [dict])
        body.pop("carry", None)
        async with app_pool(settings) as pool:
            rerun, kept = await forget_failures(pool, tenant, experiment)
        if rerun == 0:
            print(f"experiment {experiment} has no failed item: nothing to re-run")
            return 0
        await client.start_workflow(
            Experiment.run,
            body,
            id=workflow_id,
            task_queue=settings.temporal.task_queue,
            static_summary=f"experiment {experiment}: retry of {rerun} failed item(s)",
        )
        print(f"re-running {rerun} failed item(s) of {experiment}; {kept} ok result(s) kept")
        print(f"  watch: konstruct experiments watch {experiment}")
        return 0

    return run_async(run())


# `compare` and `report` (konstruct/app/cli/experiment_reports.py).
for _command in REPORT_COMMANDS:
    group.add_command(_command)
