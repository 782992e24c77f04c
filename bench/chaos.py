"""Chaos soak: a mixed workload on a self-healing stack while its processes are killed.

Starts `konstruct up --detach --workers 2` in a temporary directory (exactly as a
user does), then for `--seconds`:

  messages     HandleMessage at `--rate` a second, spread over three tenants
  experiments  three Experiments of `--items` items each, started at once
  demo         DemoCascade runs one after another

while it kills a random worker with `kill -9` every 20-60 s, and every third
fault the dev server or PostgreSQL instead; the stack's supervisor restarts
each. Then it lets the work finish and checks every invariant against
PostgreSQL and Temporal:

  - each message stored once (`message_turns`), with the reply its workflow returned;
  - each experiment exactly one result per item, its summary equal to PostgreSQL's rows;
  - after every demo run, `demo-production` on the champion it recorded (or where
    it was before the run when none was recorded);
  - no workflow left running;
  - no workflow ended failed, timed out, terminated or cancelled, none answered in a
    degraded way (a message's fallback reply, an experiment item failed or left
    without a result, a demo step that did not pass): an outage is outlasted, never
    reported.

It prints faults injected, workflows run, lost, duplicated and failed (all must be 0),
and the longest time from a fault to the next completed piece of work.

    .venv/bin/python bench/chaos.py                 # 10 minutes; bench/results/chaos.json
    .venv/bin/python bench/chaos.py --seconds 120 --items 200 --fault-interval 8,15 --no-write
                                                    # the suite's two-minute version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle  # noqa: E402
from temporalio.service import RPCError  # noqa: E402

from bench.stack_bench import write_stack_config  # noqa: E402
from konstruct.agents.models import AgentProfile  # noqa: E402
from konstruct.agents.store.agents import put_agent  # noqa: E402
from konstruct.app.stack import read_status  # noqa: E402
from konstruct.config import Settings, load_settings  # noqa: E402
from konstruct.platform import db  # noqa: E402
from konstruct.platform.temporal.client import connect  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "chaos.json"
TENANTS = ("demo", "chaos-a", "chaos-b")
KONSTRUCT = [sys.executable, "-m", "konstruct.app.cli"]


@dataclass
class Soak:
    settings: Settings
    config: Path
    started: float = field(default_factory=time.monotonic)
    faults: list[dict[str, Any]] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    # Completed messages only: each needs a worker, the dev server and PostgreSQL.
    messages_done_at: list[float] = field(default_factory=list)
    messages: dict[str, tuple[str, str]] = field(default_factory=dict)  # wf id -> tenant, msg
    replies: dict[str, str] = field(default_factory=dict)  # wf id -> reply returned
    degraded: list[str] = field(default_factory=list)  # wf ids answered with the fallback
    message_errors: list[str] = field(default_factory=list)
    demos: list[dict[str, Any]] = field(default_factory=list)
    experiments: dict[str, int] = field(default_factory=dict)  # id -> items
    never_up: list[str] = field(default_factory=list)  # targets that did not come back
    client: Client | None = None
    until: float = 0.0  # the workload runs at least until then ...
    min_faults: int = 0  # ... and until this many faults were injected

    def on(self) -> bool:
        """Whether the workload goes on: its time is not over, or its faults are not
        (unless a killed child never came back: then nothing more is to be learnt)."""
        if self.never_up:
            return False
        return time.monotonic() < self.until or len(self.faults) < self.min_faults

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def log(self, line: str) -> None:
        print(f"[{self.now():7.1f}s] {line}", flush=True)

    async def connect(self) -> Client:
        while True:
            try:
                return await connect(self.settings)
            except Exception as exc:  # the dev server may be restarting
                self.log(f"connect: {exc}")
                await asyncio.sleep(1)


async def patiently(soak: Soak, what: str, call: Any, give_up_s: float = 300) -> Any:
    """Retry a Temporal call through restarts of the dev server."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await call()
        except RPCError as exc:
            if time.monotonic() > deadline:
                raise
            soak.log(f"{what}: {exc.status.name} ({exc.message[:80]}); again in 1 s")
            await asyncio.sleep(1)


# --- workload ------------------------------------------------------------------------


