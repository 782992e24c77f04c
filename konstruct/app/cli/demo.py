"""`konstruct demo run | progress | approve | reject | stop | resume | cancel`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click

from konstruct.app.cli.common import (
    CliState,
    json_option,
    pass_state,
    run_async,
    temporal_client,
    workflow_id_value,
)
from konstruct.demo.models import STEP_NAMES, ApprovalSignal, DemoProgress, DemoStep
from konstruct.platform.errors import NotFound

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Column
    from temporalio.client import Client, WorkflowHandle

    from konstruct.app.cli.output import LiveView
    from workflows.demo_cascade import DemoCascade

_POLL_SECONDS = 0.5
_FINISHED = ("completed", "failed", "cancelled")


def _step_columns() -> list[str | Column]:
    from rich.table import Column

    return ["step", "phase", "status", Column("ms", justify="right"), "detail"]


def _cascade() -> type[DemoCascade]:
    """The workflow, imported by the commands that talk to it (it loads temporalio)."""
    from workflows.demo_cascade import DemoCascade

    return DemoCascade


workflow_id_argument = click.argument("workflow_id", required=False)


@click.group("demo")
def group() -> None:
    """The forecasting registry showcase (DemoCascade)."""


async def _latest(client: Client, running_only: bool) -> str:
    query = "WorkflowType = 'DemoCascade'"
    if running_only:
        query += " AND ExecutionStatus = 'Running'"
    latest: tuple[object, str] | None = None
    async for execution in client.list_workflows(query):
        key = (execution.start_time, execution.id)
        if latest is None or key > latest:  # type: ignore[operator]
            latest = key
    if latest is None:
        what = "running demo" if running_only else "demo run"
        raise NotFound(f"no {what} found; start one with `konstruct demo run`")
    return latest[1]


def _step_rows(steps: list[DemoStep]) -> list[tuple[str, str, str, str, str]]:
    return [(s.name, s.phase, s.status, f"{s.duration_ms:.0f}", s.detail[:110]) for s in steps]


def print_progress(progress: DemoProgress) -> None:
    from konstruct.app.cli.output import print_table

    print(
        f"{progress.workflow_id}: {progress.status}  scenario {progress.scenario}"
        f"  champion {progress.champion_run_id or '-'}  alias {progress.alias_run_id or '-'}"
    )
    print_table(_step_columns(), _step_rows(progress.steps))
    if progress.pending_approval is not None:
        p = progress.pending_approval
        print(
            f"\nwaiting for approval until {p.deadline.isoformat(timespec='seconds')}: "
            f"{p.proposal} (challenger WAPE {p.challenger_wape:.4f}, champion "
            f"{p.champion_wape:.4f})\n  {p.rationale}\n  konstruct demo approve|reject "
            f"{progress.workflow_id}"
        )
    for c in progress.compensations:
        print(f"compensation {c.status:<4} {c.step}: {c.action}: {c.detail}")
    if progress.error:
        print(f"error: {progress.error}")


def progress_view(progress: DemoProgress) -> RenderableType:
    """A running demo on a terminal: a bar of finished steps over the step table."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    from konstruct.app.cli.output import build_table

    finished = sum(s.status not in ("pending", "running") for s in progress.steps)
    total = len(progress.steps)
    head = Text(
        f"{progress.workflow_id}: {progress.status}  step {finished}/{total}"
        f"  {progress.current_step or ''}"
    )
    table = build_table(_step_columns(), _step_rows(progress.steps))
    return Group(head, ProgressBar(total=max(total, 1), completed=finished, width=40), table)


async def _follow(handle: WorkflowHandle, view: LiveView) -> None:
    """Show each poll: the live table on a terminal, a line per finished step otherwise."""
    from temporalio.service import RPCError

    from workflows.demo_cascade import DemoCascade

    shown: set[str] = set()
    prompted = False
    while True:
        try:
            progress: DemoProgress = await handle.query(DemoCascade.progress)
        except RPCError:
            # The workflow may not have run its first task yet.
            await asyncio.sleep(_POLL_SECONDS)
            continue
        if view.is_live:
            view.update(progress_view(progress))
        else:
            for s in progress.steps:
                if s.status not in ("pending", "running") and s.name not in shown:
                    shown.add(s.name)
                    view.say(f"  {s.name:<28} {s.status:<12} {s.detail[:100]}")
        if progress.pending_approval is not None and not prompted:
            prompted = True
            p = progress.pending_approval
            view.say(
                f"  >> agent proposes {p.proposal}: {p.rationale}\n"
                f"  >> konstruct demo approve|reject {progress.workflow_id}"
                f" (hold after {p.deadline.isoformat(timespec='seconds')})"
            )
        if progress.status in _FINISHED:
            return
        await asyncio.sleep(_POLL_SECONDS)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@group.command("run")
