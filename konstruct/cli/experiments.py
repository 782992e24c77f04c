"""`konstruct experiments start | watch | show | list | stop | resume`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from konstruct import db
from konstruct.cli.common import client_of, failure_message, print_json, run_async, settings_of
from konstruct.config import Settings
from konstruct.errors import InvalidInput, NotFound
from konstruct.models.experiments import (
    ExperimentInput,
    ExperimentOptions,
    ExperimentProgress,
    ToggleInput,
)
from konstruct.store.experiments import experiment_detail, find_workflow_id, list_experiments
from workflows.experiment import Experiment


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("experiments", help="run and inspect experiments")
    sub = group.add_subparsers(dest="experiments_command", required=True, metavar="ACTION")

    start = sub.add_parser("start", help="start an Experiment (from a JSON file or flags)")
    start.add_argument("file", nargs="?", help="JSON input file (the workflow input)")
    start.add_argument("--id", dest="experiment_id", help="experiment id (default: new)")
    start.add_argument("--tenant", default="demo")
    start.add_argument("--name")
    start.add_argument("--dataset", help="JSONL path (default: deploy/datasets/arithmetic.jsonl)")
    start.add_argument("--model-group", default="fast")
    start.add_argument("--template", default="Answer with a number only: {input}")
    start.add_argument(
        "--eval",
        dest="evals",
        action="append",
        help="eval kind (repeatable): exact_match, contains, regex, numeric_close, json_valid",
    )
    start.add_argument("--judge", help="add an llm_judge eval with this model group")
    start.add_argument("--rubric", default="Is the answer correct? Score 1 if so, else 0.")
    start.add_argument("--max-concurrency", type=int)
    start.add_argument("--watch", action="store_true", help="watch it until it ends")
    start.set_defaults(handler=cmd_start)

    watch = sub.add_parser("watch", help="live progress: done/total, rate, ETA, 429s, breakers")
    watch.add_argument("experiment")
    watch.add_argument("--tenant", default="demo")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.set_defaults(handler=cmd_watch)

    show = sub.add_parser("show", help="the experiment with one row per item")
    show.add_argument("experiment")
    show.add_argument("--tenant", default="demo")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)

    ls = sub.add_parser("list", help="a tenant's experiments")
    ls.add_argument("--tenant", default="demo")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_list)

    for action in ("stop", "resume"):
        toggle = sub.add_parser(action, help=f"{action} an experiment (answers accepted/refused)")
        toggle.add_argument("experiment")
        toggle.add_argument("--tenant", default="demo")
        toggle.set_defaults(handler=cmd_toggle, action=action)


def build_input(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The workflow input, with the experiment settings as its `options` defaults."""
    if args.file:
        body = json.loads(Path(args.file).read_text())
    else:
        evals: list[dict[str, Any]] = [{"kind": k} for k in (args.evals or ["exact_match"])]
        if args.judge:
            evals.append({"kind": "llm_judge", "model_group": args.judge, "rubric": args.rubric})
        body = {
            "tenant_id": args.tenant,
            "dataset": {"path": args.dataset or "deploy/datasets/arithmetic.jsonl"},
            "task": {"model_group": args.model_group, "prompt_template": args.template},
            "evals": evals,
        }
    if args.experiment_id:
        body["experiment_id"] = args.experiment_id
    body.setdefault("experiment_id", f"exp-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.name:
        body["name"] = args.name
    s = settings.experiments
    body.setdefault("max_concurrency", args.max_concurrency or s.max_concurrency)
    options = {name: getattr(s, name) for name in ExperimentOptions.model_fields}
    body["options"] = {**options, **body.get("options", {})}
    try:
        ExperimentInput.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error("Experiment", exc) from None
    return body


async def _workflow_id(settings: Settings, tenant: str, experiment: str) -> str:
    """The experiment's workflow id: recorded in PostgreSQL; else the id itself."""
    pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=1)
    try:
        found = await find_workflow_id(pool, tenant, experiment)
    finally:
        await pool.close()
    return found or experiment


async def _progress(client: Client, workflow_id: str) -> ExperimentProgress:
    try:
        return await client.get_workflow_handle(workflow_id).query(Experiment.progress)
    except RPCError as exc:
        raise NotFound(
            f"no experiment workflow {workflow_id!r}: {exc.message}; "
            "see `konstruct experiments list`"
        ) from None