async def send_messages(soak: Soak, client: Client, rate: float) -> None:
    from workflows.handle_message import HandleMessage

    async def one(tenant: str, message_id: str) -> None:
        workflow_id = f"msg-{tenant}-{message_id}"
        body = {
            "message_id": message_id,
            "tenant_id": tenant,
            "agent_id": "assistant",
            "thread_id": f"chaos-{tenant}",
            "channel": "chaos",
            "sender": "soak",
            "text": f"Message {message_id}: what are you?",
        }
        soak.messages[workflow_id] = (tenant, message_id)

        async def start() -> WorkflowHandle:
            try:
                return await client.start_workflow(
                    HandleMessage.run,
                    body,
                    id=workflow_id,
                    task_queue=soak.settings.temporal.task_queue,
                )
            except Exception as exc:
                if "already started" in str(exc).lower():
                    return client.get_workflow_handle_for(HandleMessage.run, workflow_id)
                raise

        handle = await patiently(soak, f"start {workflow_id}", start)
        result = await patiently(soak, f"result {workflow_id}", handle.result, give_up_s=600)
        soak.replies[workflow_id] = result.response
        if result.degraded:
            soak.degraded.append(workflow_id)
        soak.done_at.append(time.monotonic())
        soak.messages_done_at.append(time.monotonic())

    tasks: list[asyncio.Task] = []
    n = 0
    while soak.on():
        tenant = TENANTS[n % len(TENANTS)]
        tasks.append(asyncio.create_task(one(tenant, f"c{n:05d}-{uuid.uuid4().hex[:4]}")))
        n += 1
        await asyncio.sleep(1 / rate)
    for task in asyncio.as_completed(tasks):
        try:
            await task
        except Exception as exc:
            soak.message_errors.append(str(exc)[:200])


async def run_experiments(soak: Soak, client: Client, items: int) -> list[Any]:
    from workflows.experiment import Experiment

    handles = []
    for k in range(3):
        experiment_id = f"chaos-exp-{k}-{uuid.uuid4().hex[:6]}"
        body = {
            "experiment_id": experiment_id,
            "tenant_id": "demo",
            "dataset": {
                "items": [
                    {"id": f"i{i:05d}", "input": f"What is {i} + {k}?", "expected": str(i + k)}
                    for i in range(items)
                ]
            },
            "task": {"model_group": "fast", "prompt_template": "Answer with a number: {input}"},
            "evals": [{"kind": "exact_match"}],
            "max_concurrency": 20,
        }
        soak.experiments[experiment_id] = items
        handles.append(
            await patiently(
                soak,
                "start experiment",
                lambda b=body: client.start_workflow(
                    Experiment.run,
                    b,
                    id=b["experiment_id"],
                    task_queue=soak.settings.temporal.task_queue,
                ),
            )
        )
    waiting = asyncio.create_task(log_waits(soak, handles))
    try:
        return [
            await patiently(soak, "experiment result", h.result, give_up_s=1200) for h in handles
        ]
    finally:
        waiting.cancel()


async def log_waits(soak: Soak, handles: list[WorkflowHandle[Any, Any]]) -> None:
    """Every 10 s, what each running experiment waits on: its pending activities
    (type, attempt, state, last failure), so a slow tail after the faults says why
    (two soaks of 172-175 s spent 105 s waiting for the last items, unexplained)."""
    from temporalio.api.enums.v1 import PendingActivityState

    while True:
        await asyncio.sleep(10)
        for handle in handles:
            try:
                described = await handle.describe()
            except Exception as exc:  # the dev server may be restarting
                soak.log(f"{handle.id}: not described: {str(exc)[:80]}")
                continue
            if described.status != WorkflowExecutionStatus.RUNNING:
                continue
            pending = described.raw_description.pending_activities
            waits = "; ".join(
                f"{p.activity_type.name} attempt {p.attempt}"
                f" {PendingActivityState.Name(p.state)} {p.last_failure.message[:80]!r}"
                for p in pending[:4]
            )
            soak.log(f"{handle.id}: {len(pending)} activities pending: {waits}")


async def alias_run(pool: asyncpg.Pool) -> str | None:
    """Where `demo-production` points, read through restarts of PostgreSQL."""
    for _ in range(120):
        try:
            async with db.tenant_transaction(pool, "demo") as conn:
                value = await conn.fetchval(
                    "select run_id from registry_aliases"
                    " where tenant_id = 'demo' and alias = 'demo-production'"
                )
            return None if value is None else str(value)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(1)
    raise RuntimeError("PostgreSQL did not come back within two minutes")


