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
from konstruct.naming import registry_run_id
from konstruct.router import Deployment, RouterConfig
from konstruct.store.experiments import latency_stats, summarise, summary_metrics
from konstruct.store.providers import (
    breaker_config,
    ensure_provider,
    provider_queue,
    provider_statuses,
    push_rate,
)
from konstruct.validation import to_application_error

_EVALS = TypeAdapter(list[EvalSpec])
_INSERT_BATCH = 2000


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
                latency = await latency_stats(conn, input.tenant_id, input.experiment_id)
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
