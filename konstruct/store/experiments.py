"""The experiments' SQL: experiments, their items and results, summaries.

Read by the experiment activities and the CLI alike; every statement runs
inside `db.tenant_transaction`, so row-level security scopes it to a tenant.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from pydantic import TypeAdapter

from konstruct.db import tenant_transaction
from konstruct.errors import NotFound
from konstruct.models.experiments import (
    EvalSpec,
    EvalSummary,
    ExperimentSummary,
    LatencyStats,
    eval_name,
)

_EVALS = TypeAdapter(list[EvalSpec])


async def latency_stats(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> LatencyStats:
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
        latency=await latency_stats(conn, tenant_id, experiment_id),
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


async def find_workflow_id(pool: asyncpg.Pool, tenant_id: str, experiment_id: str) -> str | None:
    """The workflow id recorded for an experiment, if PostgreSQL has the experiment."""
    async with tenant_transaction(pool, tenant_id) as conn:
        found = await conn.fetchval(
            "select workflow_id from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
    return None if found is None else str(found)


async def experiment_detail(
    pool: asyncpg.Pool, tenant_id: str, experiment_id: str
) -> dict[str, Any]:
    """The experiment with one row per item (what `experiments show --json` prints)."""
    async with tenant_transaction(pool, tenant_id) as conn:
        exp = await conn.fetchrow(
            "select * from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
        if exp is None:
            raise NotFound(
                f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist;"
                " see `konstruct experiments list`"
            )
        rows = await conn.fetch(experiment_rows_query(), tenant_id, experiment_id)
    return {
        "experiment_id": exp["experiment_id"],
        "tenant_id": exp["tenant_id"],
        "name": exp["name"],
        "status": exp["status"],
        "workflow_id": exp["workflow_id"],
        "total": exp["total"],
        "spec": json.loads(exp["spec"]),
        "summary": json.loads(exp["summary"]) if exp["summary"] else None,
        "registry_run_id": str(exp["registry_run_id"]) if exp["registry_run_id"] else None,
        "items": [row_json(r) for r in rows],
    }


async def list_experiments(pool: asyncpg.Pool, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's experiments, newest first, with how many results each has."""
    async with tenant_transaction(pool, tenant_id) as conn:
        rows = await conn.fetch(
            "select e.experiment_id, e.name, e.status, e.total, e.created_at,"
            " e.workflow_id, (select count(*) from experiment_results r"
            " where r.tenant_id = e.tenant_id and r.experiment_id = e.experiment_id)"
            " as results from experiments e where e.tenant_id = $1"
            " order by e.created_at desc",
            tenant_id,
        )
    return [dict(r) for r in rows]
