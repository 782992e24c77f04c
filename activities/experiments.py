"""Activities that touch the experiment tables: load, page, monitor, stop, summarise.

Items and results live here, in PostgreSQL, never in workflow state: the
workflow handles ids and counters only.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import TypeAdapter
from temporalio import activity
from temporalio.api.enums.v1 import PendingActivityState

from konstruct.config import ExperimentSettings
from konstruct.datasets import items_digest, load_items
from konstruct.db import tenant_transaction
from konstruct.errors import InvalidInput, KonstructError
from konstruct.models.experiments import (
    EvalSpec,
    EvalSummary,
    ExperimentSummary,
    FinalizeInput,
    LatencyStats,
    MonitorInput,
    MonitorResult,
    PendingItem,
    PendingPage,
    PendingPageInput,
    PrepareInput,
    PrepareResult,
    ProviderProgress,
    RecordFailureInput,
    Route,
    StopFlagInput,
    StopFlagResult,
    WaitingCalls,
    WaitingCallsInput,
    eval_name,
)
from konstruct.provider_store import (
    breaker_config,
    ensure_provider,
    provider_queue,
    provider_statuses,
    push_rate,
)
from konstruct.router import Deployment, RouterConfig
from konstruct.validation import to_application_error

_EVALS = TypeAdapter(list[EvalSpec])
_INSERT_BATCH = 2000
# Registry runs of experiments get a stable id: a restart records the same run.
_REGISTRY_NAMESPACE = uuid.UUID("5b0c1f0e-6d1e-4c59-9a51-6b6f6e737472")


def registry_run_id(tenant_id: str, experiment_id: str) -> str:
    return str(uuid.uuid5(_REGISTRY_NAMESPACE, f"{tenant_id}/{experiment_id}"))


async def _waiting_calls(workflow_id: str) -> list[str]:
    description = await activity.client().get_workflow_handle(workflow_id).describe()
    return [
        p.activity_id
        for p in description.raw_description.pending_activities
        if p.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
    ]


class ExperimentActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        router_config: RouterConfig,
        settings: ExperimentSettings,
        base_dir: Path,
    ) -> None:
        self.pool = pool
        self.router_config = router_config
        self.settings = settings
        self.base_dir = base_dir

    def all(self) -> list[Any]:
        return [
            self.prepare,
            self.pending_page,
            self.record_failure,
            self.set_stop_flag,
            self.waiting_calls,
            self.monitor,
            self.finalize,
        ]

    def _routes(self, group: str, field: str) -> tuple[list[Route], list[Deployment]]:
        deployments = sorted(
            (d for d in self.router_config.active() if d.model_name == group),
            key=lambda d: d.deployment_id,
        )
        if not deployments:
            known = sorted(self.router_config.groups())
            raise InvalidInput(
                f"{field}: unknown model group {group!r}; configured and active: "
                f"{', '.join(known) or 'none'} (deploy/llm-router.yaml)",
                [field],
            )
        return [Route(deployment_id=d.deployment_id, provider=d.provider) for d in deployments], (
            deployments
        )

    @activity.defn(name="experiment_prepare")
    async def prepare(self, input: PrepareInput) -> PrepareResult:
        """Validate groups and dataset, store the items once, set up each provider's rate."""
        try:
            return await self._prepare(input)
        except KonstructError as exc:
            raise to_application_error(exc) from exc

    async def _prepare(self, input: PrepareInput) -> PrepareResult:
        exp = input.experiment
        task_routes, deployments = self._routes(exp.task.model_group, "task.model_group")
        judge_routes: dict[str, list[Route]] = {}
        for index, spec in enumerate(exp.evals):
            if spec.kind == "llm_judge":
                routes, more = self._routes(spec.model_group, f"evals.{index}.model_group")
                judge_routes[eval_name(spec)] = routes
                deployments += more
        items = load_items(exp.dataset, self.base_dir)
        spec_json = {
            "task": exp.task.model_dump(mode="json"),
            "evals": [e.model_dump(mode="json") for e in exp.evals],
            "dataset": {"path": exp.dataset.path}
            if exp.dataset.path is not None
            else {"inline": len(items)},
        }
        digest = hashlib.sha256(
            (json.dumps(spec_json, sort_keys=True) + items_digest(items)).encode()
        ).hexdigest()
        async with tenant_transaction(self.pool, exp.tenant_id) as conn:
            if not await conn.fetchval("select 1 from tenants where tenant_id = $1", exp.tenant_id):
                raise InvalidInput(
                    f"tenant_id: tenant {exp.tenant_id!r} does not exist; create it with "
                    f"`konstruct agents put {exp.tenant_id} AGENT ...`",
                    ["tenant_id"],
                )
            existing = await conn.fetchrow(
                "select spec_digest from experiments where tenant_id = $1 and experiment_id = $2",
                exp.tenant_id,
                exp.experiment_id,
            )
            if existing is not None and existing["spec_digest"] != digest:
                raise InvalidInput(
                    f"experiment_id: experiment {exp.experiment_id!r} already exists with a "
                    "different task, evals or dataset; choose a new experiment_id",
                    ["experiment_id"],
                )
            await conn.execute(
                "insert into experiments (tenant_id, experiment_id, name, spec, spec_digest,"
                " workflow_id, total) values ($1, $2, $3, $4, $5, $6, $7)"
                " on conflict (tenant_id, experiment_id) do update set workflow_id = $6,"
                " status = 'running', stop_requested = false, updated_at = now()",
                exp.tenant_id,
                exp.experiment_id,
                exp.name or exp.experiment_id,
                json.dumps(spec_json),
                digest,
                input.workflow_id,
                len(items),
            )
            for start in range(0, len(items), _INSERT_BATCH):
                activity.heartbeat(start)
                batch = items[start : start + _INSERT_BATCH]
                await conn.execute(
                    "insert into experiment_items (tenant_id, experiment_id, item_id, seq, input,"
                    " expected, metadata) select $1, $2, * from unnest($3::text[], $4::int[],"
                    " $5::text[], $6::jsonb[], $7::jsonb[]) on conflict do nothing",
                    exp.tenant_id,
                    exp.experiment_id,
                    [i.id for i in batch],
                    list(range(start, start + len(batch))),
                    [i.input for i in batch],
                    [None if i.expected is None else json.dumps(i.expected) for i in batch],
                    [json.dumps(i.metadata) for i in batch],
                )
            counts = await conn.fetchrow(
                "select count(*) filter (where status = 'ok') as completed,"
                " count(*) filter (where status = 'failed') as failed,"
                " count(*) filter (where status = 'ok' and evaluated) as evaluated"
                " from experiment_results where tenant_id = $1 and experiment_id = $2",
                exp.tenant_id,
                exp.experiment_id,
            )
        providers = await self._setup_providers(deployments)
        return PrepareResult(
            total=len(items),
            completed=counts["completed"],
            failed=counts["failed"],
            evaluated=counts["evaluated"],
            task_routes=task_routes,
            judge_routes=judge_routes,
            providers=providers,
        )

    async def _setup_providers(self, deployments: list[Deployment]) -> list[str]:
        """Each provider's row exists and the server dispatches its queue at its rate."""
        base = self._base_queue()
        providers: dict[str, Deployment] = {}
        for d in deployments:
            providers.setdefault(d.provider, d)
        for provider, d in sorted(providers.items()):
            info = d.model_info
            rate = await ensure_provider(
                self.pool,
                base,
                provider,
                float(info.get("initial_rps") or self.settings.initial_rps),
                float(info.get("min_rps") or self.settings.min_rps),
                float(info.get("max_rps") or self.settings.max_rps),
            )
            await push_rate(activity.client(), provider_queue(base, provider), rate, "prepare")
        return sorted(providers)

    @staticmethod
    def _base_queue() -> str:
        return activity.info().task_queue

    @activity.defn(name="experiment_pending_page")
    async def pending_page(self, input: PendingPageInput) -> PendingPage:
        """Items after `after_seq` that have no complete result, in dataset order."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await conn.fetchval(
                "select spec from experiments where tenant_id = $1 and experiment_id = $2",
                input.tenant_id,
                input.experiment_id,
            )
            rows = await conn.fetch(
                "select i.seq, i.item_id, r.status, r.scores from experiment_items i"
                " left join experiment_results r using (tenant_id, experiment_id, item_id)"
                " where i.tenant_id = $1 and i.experiment_id = $2 and i.seq > $3"
                " and (r.item_id is null or (r.status = 'ok' and not r.evaluated))"
                " order by i.seq limit $4",
                input.tenant_id,
                input.experiment_id,
                input.after_seq,
                input.limit,
            )
        judges = [
            eval_name(e)
            for e in _EVALS.validate_python(json.loads(spec)["evals"] if spec else [])
            if e.kind == "llm_judge"
        ]
        items = []
        for r in rows:
            scores = json.loads(r["scores"]) if r["scores"] else {}
            items.append(
                PendingItem(
                    seq=r["seq"],
                    item_id=r["item_id"],
                    needs_task=r["status"] is None,
                    missing_evals=[n for n in judges if n not in scores],
                )
            )
        return PendingPage(items=items)

    @activity.defn(name="experiment_record_failure")
    async def record_failure(self, input: RecordFailureInput) -> bool:
        """An item whose calls gave up: a failed result, unless one is stored already."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            status = await conn.execute(
                "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
                " evaluated, error_kind, error) select tenant_id, experiment_id, item_id, seq,"
                " 'failed', true, $4, $5 from experiment_items"
                " where tenant_id = $1 and experiment_id = $2 and item_id = $3"
                " on conflict do nothing",
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                input.error_kind,
                input.error[:1000],
            )
            if status.endswith(" 0"):
                # A result exists: if only a judge eval gave up, the item is evaluated now.
                await conn.execute(
                    "update experiment_results set evaluated = true where tenant_id = $1"
                    " and experiment_id = $2 and item_id = $3",
                    input.tenant_id,
                    input.experiment_id,
                    input.item_id,
                )
        return True

    @activity.defn(name="experiment_set_stop_flag")
    async def set_stop_flag(self, input: StopFlagInput) -> StopFlagResult:
        """Raise or clear the stop flag; list the calls that still wait for capacity."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await conn.execute(
                "update experiments set stop_requested = $3, status = $4, updated_at = now()"
                " where tenant_id = $1 and experiment_id = $2",
                input.tenant_id,
                input.experiment_id,
                input.stopped,
                "stopping" if input.stopped else "running",
            )
        if not (input.stopped and input.cancel_waiting):
            return StopFlagResult()
        # From here on a call that starts finds the flag and makes no request; one
        # not started yet can be cancelled outright, one started is left to finish.
        return StopFlagResult(waiting_activity_ids=await _waiting_calls(input.workflow_id))

    @activity.defn(name="experiment_waiting_calls")
    async def waiting_calls(self, input: WaitingCallsInput) -> WaitingCalls:
        """The calls of a run still waiting for capacity (scheduled, not started)."""
        return WaitingCalls(activity_ids=await _waiting_calls(input.workflow_id))

    @activity.defn(name="experiment_monitor")
    async def monitor(self, input: MonitorInput) -> MonitorResult:
        """Rate and breaker of each provider used, and the latency percentiles so far."""
        statuses = await provider_statuses(
            self.pool, self._base_queue(), input.providers, breaker_config(self.settings)
        )
        latency = LatencyStats()
        if input.with_latency:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                latency = await _latency(conn, input.tenant_id, input.experiment_id)
        return MonitorResult(
            providers=[
                ProviderProgress(
                    provider=s.provider,
                    rate_rps=round(s.rate, 3),
                    initial_rps=s.initial_rate,
                    ceiling_rps=None if s.ceiling is None else round(s.ceiling, 3),
                    breaker=s.breaker,
                    consecutive_failures=s.consecutive_failures,
                    breaker_trips=s.trips,
                    cooldown_left_s=round(s.cooldown_left_s, 2),
                    ok_total=s.ok_total,
                    throttled_total=s.throttled_total,
                    failure_total=s.failure_total,
                )
                for s in statuses
            ],
            latency=latency,
            at=statuses[0].now if statuses else 0.0,
        )

    @activity.defn(name="experiment_finalize")
    async def finalize(self, input: FinalizeInput) -> ExperimentSummary:
        """The summary, stored on the experiment and recorded as a registry run (once)."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            summary = await summarise(conn, input.tenant_id, input.experiment_id)
            summary.status = input.status
            summary.name = input.name
            run_id = registry_run_id(input.tenant_id, input.experiment_id)
            summary.registry_run_id = run_id
            await conn.execute(
                "insert into registry_runs (run_id, tenant_id, kind, name, owner, status, params,"
                " metrics, workflow_id, workflow_run_id) values ($1, $2, 'experiment', $3,"
                " 'user', $4, $5, $6, $7, $8) on conflict (run_id) do update set"
                " status = excluded.status, metrics = excluded.metrics,"
                " workflow_run_id = excluded.workflow_run_id",
                uuid.UUID(run_id),
                input.tenant_id,
                input.name,
                "success" if input.status == "completed" else input.status,
                json.dumps({"experiment_id": input.experiment_id, **input.params}),
                json.dumps(summary_metrics(summary)),
                input.workflow_id,
                input.workflow_run_id,
            )
            await conn.execute(
                "update experiments set status = $3, summary = $4, registry_run_id = $5,"
                " completed_at = now(), updated_at = now()"
                " where tenant_id = $1 and experiment_id = $2",
                input.tenant_id,
                input.experiment_id,
                input.status,
                summary.model_dump_json(),
                uuid.UUID(run_id),
            )
        return summary


