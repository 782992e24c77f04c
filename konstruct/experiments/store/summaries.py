"""What an experiment's rows add up to: its summary (the figures by
`konstruct.experiments.statistics`), latency percentiles and spend, and the rows
`experiments show` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import asyncpg

from konstruct.experiments.models import EvalSummary, ExperimentSummary, LatencyStats, eval_name
from konstruct.experiments.statistics import EvalEntry, eval_figures
from konstruct.experiments.store.budgets import status as budget_status
from konstruct.experiments.store.experiments import RESULT_OF_ITEM, StoredSpec
from konstruct.experiments.store.lookup import experiment_row


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


EVAL_ENTRIES_SQL = (
    "select i.base_id, (r.scores->$3->>'score')::float8 as score,"
    " coalesce((r.scores->$3->>'passed')::boolean, false) as passed"
    # Each result's item by its (tenant, experiment, seq) key, one lookup each: as a
    # plain join on a table not yet analysed, every item was read for each result
    # (`RESULT_OF_ITEM`).
    " from experiment_results r cross join lateral (select base_id from experiment_items i"
    " where i.tenant_id = r.tenant_id and i.experiment_id = r.experiment_id"
    " and i.seq = r.seq and i.item_id = r.item_id offset 0) i"
    " where r.tenant_id = $1 and r.experiment_id = $2 and r.status = 'ok' and r.scores ? $3"
)


async def eval_entries(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, name: str
) -> list[EvalEntry]:
    """Every `ok` result's entry for the eval `name`, with its dataset item."""
    rows = await conn.fetch(
        EVAL_ENTRIES_SQL,
        tenant_id,
        experiment_id,
        name,
    )
    return [EvalEntry(r["base_id"], r["score"], r["passed"]) for r in rows]


async def _errors_by_kind(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, exp: Any
) -> dict[str, int]:
    """Failed results by error kind, then the calls retried after a 429 or a failure."""
    errors = await conn.fetch(
        "select coalesce(error_kind, 'unknown') as kind, count(*) as n from experiment_results"
        " where tenant_id = $1 and experiment_id = $2 and status = 'failed' group by 1",
        tenant_id,
        experiment_id,
    )
    by_kind = {r["kind"]: r["n"] for r in errors}
    if exp["throttled"]:
        by_kind["RateLimited (retried)"] = exp["throttled"]
    if exp["call_failures"]:
        by_kind["provider failures (retried)"] = exp["call_failures"]
    return by_kind


async def summarise(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentSummary:
    """Per-eval figures (`statistics.eval_figures`), latency percentiles, tokens,
    errors and spend, from the rows."""
    exp = await experiment_row(
        conn,
        tenant_id,
        experiment_id,
        "name, spec, status, total, throttled, call_failures, epochs,"
        " extract(epoch from coalesce(completed_at, now()) - created_at) as duration",
    )
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
    for spec in StoredSpec.from_json(exp["spec"]).evals:
        name = eval_name(spec)
        entries = await eval_entries(conn, tenant_id, experiment_id, name)
        figures = eval_figures(entries, exp["epochs"])
        summaries.append(EvalSummary(name=name, kind=spec.kind, **dataclasses.asdict(figures)))
    calls = counts["completed"] + exp["throttled"] + exp["call_failures"]
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
        errors_by_kind=await _errors_by_kind(conn, tenant_id, experiment_id, exp),
        providers={
            "calls": {
                "throttled": float(exp["throttled"]),
                "failures": float(exp["call_failures"]),
                "throttled_share": round(exp["throttled"] / calls, 4) if calls else 0.0,
            }
        },
        duration_s=round(float(exp["duration"]), 2),
        epochs=exp["epochs"],
        **(await spend_figures(conn, tenant_id, experiment_id)),
    )


async def spend_figures(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> dict[str, Any]:
    """What the experiment's stored results cost (task calls, judges), the calls the
    cache answered and what they had cost, and its budgets (ExperimentSummary fields)."""
    row = await conn.fetchrow(
        "select coalesce(sum(coalesce(cost_usd, 0)), 0) as task_cost,"
        " coalesce(sum(judge_cost_usd), 0) as judge_cost,"
        " coalesce(bool_and(cost_usd is not null and judge_cost_known), true) as known,"
        " coalesce(sum(cache_hits), 0) as hits, coalesce(sum(saved_usd), 0) as saved"
        " from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    return {
        "cost_usd": round(row["task_cost"] + row["judge_cost"], 9),
        "cost_known": row["known"],
        "task_cost_usd": round(row["task_cost"], 9),
        "judge_cost_usd": round(row["judge_cost"], 9),
        "cache_hits": int(row["hits"]),
        "cost_saved_usd": round(row["saved"], 9),
        "budget": await budget_status(conn, tenant_id, experiment_id),
    }


_ROW_COLUMNS = (
    "status, output, scores, latency_ms, model, provider, prompt_tokens, completion_tokens,"
    " cost_usd, judge_cost_usd, cached, error_kind, error"
)


def _rows_query(columns: str) -> str:
    """The experiment's items, each with its result (looked up by key, `RESULT_OF_ITEM`)."""
    return (
        "select i.seq, i.item_id, i.base_id, i.epoch, i.input, i.expected, "
        + ", ".join(f"r.{c.strip()}" for c in columns.split(","))
        + " from experiment_items i left join lateral "
        + RESULT_OF_ITEM.format(columns=columns)
        + " on true where i.tenant_id = $1 and i.experiment_id = $2"
    )


ROWS_SQL = _rows_query(_ROW_COLUMNS) + " order by i.seq"


async def item_row(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str, item_id: str
) -> asyncpg.Record | None:
    """One item with its result and (an agent's item) its transcript."""
    return await conn.fetchrow(
        _rows_query(_ROW_COLUMNS + ", transcript") + " and i.item_id = $3",
        tenant_id,
        experiment_id,
        item_id,
    )


@dataclass(frozen=True)
class ExperimentRows:
    """An experiment's row, its items joined with their results in dataset order,
    and what they cost (`spend_figures`): what `experiments show` prints."""

    experiment: Any
    items: list[Any]
    spend: dict[str, Any]


async def experiment_rows(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentRows:
    exp = await experiment_row(conn, tenant_id, experiment_id)
    rows = await conn.fetch(ROWS_SQL, tenant_id, experiment_id)
    spend = await spend_figures(conn, tenant_id, experiment_id)
    return ExperimentRows(exp, list(rows), spend)