@click.option(
    "--scenario",
    type=click.Choice(["demo_minimal", "showcase_rich"]),
    default="showcase_rich",
    show_default=True,
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--approval", type=click.Choice(["auto", "manual"]), default="auto", show_default=True
)
@click.option("--fail-at", type=click.Choice(STEP_NAMES), help="inject a failure at this step")
@click.option(
    "--id",
    "workflow_id",
    callback=workflow_id_value,
    help="workflow id (default: demo-SCENARIO-RANDOM)",
)
@click.option("--detach", is_flag=True, help="start it and return")
@json_option("print the whole result")
@pass_state
def run(
    state: CliState,
    scenario: str,
    seed: int,
    approval: str,
    fail_at: str | None,
    workflow_id: str | None,
    detach: bool,
    as_json: bool,
) -> int:
    """Run the showcase and print one row per step."""
    from temporalio.client import WorkflowFailureError

    from konstruct.app.cli.output import LiveView, print_json, print_table
    from konstruct.app.failures import failure_message
    from workflows.demo_cascade import DemoCascade

    settings = state.settings
    workflow_id = workflow_id or f"demo-{scenario}-{uuid.uuid4().hex[:8]}"

    async def execute() -> int:
        from konstruct.platform.temporal.results import query_workflow, workflow_result

        client = await temporal_client(settings)
        handle = await client.start_workflow(
            DemoCascade.run,
            {"scenario": scenario, "seed": seed, "approval": approval, "fail_at": fail_at},
            id=workflow_id,
            task_queue=settings.temporal.task_queue,
            static_summary=f"DemoCascade {scenario} (seed {seed}, {approval})",
        )
        print(f"started {workflow_id}", flush=True)
        if detach:
            return 0
        failure: WorkflowFailureError | None = None
        # The live table goes when the run ends; the final table is printed below.
        with LiveView(transient=True) as view:
            following = asyncio.create_task(_follow(handle, view))
            try:
                # A worker without this client's key fails at once, naming the key.
                result = await workflow_result(handle)
            except WorkflowFailureError as exc:
                failure = exc
            finally:
                await _stop(following)
        if failure is not None:
            print(f"\n{workflow_id} failed: {failure_message(failure)}", file=sys.stderr)
            print_progress(await query_workflow(handle, DemoCascade.progress))
            return 1
        if as_json:
            print_json(result)
            return 0
        print(
            f"\n{workflow_id}: overall_status {result.overall_status}"
            f" in {result.total_ms / 1000:.1f} s; champion {result.champion_run_id};"
            f" decision {result.decision or '-'}"
        )
        print_table(_step_columns(), _step_rows(result.steps))
        return 0 if result.overall_status == "pass" else 1

    return run_async(execute())


def _steering_command(
    name: str, help: str, send: Callable[[WorkflowHandle, str], Awaitable[Any]], decides: bool
) -> click.Command:
    """A command that sends one signal (or the cancel) to a demo run.

    Its target defaults to the latest running demo; `decides` adds `--by`.
    """

    @click.command(name, help=f"{help} (default: the latest running demo).")
    @workflow_id_argument
    @pass_state
    def steer(state: CliState, workflow_id: str | None, by: str = "cli") -> int:
        async def execute() -> int:
            client = await temporal_client(state.settings)
            target = workflow_id or await _latest(client, running_only=True)
            await send(client.get_workflow_handle(target), by)
            print(f"{name} sent to {target}")
            return 0

        return run_async(execute())

    if decides:
        click.option("--by", default="cli", show_default=True, help="who decides (recorded)")(steer)
    return steer


for _command in (
    _steering_command(
        "approve",
        "Approve the agent's pending decision",
        lambda h, by: h.signal(_cascade().approve, ApprovalSignal(by=by)),
        decides=True,
    ),
    _steering_command(
        "reject",
        "Reject the agent's pending decision: hold",
        lambda h, by: h.signal(_cascade().reject, ApprovalSignal(by=by)),
        decides=True,
    ),
    _steering_command(
        "stop",
        "Pause a demo run before its next step",
        lambda h, _: h.signal(_cascade().stop),
        decides=False,
    ),
    _steering_command(
        "resume",
        "Resume a paused demo run",
        lambda h, _: h.signal(_cascade().resume),
        decides=False,
    ),
    _steering_command(
        "cancel",
        "Cancel a demo run; compensations run",
        lambda h, _: h.cancel(),
        decides=False,
    ),
):
    group.add_command(_command)


@group.command("progress")
@workflow_id_argument
@json_option()
@pass_state
def progress(state: CliState, workflow_id: str | None, as_json: bool) -> int:
    """Show a demo run's steps (default: the latest run)."""
    from konstruct.app.cli.output import print_json
    from konstruct.platform.temporal.results import query_workflow
    from workflows.demo_cascade import DemoCascade

    async def execute() -> int:
        client = await temporal_client(state.settings)
        target = workflow_id or await _latest(client, running_only=False)
        handle = client.get_workflow_handle(target)
        shown: DemoProgress = await query_workflow(handle, DemoCascade.progress)
        if as_json:
            print_json(shown)
        else:
            print_progress(shown)
        return 0

    return run_async(execute())