async def _latency(conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> LatencyStats:
    row = await conn.fetchrow(
        "select percentile_cont(array[0.5, 0.95, 0.99]) within group (order by latency_ms) as p"
        " from experiment_results where tenant_id = $1 and experiment_id = $2"
        " and latency_ms is not null",
        tenant_id,
        experiment_id,
    )
    p = row["p"] if row and row["p"] else None
    if not p:
        return LatencyStats()
    return LatencyStats(p50_ms=round(p[0], 1), p95_ms=round(p[1], 1), p99_ms=round(p[2], 1))


async def summarise(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentSummary:
    """Per-eval mean and pass rate, latency percentiles, tokens and errors, from the rows."""
    exp = await conn.fetchrow(
        "select name, spec, status, total, throttled, call_failures,"
        " extract(epoch from coalesce(completed_at, now()) - created_at) as duration"
        " from experiments where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    evals = _EVALS.validate_python(json.loads(exp["spec"])["evals"])
    counts = await conn.fetchrow(
        "select count(*) filter (where status = 'ok') as completed,"
        " count(*) filter (where status = 'failed') as failed,"
        " coalesce(sum(prompt_tokens), 0) as prompt_tokens,"
        " coalesce(sum(completion_tokens), 0) as completion_tokens"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    summaries = []
    for spec in evals:
        name = eval_name(spec)
        row = await conn.fetchrow(
            "select count(*) filter (where scores->$3->>'score' is not null) as scored,"
            " avg((scores->$3->>'score')::float8) as mean,"
            " avg(case when (scores->$3->>'passed')::boolean then 1.0 else 0.0 end)"
            " filter (where scores ? $3) as pass_rate"
            " from experiment_results where tenant_id = $1 and experiment_id = $2"
            " and status = 'ok'",
            tenant_id,
            experiment_id,
            name,
        )
        summaries.append(
            EvalSummary(
                name=name,
                kind=spec.kind,
                scored=row["scored"],
                mean=None if row["mean"] is None else round(float(row["mean"]), 4),
                pass_rate=None if row["pass_rate"] is None else round(float(row["pass_rate"]), 4),
            )
        )
    errors = await conn.fetch(
        "select coalesce(error_kind, 'unknown') as kind, count(*) as n from experiment_results"
        " where tenant_id = $1 and experiment_id = $2 and status = 'failed' group by 1",
        tenant_id,
        experiment_id,
    )
    by_kind = {r["kind"]: r["n"] for r in errors}
    calls = counts["completed"] + exp["throttled"] + exp["call_failures"]
    if exp["throttled"]:
        by_kind["RateLimited (retried)"] = exp["throttled"]
    if exp["call_failures"]:
        by_kind["provider failures (retried)"] = exp["call_failures"]
    return ExperimentSummary(
        experiment_id=experiment_id,
        tenant_id=tenant_id,
        name=exp["name"],
        status=exp["status"],
        total=exp["total"],
        completed=counts["completed"],
        failed=counts["failed"],
        evals=summaries,
        latency=await _latency(conn, tenant_id, experiment_id),
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        errors_by_kind=by_kind,
        providers={
            "calls": {
                "throttled": float(exp["throttled"]),
                "failures": float(exp["call_failures"]),
                "throttled_share": round(exp["throttled"] / calls, 4) if calls else 0.0,
            }
        },
        duration_s=round(float(exp["duration"]), 2),
    )


def summary_metrics(summary: ExperimentSummary) -> dict[str, float]:
    """Flat metrics for the registry run, comparable across experiments."""
    metrics: dict[str, float] = {
        "items": float(summary.total),
        "completed": float(summary.completed),
        "failed": float(summary.failed),
        "prompt_tokens": float(summary.prompt_tokens),
        "completion_tokens": float(summary.completion_tokens),
    }
    for e in summary.evals:
        if e.mean is not None:
            metrics[f"{e.name}.mean"] = e.mean
        if e.pass_rate is not None:
            metrics[f"{e.name}.pass_rate"] = e.pass_rate
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        value = getattr(summary.latency, key)
        if value is not None:
            metrics[f"latency_{key}"] = value
    calls = summary.providers.get("calls", {})
    metrics["throttled"] = calls.get("throttled", 0.0)
    metrics["throttled_share"] = calls.get("throttled_share", 0.0)
    if summary.duration_s is not None:
        metrics["duration_s"] = summary.duration_s
    return metrics


def experiment_rows_query() -> str:
    return (
        "select i.seq, i.item_id, i.input, i.expected, r.status, r.output, r.scores,"
        " r.latency_ms, r.model, r.provider, r.prompt_tokens, r.completion_tokens,"
        " r.error_kind, r.error from experiment_items i left join experiment_results r"
        " using (tenant_id, experiment_id, item_id)"
        " where i.tenant_id = $1 and i.experiment_id = $2 order by i.seq"
    )


def row_json(row: Any) -> dict[str, Any]:
    return {
        "item_id": row["item_id"],
        "status": row["status"] or "pending",
        "input": row["input"],
        "expected": None if row["expected"] is None else json.loads(row["expected"]),
        "output": row["output"],
        "scores": json.loads(row["scores"]) if row["scores"] else {},
        "latency_ms": row["latency_ms"],
        "model": row["model"],
        "provider": row["provider"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "error_kind": row["error_kind"],
        "error": row["error"],
    }