async def run_demos(soak: Soak, client: Client, pool: asyncpg.Pool) -> None:
    from workflows.demo_cascade import DemoCascade

    k = 0
    while soak.on():
        workflow_id = f"demo-chaos-{k}-{uuid.uuid4().hex[:4]}"
        body = {"scenario": "demo_minimal", "seed": k, "approval": "auto", "fail_at": None}
        handle = await patiently(
            soak,
            "start demo",
            lambda b=body, w=workflow_id: client.start_workflow(
                DemoCascade.run, b, id=w, task_queue=soak.settings.temporal.task_queue
            ),
        )
        try:
            result = await patiently(soak, "demo result", handle.result, give_up_s=600)
        except Exception as exc:
            soak.demos.append({"id": workflow_id, "error": str(exc)[:200], "invariant": None})
            k += 1
            continue
        expected = result.champion_run_id or result.pre_run_alias_run_id
        actual = await alias_run(pool)
        soak.demos.append(
            {"id": workflow_id, "status": result.overall_status, "invariant": actual == expected}
        )
        soak.done_at.append(time.monotonic())
        k += 1


async def watch_results(soak: Soak, pool: asyncpg.Pool, until_done: asyncio.Event) -> None:
    """Each second an experiment stored more results counts as completed work."""
    last = 0
    while not until_done.is_set():
        try:
            async with db.tenant_transaction(pool, "demo") as conn:
                count = await conn.fetchval(
                    "select count(*) from experiment_results where experiment_id like 'chaos-exp-%'"
                )
            if count > last:
                soak.done_at.append(time.monotonic())
                last = count
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # PostgreSQL is being restarted
        await asyncio.sleep(1)


# --- faults --------------------------------------------------------------------------


async def inject_faults(soak: Soak, rng: random.Random, interval: tuple[float, float]) -> None:
    """Kill a child with `kill -9` every `interval` seconds while the workload runs:
    two workers for each restart of the dev server or PostgreSQL, alternately. A
    target that is not up yet (still restarting from the last fault) is waited for,
    not skipped, so the count of faults does not depend on how fast this machine
    restarts things."""
    n = 0
    while soak.on():
        await asyncio.sleep(rng.uniform(*interval))
        if not soak.on():
            return
        n += 1
        if n % 3 == 0:
            target = "temporal" if (n // 3) % 2 else "postgres"
        else:
            workers = [c["name"] for c in status_children(soak) if c["name"].startswith("worker")]
            target = rng.choice(workers or ["worker"])
        child = await up_again(soak, target)
        if child is None:
            soak.log(f"fault {n}: {target} did not come up within two minutes")
            soak.never_up.append(target)
            return
        os.kill(child["pid"], signal.SIGKILL)
        soak.faults.append({"at": time.monotonic(), "target": target, "pid": child["pid"]})
        soak.log(f"fault {n}: kill -9 {target} (pid {child['pid']})")


def status_children(soak: Soak) -> list[dict[str, Any]]:
    return list((read_status(soak.settings) or {}).get("children", []))


async def up_again(soak: Soak, target: str, give_up_s: float = 120) -> dict[str, Any] | None:
    """The target's status once it runs. The status file says "up" until the
    supervisor notices an exit, which it may not for seconds while it restarts
    another child: a pid already killed (a zombie, or gone) is not up."""
    deadline = time.monotonic() + give_up_s
    while True:
        child = next((c for c in status_children(soak) if c["name"] == target), None)
        if child is not None and child["state"] == "up" and alive(child["pid"]):
            return child
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)


