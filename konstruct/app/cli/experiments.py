"""`konstruct experiments start | sweep | watch | show | list | stop | resume | retry | compare | report`.

The group, and the commands that read what is stored (`show`, `list`) or start a
failed experiment's items again (`retry`); the others have modules of their own:
`experiment_start`, `experiment_watch`, `experiment_toggles`, `experiment_reports`.
"""

from __future__ import annotations

import sys

import click
from rich.table import Column

from konstruct.app.cli.common import (
    CliState,
    Query,
    app_pool,
    in_tenant,
    json_option,
    listing,
    pass_state,
    run_async,
    temporal_client,
    tenant_option,
)
from konstruct.app.cli.experiment_ids import experiment_argument, experiment_workflow_id
from konstruct.app.cli.lazy import LazyGroup
from konstruct.platform.errors import NotFound

_CLI = "konstruct.app.cli"
# The commands of their own modules, loaded when called: name -> ("module:command",
# its one-line help for `konstruct experiments --help`; tests/test_cli_startup.py checks it).
COMMANDS: dict[str, tuple[str, str]] = {
    "start": (f"{_CLI}.experiment_start:start", "Start an Experiment (from a JSON file or flags)."),
    "sweep": (
        f"{_CLI}.experiment_sweep:sweep",
        "Start one experiment per model group × prompt template (or agent), on one dataset.",
    ),
    "watch": (
        f"{_CLI}.experiment_watch:watch",
        "Live progress: done/total, rate, ETA, 429s, breakers.",
    ),
    "stop": (f"{_CLI}.experiment_toggles:stop", "Stop an experiment (answers accepted/refused)."),
    "resume": (
        f"{_CLI}.experiment_toggles:resume",
        "Resume an experiment (answers accepted/refused).",
    ),
    "compare": (
        f"{_CLI}.experiment_reports:compare_command",
        "Experiment B against A, item by item: score differences with a paired bootstrap"
        " interval, flipped items, latency, tokens and cost. Three or more: a matrix of each"
        " eval's mean and interval per experiment, the best marked.",
    ),
    "gate": (
        f"{_CLI}.experiment_reports:gate_command",
        "Exit 0 when an experiment holds every rule against a baseline, 1 when one fails.",
    ),
    "report": (
        f"{_CLI}.experiment_reports:report_command",
        "One self-contained HTML page about an experiment: summary, plots, items.",
    ),
}


@click.group("experiments", cls=LazyGroup, lazy=COMMANDS)
def group() -> None:
    """Run and inspect experiments."""


@group.command("show")
@experiment_argument
@click.argument("item", required=False)
@tenant_option
@json_option()
@pass_state
def show(state: CliState, experiment: str, item: str | None, tenant: str, as_json: bool) -> int:
    """The experiment with one row per item; with ITEM, that item and its transcript."""
    from konstruct.app.cli.output import print_json, print_table
    from konstruct.experiments.models import BudgetProgress, usd
    from konstruct.experiments.progress_text import budget_line
    from konstruct.experiments.store.summaries import experiment_rows
    from konstruct.experiments.views import experiment_detail

    if item is not None:
        return _show_item(state, experiment, item, tenant, as_json)

    data = experiment_detail(
        in_tenant(state.settings, tenant, lambda conn: experiment_rows(conn, tenant, experiment))
    )
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


def _show_item(state: CliState, experiment: str, item: str, tenant: str, as_json: bool) -> int:
    from konstruct.app.cli.output import print_json
    from konstruct.experiments.store.summaries import item_row
    from konstruct.experiments.trajectory import Transcript
    from konstruct.experiments.views import item_detail

    row = in_tenant(state.settings, tenant, lambda conn: item_row(conn, tenant, experiment, item))
    if row is None:
        raise NotFound(
            f"no item {item!r} in experiment {experiment!r} of tenant {tenant!r};"
            f" see `konstruct experiments show {experiment}`"
        )
    data = item_detail(row)
    if as_json:
        print_json(data)
        return 0
    print(f"{data['item_id']}  {data['status']}  (experiment {experiment})")
    print(f"  input:    {data['input']}")
    if data["expected"] is not None:
        print(f"  expected: {data['expected']}")
    print(f"  output:   {data['output'] or data['error'] or ''}")
    for name, score in data["scores"].items():
        if isinstance(score, dict):
            mark = "pass" if score.get("passed") else "fail"
            print(f"  {name}: {score.get('score')} {mark}  {score.get('detail') or ''}".rstrip())
    if data["transcript"]:
        print("transcript:")
        print(Transcript.model_validate(data["transcript"]).render())
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
    from konstruct.experiments.store.experiments import list_experiments

    return lambda conn: list_experiments(conn, tenant)


@group.command("retry")
@experiment_argument
@tenant_option
@pass_state
def retry(state: CliState, experiment: str, tenant: str) -> int:
    """Re-run only the items that ended failed, keeping every ok result."""
    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError

    from konstruct.app.cli.experiment_start import launch
    from konstruct.experiments.store.results import forget_failures
    from konstruct.platform.db import tenant_transaction

    settings = state.settings

    async def run() -> int:
        workflow_id = await experiment_workflow_id(settings, tenant, experiment)
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
        async with app_pool(settings) as pool, tenant_transaction(pool, tenant) as conn:
            rerun, kept = await forget_failures(conn, tenant, experiment)
        if rerun == 0:
            print(f"experiment {experiment} has no failed item: nothing to re-run")
            return 0
        await launch(
            client,
            settings,
            body,
            workflow_id,
            summary=f"experiment {experiment}: retry of {rerun} failed item(s)",
            said=f"re-running {rerun} failed item(s) of {experiment}; {kept} ok result(s) kept",
            experiment=experiment,
        )
        return 0

    return run_async(run())