def cmd_start(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    body = build_input(args, settings)

    async def start() -> int:
        client = await client_of(settings)
        workflow_id = body["experiment_id"]
        await client.start_workflow(
            Experiment.run,
            body,
            id=workflow_id,
            task_queue=settings.temporal.task_queue,
            static_summary=f"experiment {body['experiment_id']} ({body['task']['model_group']})",
        )
        print(f"started experiment {body['experiment_id']} (workflow id {workflow_id})")
        print(f"  watch: konstruct experiments watch {body['experiment_id']}")
        if args.watch:
            return await _watch(client, workflow_id, 1.0)
        return 0

    return run_async(start())


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render(p: ExperimentProgress) -> str:
    done = p.evaluated + p.failed
    eta = f"ETA {p.eta_s:5.0f}s" if p.eta_s is not None else "ETA     -"
    throttled = sum(x.throttled_per_s for x in p.providers)
    breakers = ",".join(f"{x.provider}:{x.breaker}" for x in p.providers) or "-"
    rates = ",".join(f"{x.provider}:{x.rate_rps:.1f}/s" for x in p.providers) or "-"
    line = (
        f"{p.status:<9} {_bar(done, p.total)} {done}/{p.total} failed {p.failed}"
        f" in-flight {p.in_flight} {p.items_per_s:6.1f} items/s {eta}"
        f" 429/s {throttled:.1f} rate {rates} breaker {breakers}"
    )
    if p.paused_reason:
        line += f"\n  paused: {p.paused_reason}"
    if p.last_refusal is not None:
        line += f"\n  last refused {p.last_refusal.action}: {p.last_refusal.reason}"
    return line


async def _watch(client: Client, workflow_id: str, interval: float) -> int:
    tty = sys.stdout.isatty()
    while True:
        p = await _progress(client, workflow_id)
        text = render(p)
        if tty:
            sys.stdout.write("\r\x1b[J" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if p.status in ("completed", "failed", "stopped"):
            break
        await asyncio.sleep(interval)
    sys.stdout.write("\n")
    if p.status == "completed":
        try:
            result = await client.get_workflow_handle_for(Experiment.run, workflow_id).result()
        except WorkflowFailureError as exc:
            print(f"error: {failure_message(exc)}", file=sys.stderr)
            return 1
        for e in result.summary.evals:
            print(f"  {e.name:<16} mean {e.mean} pass rate {e.pass_rate} ({e.scored} scored)")
        lat = result.summary.latency
        print(f"  latency p50/p95/p99 ms: {lat.p50_ms} / {lat.p95_ms} / {lat.p99_ms}")
        print(f"  registry run {result.registry_run_id}")
    return 0 if p.status != "failed" else 1


def cmd_watch(args: argparse.Namespace) -> int:
    settings = settings_of(args)

    async def watch() -> int:
        workflow_id = await _workflow_id(settings, args.tenant, args.experiment)
        return await _watch(await client_of(settings), workflow_id, args.interval)

    return run_async(watch())


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_of(args)

    async def show() -> dict[str, Any]:
        pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=1)
        try:
            return await experiment_detail(pool, args.tenant, args.experiment)
        finally:
            await pool.close()

    data = run_async(show())
    if args.json:
        print_json(data)
        return 0
    print(f"{data['experiment_id']}  {data['name']}  {data['status']}  {data['total']} items")
    for item in data["items"]:
        scores = " ".join(
            f"{k}={v.get('score')}" for k, v in item["scores"].items() if isinstance(v, dict)
        )
        output = (item["output"] or item["error"] or "").replace("\n", " ")[:40]
        print(f"  {item['item_id']:<14} {item['status']:<8} {output:<40} {scores}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_of(args)

    async def ls() -> list[dict[str, Any]]:
        pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=1)
        try:
            return await list_experiments(pool, args.tenant)
        finally:
            await pool.close()

    rows = run_async(ls())
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"tenant {args.tenant!r} has no experiments")
    for r in rows:
        print(
            f"{r['experiment_id']:<28} {r['status']:<10} {r['results']:>6}/{r['total']:<6}"
            f" {r['name']}"
        )
    return 0


def cmd_toggle(args: argparse.Namespace) -> int:
    settings = settings_of(args)

    async def toggle() -> int:
        workflow_id = await _workflow_id(settings, args.tenant, args.experiment)
        client = await client_of(settings)
        handle = client.get_workflow_handle(workflow_id)
        update = Experiment.request_stop if args.action == "stop" else Experiment.request_resume
        try:
            result = await handle.execute_update(update, ToggleInput(by="cli"))
        except RPCError as exc:
            try:
                status = (await handle.describe()).status
            except RPCError:
                raise NotFound(f"no experiment workflow {workflow_id!r}: {exc.message}") from None
            word = status.name.lower() if status is not None else "closed"
            print(f"{args.action} refused: the experiment's workflow is {word}")
            return 1
        word = "accepted" if result.accepted else "refused"
        print(f"{args.action} {word}: {result.reason} (status {result.status})")
        return 0 if result.accepted else 1

    return run_async(toggle())