def alive(pid: int | None) -> bool:
    """Whether the process runs (not gone, not a zombie awaiting its parent)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def healed(soak: Soak, give_up_s: float = 180) -> dict[str, Any]:
    """Wait until the supervisor has restarted every killed child (its restart count
    covers the kills against it) and each runs again; the children's counts, and
    whether they got there before `give_up_s`."""
    kills: dict[str, int] = {}
    for fault in soak.faults:
        kills[fault["target"]] = kills.get(fault["target"], 0) + 1
    deadline = time.monotonic() + give_up_s
    while True:
        children = {c["name"]: c for c in (read_status(soak.settings) or {}).get("children", [])}
        behind = [
            name
            for name, n in kills.items()
            if name not in children
            or children[name]["restarts"] < n
            or children[name]["state"] != "up"
            or not alive(children[name]["pid"])
        ]
        restarts = {name: c["restarts"] for name, c in children.items()}
        if not behind or time.monotonic() >= deadline:
            return {"healed": not behind, "not_healed": behind, "restarts": restarts}
        await asyncio.sleep(0.5)


# --- checks --------------------------------------------------------------------------


async def check(soak: Soak, pool: asyncpg.Pool, client: Client, summaries: list[Any]) -> dict:
    lost: list[str] = []
    duplicated: list[str] = []
    async with db.tenant_transaction(pool, "demo") as conn:
        for workflow_id, (tenant, message_id) in soak.messages.items():
            async with db.tenant_transaction(pool, tenant) as tconn:
                rows = await tconn.fetch(
                    "select reply_text from message_turns where tenant_id = $1 and message_id = $2",
                    tenant,
                    message_id,
                )
            if len(rows) > 1:
                duplicated.append(workflow_id)
            if not rows or workflow_id not in soak.replies:
                lost.append(workflow_id)
            elif rows[0]["reply_text"] != soak.replies[workflow_id]:
                lost.append(f"{workflow_id} (stored reply differs from the returned one)")
        for (experiment_id, items), summary in zip(
            soak.experiments.items(), summaries, strict=True
        ):
            counts = await conn.fetchrow(
                "select count(*) as n, count(distinct item_id) as d from experiment_results"
                " where experiment_id = $1",
                experiment_id,
            )
            if counts["d"] < items:
                lost.append(f"{experiment_id}: {items - counts['d']} items without a result")
            if counts["n"] != counts["d"]:
                duplicated.append(f"{experiment_id}: {counts['n'] - counts['d']} extra results")
            stated = summary.summary.completed + summary.summary.failed
            if stated != counts["n"]:
                lost.append(
                    f"{experiment_id}: summary says {stated}, PostgreSQL holds {counts['n']}"
                )
    running = [e.id async for e in client.list_workflows("ExecutionStatus = 'Running'")]
    broken = [d for d in soak.demos if d["invariant"] is not True]
    failed = await failed_workflows(soak, client, summaries)

    def gap(at: float, done: list[float]) -> float | None:
        after = [t for t in done if t > at]
        return min(after) - at if after else None

    gaps = [g for f in soak.faults if (g := gap(f["at"], soak.done_at)) is not None]
    to_message: dict[str, float] = {}
    for fault in soak.faults:
        g = gap(fault["at"], soak.messages_done_at)
        if g is not None:
            kind = "worker" if fault["target"].startswith("worker") else fault["target"]
            to_message[kind] = round(max(to_message.get(kind, 0.0), g), 1)
    return {
        "faults": len(soak.faults),
        "never_up": soak.never_up,
        "faults_by_target": {
            t: sum(1 for f in soak.faults if f["target"] == t)
            for t in sorted({f["target"] for f in soak.faults})
        },
        "workflows": {
            "messages": len(soak.messages),
            "experiments": len(soak.experiments),
            "experiment_items": sum(soak.experiments.values()),
            "demo_runs": len(soak.demos),
        },
        "lost": len(lost),
        "lost_detail": lost[:20],
        "duplicated": len(duplicated),
        "duplicated_detail": duplicated[:20],
        "message_errors": soak.message_errors[:10],
        "demo_invariant_broken": broken,
        "failed": len(failed),
        "failed_detail": failed[:20],
        "still_running": running,
        "longest_fault_to_next_work_s": round(max(gaps), 1) if gaps else None,
        # The next message answered end to end after each kind of fault (its workflow
        # started before or after the fault): the stack's recovery, not other work.
        "longest_fault_to_next_message_s": to_message,
    }


# How a workflow may end; any other end (failed, timed out, terminated, cancelled)
# is a broken invariant.
_ENDED_WELL = (WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.CONTINUED_AS_NEW)


async def failed_workflows(soak: Soak, client: Client, summaries: list[Any]) -> list[str]:
    """Every workflow of the soak (children too) that did not end well, and every answer
    that came back degraded: a fault must delay work, never fail it."""
    failed = [
        f"{e.workflow_type} {e.id}: {e.status.name.lower() if e.status else 'unknown'}"
        async for e in client.list_workflows("ExecutionStatus != 'Running'")
        if e.status not in _ENDED_WELL
    ]
    failed += [f"HandleMessage {w}: answered the fallback reply" for w in soak.degraded]
    failed += [
        f"Experiment {s.summary.experiment_id}: {s.summary.status},"
        f" {s.summary.failed} items failed, {s.summary.unfinished} without a result"
        for s in summaries
        if s.summary.status != "completed" or s.summary.failed or s.summary.unfinished
    ]
    failed += [
        f"DemoCascade {d['id']}: overall {d['status']}"
        for d in soak.demos
        if d.get("status") not in (None, "pass")
    ]
    return failed


async def soak_run(args: argparse.Namespace, config: Path) -> dict[str, Any]:
    settings = load_settings(config)
    soak = Soak(settings, config)
    client = await soak.connect()
    pool = await db.create_pool(db.app_url(settings), min_size=1, max_size=10)
    try:
        for tenant in TENANTS[1:]:
            async with db.tenant_transaction(pool, tenant) as conn:
                await put_agent(
                    conn,
                    tenant,
                    AgentProfile(
                        agent_id="assistant",
                        name="Kay",
                        role="a helpful assistant",
                        fallback_reply="Sorry, try again later.",
                    ),
                )
        soak.until = time.monotonic() + args.seconds
        soak.min_faults = args.faults
        rng = random.Random(args.seed)
        finished = asyncio.Event()
        watcher = asyncio.create_task(watch_results(soak, pool, finished))
        faults = asyncio.create_task(inject_faults(soak, rng, args.fault_interval))
        experiments = asyncio.create_task(run_experiments(soak, client, args.items))
        await asyncio.gather(send_messages(soak, client, args.rate), run_demos(soak, client, pool))
        soak.log("workload over; waiting for the experiments")
        faults.cancel()
        summaries = await experiments
        finished.set()
        await watcher
        soak.log("checking invariants")
        report = await check(soak, pool, client, summaries)
        report.update(await healed(soak))
    finally:
        await pool.close()
    report["seconds"] = args.seconds
    report["items_per_experiment"] = args.items
    report["message_rate"] = args.rate
    report["fault_interval_s"] = list(args.fault_interval)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--items", type=int, default=2000, help="items per experiment")
    parser.add_argument("--rate", type=float, default=2.0, help="messages a second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--faults",
        type=int,
        default=0,
        help="inject at least this many faults: the workload outlasts --seconds until then",
    )
    parser.add_argument(
        "--fault-interval",
        default="20,60",
        help="seconds between faults, MIN,MAX (every third fault: the dev server or PostgreSQL)",
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    parser.add_argument("--json-out", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.seconds <= 0 or args.items < 1 or args.rate <= 0 or args.faults < 0:
        parser.error("--seconds, --items and --rate must be positive, --faults not negative")
    try:
        low, high = (float(v) for v in args.fault_interval.split(","))
    except ValueError:
        parser.error("--fault-interval: two numbers, MIN,MAX (e.g. 20,60)")
    if not 0 < low <= high:
        parser.error("--fault-interval: 0 < MIN <= MAX")
    args.fault_interval = (low, high)
    with tempfile.TemporaryDirectory(prefix="konstruct-chaos-") as tmp:
        config = write_stack_config(
            Path(tmp), ["sim-fast", "sim-quality", "sim-judge", "sim-arith", "sim-embed"]
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KONSTRUCT_", "TEMPORAL_"))}
        up = subprocess.run(
            [*KONSTRUCT, "--config", str(config), "up", "--detach", "--workers", "2"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if up.returncode != 0:
            print(up.stdout + up.stderr, file=sys.stderr)
            return 1
        try:
            report = asyncio.run(soak_run(args, config))
        finally:
            log = (Path(tmp) / "state" / "stack.log").read_text(errors="replace")
            subprocess.run([*KONSTRUCT, "--config", str(config), "down"], env=env, timeout=120)
        report["restarts_logged"] = log.count(" restarted (restart ")
    print(json.dumps(report, indent=2))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2))
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    ok = (
        report["lost"] == 0
        and report["duplicated"] == 0
        and report["failed"] == 0
        and not report["still_running"]
        and not report["demo_invariant_broken"]
        and report["healed"]
        and not report["never_up"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
