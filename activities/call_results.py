"""What an experiment call's answer becomes: its result row or judge score, and what the workflow counts.

Pure functions shared by the single-item path (`activities.provider_calls`) and
the batched one (`activities.provider_batches`): no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio import activity

from activities.spend import cached_completion, new_entry
from konstruct.experiments.datasets import render_prompt
from konstruct.experiments.evals import parse_judge, score_local
from konstruct.experiments.models import (
    BatchItemResult,
    JudgeItemInput,
    JudgeItemResult,
    LlmJudgeEval,
    RunItemResult,
    eval_name,
)
from konstruct.experiments.store import experiments as store
from konstruct.experiments.store import results
from konstruct.experiments.store.cache import CacheEntry
from konstruct.providers.adapter import Completion, ProviderFailure


@dataclass(frozen=True)
class Answer:
    """A provider call that was answered: a completion, or a request it will never accept."""

    completion: Completion | None
    latency_ms: float
    rejected: ProviderFailure | None = None
    # What the call cost (None: the deployment's price is unknown).
    cost_usd: float | None = 0.0
    # Answered from the cache (no call made); else the key a success is cached under.
    hit: CacheEntry | None = None
    cache_key: str = ""

    @classmethod
    def from_cache(cls, hit: CacheEntry) -> Answer:
        return cls(cached_completion(hit), 0.0, cost_usd=0.0, hit=hit)


def task_messages(
    spec: store.StoredSpec, item_id: str, text: str, fields: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """The task call's messages for one item: the template with its `{input}`, `{id}`
    and extra fields (`{column}`: the item's other dataset columns) filled in."""
    messages = []
    if spec.task.system_prompt:
        messages.append({"role": "system", "content": spec.task.system_prompt})
    prompt = render_prompt(spec.task.template, item_id, text, fields or {})
    messages.append({"role": "user", "content": prompt})
    return messages


def missing_judges(stored: results.StoredResult, spec: store.StoredSpec) -> list[str]:
    """The judge evals a stored task result still waits for (none once it failed)."""
    return [n for n in spec.judges if n not in stored.scores] if stored.status == "ok" else []


def new_result(
    spec: store.StoredSpec,
    item: results.TaskCall,
    answer: Answer,
    deployment_id: str,
    provider: str,
) -> results.NewResult:
    """The result row of an answered task call, with its deterministic scores, its
    cost, and (a success, not from the cache) its output for the cache."""
    completion, rejected, hit = answer.completion, answer.rejected, answer.hit
    scores: dict[str, Any] = {}
    if completion is not None:
        for spec_eval in spec.evals:
            if spec_eval.kind != "llm_judge":
                scores[eval_name(spec_eval)] = score_local(
                    spec_eval, completion.content, item.expected
                ).as_json()
    return results.NewResult(
        seq=item.seq,
        status="ok" if completion is not None else "failed",
        output=completion.content if completion is not None else None,
        scores=scores,
        evaluated=completion is None or not spec.judges,
        latency_ms=answer.latency_ms if hit is None else None,
        model=completion.model if completion is not None else None,
        deployment_id=deployment_id,
        provider=provider,
        prompt_tokens=completion.prompt_tokens if completion is not None else 0,
        completion_tokens=completion.completion_tokens if completion is not None else 0,
        error_kind=rejected.kind if rejected is not None else None,
        error=rejected.message if rejected is not None else None,
        attempt=activity.info().attempt,
        cost_usd=answer.cost_usd if completion is not None else 0.0,
        cached=hit is not None,
        saved_usd=(hit.cost_usd or 0.0) if hit is not None else 0.0,
        cache_entry=new_entry("task", answer.cache_key, deployment_id, completion, answer.cost_usd)
        if completion is not None and hit is None and answer.cache_key
        else None,
    )


def spent(new: results.NewResult | results.JudgeCost) -> dict[str, Any]:
    """A call's cost fields, as the workflow counts them (the item results' last four)."""
    return {
        "cost_usd": new.cost_usd or 0.0,
        "cost_known": new.cost_usd is not None,
        "cached": new.cached,
        "saved_usd": new.saved_usd,
    }


def _counted(
    stored: results.StoredResult,
    spec: store.StoredSpec,
    fresh: bool,
    new: results.NewResult | None,
) -> dict[str, Any]:
    """What the workflow counts of a stored task result, single or batched; `new`:
    what this attempt's call cost (None: stored before, it cost nothing now)."""
    return {
        "status": stored.status,
        "missing_evals": missing_judges(stored, spec),
        "prompt_tokens": stored.prompt_tokens,
        "completion_tokens": stored.completion_tokens,
        "fresh": fresh,
        **(spent(new) if new is not None else {}),
    }


def run_result(
    item_id: str,
    stored: results.StoredResult,
    spec: store.StoredSpec,
    fresh: bool,
    new: results.NewResult | None = None,
) -> RunItemResult:
    """A single item's stored task result as the workflow counts it."""
    return RunItemResult(
        item_id=item_id,
        latency_ms=stored.latency_ms,
        error_kind=stored.error_kind,
        **_counted(stored, spec, fresh, new),
    )


def batch_result(
    item_id: str,
    stored: results.StoredResult,
    spec: store.StoredSpec,
    fresh: bool,
    new: results.NewResult | None = None,
) -> BatchItemResult:
    """A batched item's stored task result as the workflow counts it."""
    return BatchItemResult(item_id=item_id, **_counted(stored, spec, fresh, new))


def judge_cost(answer: Answer, deployment_id: str) -> results.JudgeCost:
    """What a judge call cost, and (a success, not from the cache) its cache entry."""
    completion, hit, key = answer.completion, answer.hit, answer.cache_key
    if hit is not None:
        return results.JudgeCost(cost_usd=0.0, cached=True, saved_usd=hit.cost_usd or 0.0)
    if completion is None:
        return results.JudgeCost(cost_usd=0.0)
    return results.JudgeCost(
        cost_usd=answer.cost_usd,
        cache_entry=new_entry("judge", key, deployment_id, completion, answer.cost_usd)
        if key
        else None,
    )


def judge_entry(judge: LlmJudgeEval, answer: Answer, cost: results.JudgeCost) -> dict[str, Any]:
    """The score entry a judge call's answer merges into its item's result row."""
    entry: dict[str, Any]
    if answer.completion is None:
        error = answer.rejected.message if answer.rejected is not None else ""
        entry = {"score": None, "passed": False, "detail": f"judge failed: {error}"}
    else:
        reply = answer.completion.content
        parsed = parse_judge(judge, reply)
        entry = (
            parsed.as_json()
            if parsed is not None
            else {"score": None, "passed": False, "detail": f"no score in: {reply[:200]}"}
        )
    entry["latency_ms"] = answer.latency_ms if answer.hit is None else None
    if answer.completion is not None:
        entry["prompt_tokens"] = answer.completion.prompt_tokens
        entry["completion_tokens"] = answer.completion.completion_tokens
        entry["cost_usd"] = cost.cost_usd
        entry["cached"] = cost.cached
    return entry


def judge_result(
    input: JudgeItemInput,
    score: float | None,
    evaluated: bool,
    cost: results.JudgeCost | None = None,
) -> JudgeItemResult:
    """A judge eval's score as the workflow counts it; `cost`: this call's (None: the
    score was stored before)."""
    return JudgeItemResult(
        item_id=input.item_id,
        eval_name=input.eval_name,
        score=score,
        evaluated=evaluated,
        **(spent(cost) if cost is not None else {}),
    )
