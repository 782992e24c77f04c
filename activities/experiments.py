"""Activities that touch the experiment tables: load, page, monitor, stop, summarise.

Items and results live here, in PostgreSQL, never in workflow state: the
workflow handles ids and counters only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.service import RPCError

from activities.base import ActivityClass, heartbeating
from konstruct.agents.store.agents import select_agent
from konstruct.config import ExperimentSettings
from konstruct.experiments import models as models
from konstruct.experiments import views
from konstruct.experiments.datasets import items_digest, load_items
from konstruct.experiments.store import budgets, results, summaries
from konstruct.experiments.store import experiments as store
from konstruct.experiments.trajectory import check_agent_items
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import InvalidInput, UnknownAgent, UnknownTenant
from konstruct.platform.naming import ProviderQueue, registry_run_id
from konstruct.providers.control import declared_bounds
from konstruct.providers.queue_limits import push_rate
from konstruct.providers.router import Deployment, RouterConfig
from konstruct.providers.store import ensure_provider, provider_statuses
from konstruct.registry.models import NewRun
from konstruct.registry.store import record_run


def _routes(deployments: list[Deployment]) -> list[models.Route]:
    return [models.Route(deployment_id=d.deployment_id, provider=d.provider) for d in deployments]


async def _waiting_calls(workflow_id: str) -> list[str]:
    description = await activity.client().get_workflow_handle(workflow_id).describe()
    return [
        p.activity_id
        for p in description.raw_description.pending_activities
        if p.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
    ]


def _spec_and_digest(
    exp: models.ExperimentInput, items: list[models.DatasetItem]
) -> tuple[dict[str, Any], str]:
    """The stored spec, and the digest that tells a re-run of it from a new experiment."""
    spec_json: dict[str, Any] = {
        "task": exp.task.model_dump(mode="json"),
        "evals": [e.model_dump(mode="json") for e in exp.evals],
        "dataset": {"path": exp.dataset.path}
        if exp.dataset.path is not None
        else {"inline": len(items)},
    }
    if exp.epochs > 1:
        # Only then: the digest of every single-epoch experiment stays as it was.
        spec_json["epochs"] = exp.epochs
    digest = hashlib.sha256(
        (json.dumps(spec_json, sort_keys=True) + items_digest(items)).encode()
    ).hexdigest()
    return spec_json, digest


async def _check_new_or_same(
    conn: asyncpg.Connection, exp: models.ExperimentInput, digest: str
) -> None:
    """The tenant exists, and the experiment id is new or holds this same spec."""
    if not await store.tenant_exists(conn, exp.tenant_id):
        raise InvalidInput(
            f"tenant_id: tenant {exp.tenant_id!r} does not exist; create it with "
            f"`konstruct agents put {exp.tenant_id} AGENT ...`",
            ["tenant_id"],
        )
    existing = await store.spec_digest(conn, exp.tenant_id, exp.experiment_id)
    if existing is not None and existing != digest:
        raise InvalidInput(
            f"experiment_id: experiment {exp.experiment_id!r} already exists with a "
            "different task, evals or dataset; choose a new experiment_id",
            ["experiment_id"],
        )


class ExperimentActivities(ActivityClass):
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

    def _deployments(self, group: str, field: str) -> list[Deployment]:
        """The active deployments of a model group, in a stable order."""
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
        return deployments

    @activity.defn(name="experiment_prepare")
    async def prepare(self, input: models.PrepareInput) -> models.PrepareResult:
        """Validate groups and dataset, store the items once, set up each provider's rate."""
        exp = input.experiment
        group = exp.task.model_group or await self._agent_group(exp)
        field = "task.model_group" if exp.task.model_group else "task.agent"
        task_deployments = self._deployments(group, field)
        judge_deployments = self._judge_deployments(exp)
        items = load_items(exp.dataset, self.base_dir, exp.task.prompt_template)
        if exp.task.agent is not None:
            check_agent_items(items)
        spec_json, digest = _spec_and_digest(exp, items)
        async with tenant_transaction(self.pool, exp.tenant_id) as conn:
            await _check_new_or_same(conn, exp, digest)
            counts = await store.store_experiment(
                conn,
                exp.tenant_id,
                exp.experiment_id,
                name=exp.name or exp.experiment_id,
                spec=spec_json,
                digest=digest,
                workflow_id=input.workflow_id,
                items=items,
                epochs=exp.epochs,
                on_batch=activity.heartbeat,
            )
            budget = exp.budget or models.BudgetSpec()
            await budgets.configure(
                conn,
                exp.tenant_id,
                exp.experiment_id,
                cache=exp.cache,
                max_usd=budget.max_usd,
                max_tokens=budget.max_tokens,
            )
            spent = await summaries.spend_figures(conn, exp.tenant_id, exp.experiment_id)
        providers = await self._setup_providers(
            task_deployments + [d for judges in judge_deployments.values() for d in judges]
        )
        return models.PrepareResult(
            total=len(items) * exp.epochs,
            completed=counts.completed,
            failed=counts.failed,
            evaluated=counts.evaluated,
            **{name: spent[name] for name in models.SpendTotals.model_fields},
            task_routes=_routes(task_deployments),
            judge_routes={name: _routes(judges) for name, judges in judge_deployments.items()},
            providers=providers,
        )

    async def _agent_group(self, exp: models.ExperimentInput) -> str:
        """An agent task's model group: the agent's own (it must exist)."""
        assert exp.task.agent is not None
        try:
            async with tenant_transaction(self.pool, exp.tenant_id) as conn:
                agent = await select_agent(conn, exp.tenant_id, exp.task.agent)
        except (UnknownAgent, UnknownTenant) as exc:
            raise InvalidInput(f"task.agent: {exc}", ["task.agent"]) from None
        return agent.model_group

    def _judge_deployments(self, exp: models.ExperimentInput) -> dict[str, list[Deployment]]:
        """Each llm_judge eval's deployments, by eval name."""
        return {
            models.eval_name(spec): self._deployments(
                spec.model_group, f"evals.{index}.model_group"
            )
            for index, spec in enumerate(exp.evals)
            if spec.kind == "llm_judge"
        }

    async def _setup_providers(self, deployments: list[Deployment]) -> list[str]:
        """Each provider's row exists and the server dispatches its queue at its rate."""
        base = self._base_queue()
        providers: dict[str, Deployment] = {}
        for d in deployments:
            providers.setdefault(d.provider, d)
        for provider, d in sorted(providers.items()):
            bounds = declared_bounds(
                d.limits, self.settings.aimd_config(), self.settings.initial_rps
            )
            async with self.pool.acquire() as conn:
                rate = await ensure_provider(conn, base, provider, bounds)
            try:
                await push_rate(
                    activity.client(), ProviderQueue(base, provider).name, rate, "prepare"
                )
            except RPCError as exc:  # each worker's reconcile loop pushes it again
                activity.logger.warning("could not push rate for %s: %s", provider, exc)
        return sorted(providers)

    @staticmethod
    def _base_queue() -> str:
        return activity.info().task_queue

    @activity.defn(name="experiment_pending_page")
    async def pending_page(self, input: models.PendingPageInput) -> models.PendingPage:
        """Items after `after_seq` that have no complete result, in dataset order."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            items = await store.pending_items(
                conn, input.tenant_id, input.experiment_id, input.after_seq, input.limit
            )
        return models.PendingPage(items=items)

    @activity.defn(name="experiment_record_failure")
    async def record_failure(self, input: models.RecordFailureInput) -> bool:
        """An item whose calls gave up: a failed result, unless one is stored already.
        False when it could not be recorded (the item is not in the experiment)."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            return await results.record_failure(
                conn,
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                input.error_kind,
                input.error,
            )

    @activity.defn(name="experiment_result_count")
    async def result_count(self, input: models.ResultCountInput) -> models.ResultCount:
        """How many of the experiment's items PostgreSQL holds a result for."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            total, with_result = await results.result_count(
                conn, input.tenant_id, input.experiment_id
            )
        return models.ResultCount(total=total, with_result=with_result)

    @activity.defn(name="experiment_set_stop_flag")
    async def set_stop_flag(self, input: models.StopFlagInput) -> models.StopFlagResult:
        """Raise or clear the stop flag; list the calls that still wait for capacity."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await store.set_stop_flag(conn, input.tenant_id, input.experiment_id, input.stopped)
            if input.stopped:
                await budgets.mark_paused(conn, input.tenant_id, input.experiment_id)
            else:
                # It resumes only once nothing is in flight: what is still reserved was
                # left by a dead worker's calls.
                await budgets.release_all(
                    conn, input.tenant_id, input.experiment_id, clear_pause=True
                )
        if not (input.stopped and input.cancel_waiting):
            return models.StopFlagResult()
        # From here on a call that starts finds the flag and makes no request; one
        # not started yet can be cancelled outright, one started is left to finish.
        return models.StopFlagResult(waiting_activity_ids=await _waiting_calls(input.workflow_id))

    @activity.defn(name="experiment_record_status")
    async def record_status(self, input: models.StatusInput) -> None:
        """The workflow's status on the experiment's row, so `list` and `show` say
        what `watch`, the search attribute and the Web UI say."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            await store.record_status(conn, input.tenant_id, input.experiment_id, input.status)

    @activity.defn(name="experiment_waiting_calls")
    async def waiting_calls(self, input: models.WaitingCallsInput) -> models.WaitingCalls:
        """The calls of a run still waiting for capacity (scheduled, not started)."""
        return models.WaitingCalls(activity_ids=await _waiting_calls(input.workflow_id))

    @activity.defn(name="experiment_monitor")
    async def monitor(self, input: models.MonitorInput) -> models.MonitorResult:
        """Rate and breaker of each provider used, and the latency percentiles so far."""
        async with self.pool.acquire() as conn:
            statuses = await provider_statuses(
                conn, self._base_queue(), input.providers, self.settings.breaker_config()
            )
        latency = models.LatencyStats()
        budget = None
        if input.with_latency:
            async with tenant_transaction(self.pool, input.tenant_id) as conn:
                latency = await summaries.latency_stats(conn, input.tenant_id, input.experiment_id)
                budget = await budgets.status(conn, input.tenant_id, input.experiment_id)
        return models.MonitorResult(
            providers=[
                models.ProviderProgress(
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
            budget=budget,
        )

    @activity.defn(name="experiment_finalize")
    async def finalize(self, input: models.FinalizeInput) -> models.ExperimentSummary:
        """The summary, stored on the experiment and recorded as a registry run (once).
        Heartbeats while it runs: an attempt whose answer never reached the server is
        retried within the heartbeat timeout, not the two minutes of its own."""
        return await heartbeating(self._finalize(input), self.settings.heartbeat_every_s)

    async def _finalize(self, input: models.FinalizeInput) -> models.ExperimentSummary:
        run_id = registry_run_id(input.tenant_id, input.experiment_id)
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            # Nothing is in flight any more: give back what dead workers' calls held.
            await budgets.release_all(conn, input.tenant_id, input.experiment_id, clear_pause=True)
            summary = await summaries.summarise(conn, input.tenant_id, input.experiment_id)
            summary.status = input.status
            summary.name = input.name
            summary.registry_run_id = run_id
            summary.unfinished = max(0, summary.total - summary.completed - summary.failed)
            summary.incomplete_reason = input.reason
            await record_run(
                conn,
                input.tenant_id,
                NewRun(
                    run_id=run_id,
                    kind="experiment",
                    name=input.name,
                    owner="user",
                    params={"experiment_id": input.experiment_id, **input.params},
                    metrics=views.summary_metrics(summary),
                ),
                "success" if input.status == "completed" else input.status,
                input.workflow_id,
                input.workflow_run_id,
            )
            await store.store_summary(conn, input.tenant_id, input.experiment_id, summary, run_id)
        return summary
