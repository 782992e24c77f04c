"""What `experiments compare` and `experiments report` read: an experiment, every item
and its result, as `konstruct.experiments.records.ExperimentData`.

Results are read with `select *`, so the columns of a later migration are seen
when present and not needed when absent: `cost_usd` (the task call's cost; null
when its price is unknown) plus `judge_cost_usd` (its judges') give each item its
cost (`has_cost`), `cached` whether its output came from the output cache.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from konstruct.experiments.models import eval_name
from konstruct.experiments.records import EvalInfo, ExperimentData, ItemResult, RetrySecond
from konstruct.experiments.store.experiments import StoredSpec
from konstruct.experiments.store.lookup import experiment_row

COST_COLUMN = "cost_usd"
JUDGE_COST_COLUMN = "judge_cost_usd"
CACHED_COLUMN = "cached"


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _evals(spec_json: str) -> list[EvalInfo]:
    try:
        specs = StoredSpec.from_json(spec_json).evals
    except (ValueError, KeyError):  # a spec this version cannot read: names from the scores
        return []
    return [EvalInfo(eval_name(s), s.kind, getattr(s, "pass_threshold", None)) for s in specs]


async def load_experiment(
    conn: asyncpg.Connection, tenant_id: str, experiment_id: str
) -> ExperimentData:
    """The experiment with one `ItemResult` per dataset item, in dataset order."""
    exp = await experiment_row(
        conn,
        tenant_id,
        experiment_id,
        "experiment_id, tenant_id, name, status, total, spec, throttled, call_failures,"
        " created_at, completed_at",
    )
    items = await conn.fetch(
        "select seq, item_id, base_id, epoch, input, expected from experiment_items"
        " where tenant_id = $1 and experiment_id = $2 order by seq",
        tenant_id,
        experiment_id,
    )
    results = await conn.fetch(
        "select * from experiment_results where tenant_id = $1 and experiment_id = $2",
        tenant_id,
        experiment_id,
    )
    retries = await conn.fetch(
        "select extract(epoch from at - $3::timestamptz)::float8 as at_s, throttled,"
        " call_failures from experiment_retry_seconds"
        " where tenant_id = $1 and experiment_id = $2 order by at",
        tenant_id,
        experiment_id,
        exp["created_at"],
    )
    created: datetime = exp["created_at"]
    has_cost = bool(results) and COST_COLUMN in results[0].keys()
    by_id = {r["item_id"]: r for r in results}
    rows = [_item(i, by_id.get(i["item_id"]), created, has_cost) for i in items]
    finished = [r["created_at"] for r in results]
    end = exp["completed_at"] or (max(finished) if finished else None)
    return ExperimentData(
        experiment_id=exp["experiment_id"],
        tenant_id=exp["tenant_id"],
        name=exp["name"],
        status=exp["status"],
        total=exp["total"],
        evals=_evals(exp["spec"]),
        items=rows,
        created_at=created.isoformat(timespec="seconds"),
        completed_at=(
            exp["completed_at"].isoformat(timespec="seconds") if exp["completed_at"] else None
        ),
        duration_s=(end - created).total_seconds() if end is not None else None,
        throttled=int(exp["throttled"]),
        call_failures=int(exp["call_failures"]),
        has_cost=has_cost,
        retry_seconds=_retry_seconds(retries, exp["throttled"] + exp["call_failures"]),
    )


def _retry_seconds(rows: Any, counted: int) -> list[RetrySecond] | None:
    """The per-second record, or None when it cannot account for the totals (an
    experiment that counted 429s before migration 011 kept only totals)."""
    found = [RetrySecond(float(r["at_s"]), r["throttled"], r["call_failures"]) for r in rows]
    if sum(r.throttled + r.call_failures for r in found) < counted:
        return None
    return found


def _item(item: Any, result: Any, created: datetime, has_cost: bool) -> ItemResult:
    base: dict[str, Any] = {
        "item_id": item["item_id"],
        "seq": item["seq"],
        "dataset_id": item["base_id"],
        "epoch": item["epoch"],
        "input": item["input"],
        "expected": None if item["expected"] is None else _json(item["expected"]),
    }
    if result is None:
        return ItemResult(status="pending", **base)
    scores = _json(result["scores"]) or {}
    return ItemResult(
        status=result["status"],
        output=result["output"],
        scores=scores if isinstance(scores, dict) else {},
        latency_ms=_float(result["latency_ms"]),
        prompt_tokens=int(result["prompt_tokens"] or 0),
        completion_tokens=int(result["completion_tokens"] or 0),
        attempt=result["attempt"],
        error_kind=result["error_kind"],
        error=result["error"],
        model=result["model"],
        provider=result["provider"],
        finished_s=(result["created_at"] - created).total_seconds(),
        cost_usd=_cost(result) if has_cost else None,
        cached=bool(result[CACHED_COLUMN]) if CACHED_COLUMN in result.keys() else None,
        transcript=_json(result["transcript"]) if "transcript" in result.keys() else None,
        **base,
    )


def _cost(result: Any) -> float | None:
    """The task call's cost plus its judges' (None: the task call's price is unknown)."""
    task = _float(result[COST_COLUMN])
    if task is None:
        return None
    judges = _float(result[JUDGE_COST_COLUMN]) if JUDGE_COST_COLUMN in result.keys() else None
    return task + (judges or 0.0)
