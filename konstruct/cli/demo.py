"""`konstruct demo run | progress | approve | reject | stop | resume | cancel`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError

from konstruct.cli.common import client_of, failure_message, print_json, run_async, settings_of
from konstruct.errors import NotFound
from konstruct.models.demo import STEP_NAMES, ApprovalSignal, DemoProgress, DemoStep
from workflows.demo_cascade import DemoCascade

_POLL_SECONDS = 0.5


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the forecasting registry showcase (DemoCascade)")
    sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="run the showcase and print one row per step")
    run.add_argument(
        "--scenario", choices=["demo_minimal", "showcase_rich"], default="showcase_rich"
    )
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--approval", choices=["auto", "manual"], default="auto")
    run.add_argument("--fail-at", choices=STEP_NAMES, default=None, help="inject a failure")
    run.add_argument("--id", help="workflow id (default: demo-SCENARIO-RANDOM)")
    run.add_argument("--detach", action="store_true", help="start it and return")
    run.add_argument("--json", action="store_true", help="print the whole result")
    run.set_defaults(handler=cmd_run)
    for name, text in (
        ("progress", "show a demo run's steps (default: the latest run)"),
        ("approve", "approve the agent's pending decision"),
        ("reject", "reject the agent's pending decision (hold)"),
        ("stop", "pause a demo run before its next step"),
        ("resume", "resume a paused demo run"),
        ("cancel", "cancel a demo run (compensations run)"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("workflow_id", nargs="?", help="default: the latest demo run")
        if name == "progress":
            parser.add_argument("--json", action="store_true")
        if name in ("approve", "reject"):
            parser.add_argument("--by", default="cli", help="who decides (recorded)")
        parser.set_defaults(handler=cmd_message, action=name)


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


def print_steps(steps: list[DemoStep]) -> None:
    print(f"{'step':<28} {'phase':<10} {'status':<12} {'ms':>8}  detail")
    for s in steps:
        print(f"{s.name:<28} {s.phase:<10} {s.status:<12} {s.duration_ms:>8.0f}  {s.detail[:110]}")


def print_progress(progress: DemoProgress) -> None:
    print(
        f"{progress.workflow_id}: {progress.status}  scenario {progress.scenario}"
        f"  champion {progress.champion_run_id or '-'}  alias {progress.alias_run_id or '-'}"
    )
    print_steps(progress.steps)
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


async def _follow(handle: WorkflowHandle) -> None:
    """Print each step as it finishes, and the approval prompt when one is waiting."""
    shown: set[str] = set()
    prompted = False
    while True:
        try:
            progress: DemoProgress = await handle.query(DemoCascade.progress)
        except RPCError:
            await asyncio.sleep(_POLL_SECONDS)
            continue
        for s in progress.steps:
            if s.status not in ("pending", "running") and s.name not in shown:
                shown.add(s.name)
                print(f"  {s.name:<28} {s.status:<12} {s.detail[:100]}", flush=True)
        if progress.pending_approval is not None and not prompted:
            prompted = True
            p = progress.pending_approval
            print(
                f"  >> agent proposes {p.proposal}: {p.rationale}\n"
                f"  >> konstruct demo approve|reject {progress.workflow_id}"
                f" (hold after {p.deadline.isoformat(timespec='seconds')})",
                flush=True,
            )
        if progress.status in ("completed", "failed", "cancelled"):
            return
        await asyncio.sleep(_POLL_SECONDS)


async def _run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    client = await client_of(settings)
    workflow_id = args.id or f"demo-{args.scenario}-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        DemoCascade.run,
        {
            "scenario": args.scenario,
            "seed": args.seed,
            "approval": args.approval,
            "fail_at": args.fail_at,
        },
        id=workflow_id,
        task_queue=settings.temporal.task_queue,
        static_summary=f"DemoCascade {args.scenario} (seed {args.seed}, {args.approval})",
    )
    print(f"started {workflow_id}", flush=True)
    if args.detach:
        return 0
    follower = asyncio.create_task(_follow(handle))
    try:
        result = await handle.result()
    except WorkflowFailureError as exc:
        await _stop(follower)
        print(f"\n{workflow_id} failed: {failure_message(exc)}", file=sys.stderr)
        print_progress(await handle.query(DemoCascade.progress))
        return 1
    await _stop(follower)
    if args.json:
        print_json(result)
        return 0
    print(
        f"\n{workflow_id}: overall_status {result.overall_status}"
        f" in {result.total_ms / 1000:.1f} s; champion {result.champion_run_id};"
        f" decision {result.decision or '-'}"
    )
    print_steps(result.steps)
    return 0 if result.overall_status == "pass" else 1


async def _message(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    client = await client_of(settings)
    running_only = args.action != "progress"
    workflow_id = args.workflow_id or await _latest(client, running_only)
    handle = client.get_workflow_handle(workflow_id)
    if args.action == "progress":
        progress: DemoProgress = await handle.query(DemoCascade.progress)
        if args.json:
            print_json(progress)
        else:
            print_progress(progress)
        return 0
    if args.action == "approve":
        await handle.signal(DemoCascade.approve, ApprovalSignal(by=args.by))
    elif args.action == "reject":
        await handle.signal(DemoCascade.reject, ApprovalSignal(by=args.by))
    elif args.action == "stop":
        await handle.signal(DemoCascade.stop)
    elif args.action == "resume":
        await handle.signal(DemoCascade.resume)
    else:
        await handle.cancel()
    print(f"{args.action} sent to {workflow_id}")
    return 0


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _run_command(command: Callable[[argparse.Namespace], Awaitable[int]], args: Any) -> int:
    async def run() -> int:
        return await command(args)

    return run_async(run())


def cmd_run(args: argparse.Namespace) -> int:
    return _run_command(_run, args)


def cmd_message(args: argparse.Namespace) -> int:
    return _run_command(_message, args)
