"""Shaping experiments for people and other records: the `experiments show --json`
document and the registry run's flat metrics. Pure functions, no I/O."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from konstruct.experiments.models import ExperimentSummary
from konstruct.experiments.statistics import per_dataset_item

if TYPE_CHECKING:
    from konstruct.experiments.store.summaries import ExperimentRows


def _json(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


def item_json(row: Any) -> dict[str, Any]:
    """One item with its result (status `pending`: none yet)."""
    return {
        "item_id": row["item_id"],
        "dataset_id": row["base_id"],
        "epoch": row["epoch"],
        "status": row["status"] or "pending",
        "input": row["input"],
        "expected": _json(row["expected"]),
        "output": row["output"],
        "scores": json.loads(row["scores"]) if row["scores"] else {},
        "latency_ms": row["latency_ms"],
        "model": row["model"],
        "provider": row["provider"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cost_usd": row["cost_usd"],
        "judge_cost_usd": row["judge_cost_usd"],
        "cached": row["cached"],
        "error_kind": row["error_kind"],
        "error": row["error"],
    }


def item_detail(row: Any) -> dict[str, Any]:
    """One item with its result and, for an agent's item, its transcript
    (`experiments show EXP ITEM`)."""
    return {**item_json(row), "transcript": _json(row["transcript"])}


def experiment_detail(rows: ExperimentRows) -> dict[str, Any]:
    """The experiment with one row per item (what `experiments show --json` prints),
    and with epochs each dataset item's figures over them."""
    exp = rows.experiment
    items = [item_json(r) for r in rows.items]
    spend = rows.spend
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
        "epochs": exp["epochs"],
        "paused_reason": exp["paused_reason"],
        "cache": exp["cache"],
        **{k: v.model_dump() if k == "budget" and v is not None else v for k, v in spend.items()},
        "items": items,
        **({"by_dataset_item": per_dataset_item(items)} if exp["epochs"] > 1 else {}),
    }


def summary_metrics(summary: ExperimentSummary) -> dict[str, float]:
    """Flat metrics for the registry run, comparable across experiments."""
    metrics: dict[str, float] = {
        "items": float(summary.total),
        "completed": float(summary.completed),
        "failed": float(summary.failed),
        "prompt_tokens": float(summary.prompt_tokens),
        "completion_tokens": float(summary.completion_tokens),
    }
    if summary.unfinished:
        metrics["unfinished"] = float(summary.unfinished)
    for e in summary.evals:
        if e.mean is not None:
            metrics[f"{e.name}.mean"] = e.mean
        if e.pass_rate is not None:
            metrics[f"{e.name}.pass_rate"] = e.pass_rate
        if e.stderr is not None:
            metrics[f"{e.name}.stderr"] = e.stderr
        if e.pass_at_k is not None:
            metrics[f"{e.name}.pass_at_{summary.epochs}"] = e.pass_at_k
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        value = getattr(summary.latency, key)
        if value is not None:
            metrics[f"latency_{key}"] = value
    calls = summary.providers.get("calls", {})
    metrics["throttled"] = calls.get("throttled", 0.0)
    metrics["throttled_share"] = calls.get("throttled_share", 0.0)
    metrics["cost_usd"] = summary.cost_usd
    metrics["cost_known"] = 1.0 if summary.cost_known else 0.0
    metrics["cache_hits"] = float(summary.cache_hits)
    metrics["cost_saved_usd"] = summary.cost_saved_usd
    if summary.duration_s is not None:
        metrics["duration_s"] = summary.duration_s
    return metrics
