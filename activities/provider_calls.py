"""Experiment calls to one provider deployment: the task call and the LLM judge.

These run on the provider's own task queue (`<task_queue>-llm-<provider>`),
which the Temporal server dispatches at the provider's adaptive rate: a call
waiting for capacity sits in the server's queue and holds no worker slot.

One attempt is one request to one deployment (litellm with no retries of its
own). Before it, the provider's circuit breaker is asked; after it, the rate
and the breaker learn from the answer:

- success: the result row is written once (insert ... on conflict do nothing);
- 429: the rate drops, and the attempt fails with `next_retry_delay` = the
  provider's Retry-After, so the wait happens in the server, not in a slot;
- 5xx, timeout, connection error: counted by the breaker, Temporal retries
  (1 s, 2 s ... 32 s);
- a request the provider will never accept (400, 401...): a failed result.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from datetime import timedelta
from typing import Any

import asyncpg
from opentelemetry import metrics, trace
from pydantic import TypeAdapter
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.llm import _NON_RETRYABLE, retry_after_seconds
from konstruct.config import ExperimentSettings
from konstruct.db import tenant_transaction
from konstruct.evals import judge_messages, parse_judge, score_local
from konstruct.models.experiments import (
    EvalSpec,
    JudgeItemInput,
    JudgeItemResult,
    LlmJudgeEval,
    RunItemInput,
    RunItemResult,
    TaskSpec,
    eval_name,
)
from konstruct.provider_control import Admission, BreakerState
from konstruct.router import Deployment, RouterConfig
from konstruct.store.providers import (
    Outcome,
    admit_call,
    aimd_config,
    breaker_config,
    breaker_from_row,
    provider_queue,
    push_rate,
    record_outcome,
)

_tracer = trace.get_tracer("konstruct.experiments")
_meter = metrics.get_meter("konstruct.experiments")
_calls = _meter.create_counter("konstruct.provider.calls", description="provider calls by outcome")
_throttled = _meter.create_counter("konstruct.provider.throttled", description="429 answers")
_trips = _meter.create_counter("konstruct.provider.breaker_trips", description="breaker trips")
_latency = _meter.create_histogram(
    "konstruct.provider.latency", unit="ms", description="provider call latency"
)

_EVALS = TypeAdapter(list[EvalSpec])
# Errors that say the provider is unhealthy (counted by the breaker).
_RATE_LIMITED = ("RateLimitError",)


_BREAKER_COLUMNS = (
    "b.status as breaker_status, b.consecutive_failures, b.opened_at, b.probe_started_at, b.trips"
)


def _breaker_seen(row: Any) -> BreakerState | None:
    if row["breaker_status"] is None:
        return None
    return breaker_from_row(row, status_column="breaker_status")


class _Spec:
    def __init__(self, row: asyncpg.Record) -> None:
        spec = json.loads(row["spec"])
        self.task = TaskSpec.model_validate(spec["task"])
        self.evals = _EVALS.validate_python(spec["evals"])
        self.judges = {eval_name(e): e for e in self.evals if e.kind == "llm_judge"}


def _expected(value: Any) -> Any:
    return None if value is None else json.loads(value)


def _render(template: str, item_id: str, text: str) -> str:
    return template.replace("{input}", text).replace("{id}", item_id)


class ProviderCallActivities:
    """Injected: the app pool, the router config and the experiment settings."""

    def __init__(
        self, pool: asyncpg.Pool, router_config: RouterConfig, settings: ExperimentSettings
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.deployments: dict[str, Deployment] = {
            d.deployment_id: d for d in router_config.active()
        }
        self.aimd = aimd_config(settings)
        self.breaker = breaker_config(settings)
        self._specs: OrderedDict[tuple[str, str], _Spec] = OrderedDict()
        # Calls in progress per provider in this process (slot utilisation).
        self.in_progress: dict[str, int] = {}

    # --- shared plumbing -----------------------------------------------------------

    async def _spec(self, conn: asyncpg.Connection, tenant_id: str, experiment_id: str) -> _Spec:
        key = (tenant_id, experiment_id)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        row = await conn.fetchrow(
            "select spec from experiments where tenant_id = $1 and experiment_id = $2",
            tenant_id,
            experiment_id,
        )
        if row is None:
            raise ApplicationError(
                f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist",
                type="NotFound",
                non_retryable=True,
            )
        spec = _Spec(row)
        self._specs[key] = spec
        if len(self._specs) > 256:
            self._specs.popitem(last=False)
        return spec

    def _deployment(self, deployment_id: str) -> Deployment:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            # Another worker knows it (its environment switches it on); this one does not.
            raise ApplicationError(
                f"deployment {deployment_id!r} is not active on this worker; check its "
                "environment variables",
                type="DeploymentUnavailable",
            )
        return deployment

    async def _admit(self, provider: str) -> BreakerState:
        admission, state = await admit_call(
            self.pool, self._base_queue(provider), provider, self.breaker
        )
        if not admission.allowed:
            raise self._wait(admission, provider)
        return state

    def _base_queue(self, provider: str) -> str:
        queue = activity.info().task_queue
        suffix = f"-llm-{provider}"
        return queue.removesuffix(suffix) if queue.endswith(suffix) else queue

    @staticmethod
    def _wait(admission: Admission, provider: str) -> ApplicationError:
        return ApplicationError(
            f"provider {provider!r} unavailable: {admission.reason}; retrying in "
            f"{admission.retry_in_s:.1f} s",
            type="ProviderUnavailable",
            next_retry_delay=timedelta(seconds=max(0.2, admission.retry_in_s)),
        )

    async def _outcome(
        self,
        provider: str,
        outcome: Outcome,
        seen: BreakerState,
        retry_after: float | None = None,
        error: str = "",
        age_s: float | None = None,
    ) -> None:
        base = self._base_queue(provider)
        effect = await record_outcome(
            self.pool,
            base,
            provider,
            outcome,
            breaker_seen=seen,
            aimd=self.aimd,
            breaker=self.breaker,
            retry_after_s=retry_after,
            error=error,
            age_s=age_s,
        )
        if effect.breaker_tripped:
            _trips.add(1, {"provider": provider})
        if effect.rate_changed_to is not None:
            try:
                await push_rate(
                    activity.client(),
                    provider_queue(base, provider),
                    effect.rate_changed_to,
                    f"{outcome}: adaptive rate",
                )
            except Exception as exc:  # the worker's reconcile loop pushes it again
                activity.logger.warning("could not push rate for %s: %s", provider, exc)

    async def _call(
        self, deployment: Deployment, messages: list[dict[str, str]], task: TaskSpec | None
    ) -> Any:
        """One request to one deployment, heartbeating while it runs."""
        import litellm

        params = dict(deployment.litellm_params)
        params["max_retries"] = 0
        params["num_retries"] = 0
        params["timeout"] = min(float(params.get("timeout") or 1e9), self.settings.call_timeout_s)
        if task is not None:
            if task.temperature is not None:
                params["temperature"] = task.temperature
            if task.max_tokens is not None:
                params["max_tokens"] = task.max_tokens
        call = asyncio.ensure_future(litellm.acompletion(messages=messages, **params))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=self.settings.heartbeat_every_s)
                if done:
                    return call.result()
                activity.heartbeat()
        finally:
            if not call.done():
                call.cancel()

    async def _provider_call(
        self,
        provider: str,
        deployment: Deployment,
        messages: list[dict[str, str]],
        task: TaskSpec | None,
        experiment: tuple[str, str],
        breaker: BreakerState | None,
    ) -> tuple[Any | None, float, str | None, str]:
        """Admit, call, learn. Returns (response or None, latency ms, error kind, error)."""
        # A closed breaker (read with the item) admits at once; otherwise ask under a lock.
        seen = breaker if breaker is not None and breaker.status == "closed" else None
        if seen is None:
            seen = await self._admit(provider)
        started = time.perf_counter()
        self.in_progress[provider] = self.in_progress.get(provider, 0) + 1
        try:
            with _tracer.start_as_current_span("llm.completion") as span:
                span.set_attribute("llm.deployment", deployment.deployment_id)
                span.set_attribute("llm.provider", provider)
                try:
                    response = await self._call(deployment, messages, task)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(trace.StatusCode.ERROR)
                    return (
                        None,
                        (time.perf_counter() - started) * 1000,
                        *(await self._failed(provider, seen, exc, experiment, started)),
                    )
        finally:
            self.in_progress[provider] -= 1
        latency = (time.perf_counter() - started) * 1000
        _latency.record(latency, {"provider": provider})
        _calls.add(1, {"provider": provider, "outcome": "ok"})
        await self._outcome(provider, "ok", seen)
        return response, latency, None, ""

    async def _failed(
        self,
        provider: str,
        seen: BreakerState,
        exc: Exception,
        experiment: tuple[str, str],
        sent: float,
    ) -> tuple[str, str]:
        """Learn from a failed call; raise to retry, or return (kind, message) to give up."""
        kind = type(exc).__name__
        message = f"{kind}: {str(exc)[:400]}"
        tenant_id, experiment_id = experiment
        if kind in _RATE_LIMITED:
            retry_after = retry_after_seconds(exc)
            _throttled.add(1, {"provider": provider})
            _calls.add(1, {"provider": provider, "outcome": "throttled"})
            await self._outcome(
                provider,
                "throttled",
                seen,
                retry_after=retry_after,
                age_s=time.perf_counter() - sent,
            )
            await self._count(tenant_id, experiment_id, "throttled")
            raise ApplicationError(
                f"provider {provider!r} rate-limited the call: {message}",
                type="RateLimited",
                next_retry_delay=timedelta(seconds=max(0.2, retry_after or 1.0)),
            )
        if kind in _NON_RETRYABLE:
            _calls.add(1, {"provider": provider, "outcome": "rejected"})
            await self._outcome(provider, "neutral", seen)
            return kind, message
        _calls.add(1, {"provider": provider, "outcome": "failure"})
        await self._outcome(provider, "failure", seen, error=message)
        await self._count(tenant_id, experiment_id, "call_failures")
        raise ApplicationError(f"call to {provider!r} failed: {message}", type=kind)

    async def _count(self, tenant_id: str, experiment_id: str, column: str) -> None:
        async with tenant_transaction(self.pool, tenant_id) as conn:
            await conn.execute(
                f"update experiments set {column} = {column} + 1"
                " where tenant_id = $1 and experiment_id = $2",
                tenant_id,
                experiment_id,
            )

    # --- the activities ---------------------------------------------------------------

    @activity.defn(name="experiment_run_item")
    async def run_item(self, input: RunItemInput) -> RunItemResult:
        """The task call of one item, its deterministic evals, and its result row, once."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self._spec(conn, input.tenant_id, input.experiment_id)
            row = await conn.fetchrow(
                "select i.seq, i.input, i.expected, e.stop_requested, r.status, r.scores,"
                " r.latency_ms, r.prompt_tokens, r.completion_tokens, r.error_kind, "
                + _BREAKER_COLUMNS
                + " from experiment_items i join experiments e using (tenant_id, experiment_id)"
                " left join experiment_results r using (tenant_id, experiment_id, item_id)"
                " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
                " where i.tenant_id = $1 and i.experiment_id = $2 and i.item_id = $3",
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                self._base_queue(input.provider),
                input.provider,
            )
        if row is None:
            raise ApplicationError(
                f"item {input.item_id!r} is not in experiment {input.experiment_id!r}",
                type="NotFound",
                non_retryable=True,
            )
        if row["status"] is not None:
            return self._stored(input.item_id, row, spec, fresh=False)
        if row["stop_requested"]:
            raise ApplicationError(
                "experiment is stopping: no new provider call",
                type="ExperimentStopped",
                non_retryable=True,
            )
        deployment = self._deployment(input.deployment_id)
        text = _render(spec.task.prompt_template, input.item_id, row["input"])
        messages = []
        if spec.task.system_prompt:
            messages.append({"role": "system", "content": spec.task.system_prompt})
        messages.append({"role": "user", "content": text})
        response, latency, error_kind, error = await self._provider_call(
            input.provider,
            deployment,
            messages,
            spec.task,
            (input.tenant_id, input.experiment_id),
            _breaker_seen(row),
        )
        expected = _expected(row["expected"])
        scores: dict[str, Any] = {}
        output: str | None = None
        model = None
        usage = None
        if response is not None:
            output = response.choices[0].message.content or ""
            model = str(response.model)
            usage = getattr(response, "usage", None)
            for spec_eval in spec.evals:
                if spec_eval.kind != "llm_judge":
                    scores[eval_name(spec_eval)] = score_local(
                        spec_eval, output, expected
                    ).as_json()
        status = "ok" if response is not None else "failed"
        evaluated = status == "failed" or not spec.judges
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            stored = await conn.fetchrow(
                "insert into experiment_results (tenant_id, experiment_id, item_id, seq, status,"
                " output, scores, evaluated, latency_ms, model, deployment_id, provider,"
                " prompt_tokens, completion_tokens, error_kind, error, attempt)"
                " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
                " $17) on conflict (tenant_id, experiment_id, item_id) do nothing"
                " returning status, scores, latency_ms, prompt_tokens, completion_tokens,"
                " error_kind",
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                row["seq"],
                status,
                output,
                json.dumps(scores),
                evaluated,
                latency,
                model,
                input.deployment_id,
                input.provider,
                getattr(usage, "prompt_tokens", 0) or 0,
                getattr(usage, "completion_tokens", 0) or 0,
                error_kind,
                error or None,
                activity.info().attempt,
            )
            if stored is None:  # an earlier attempt stored it first
                stored = await conn.fetchrow(
                    "select status, scores, latency_ms, prompt_tokens, completion_tokens,"
                    " error_kind from experiment_results"
                    " where tenant_id = $1 and experiment_id = $2 and item_id = $3",
                    input.tenant_id,
                    input.experiment_id,
                    input.item_id,
                )
        return self._stored(input.item_id, stored, spec, fresh=True)

    @staticmethod
    def _stored(item_id: str, row: Any, spec: _Spec, fresh: bool) -> RunItemResult:
        scores = json.loads(row["scores"]) if row["scores"] else {}
        missing = [n for n in spec.judges if n not in scores] if row["status"] == "ok" else []
        return RunItemResult(
            item_id=item_id,
            status=row["status"],
            missing_evals=missing,
            latency_ms=row["latency_ms"],
            prompt_tokens=row["prompt_tokens"] or 0,
            completion_tokens=row["completion_tokens"] or 0,
            error_kind=row["error_kind"],
            fresh=fresh,
        )

    @activity.defn(name="experiment_judge_item")
    async def judge_item(self, input: JudgeItemInput) -> JudgeItemResult:
        """One llm_judge eval of one item; its score is merged into the result row once."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self._spec(conn, input.tenant_id, input.experiment_id)
            row = await conn.fetchrow(
                "select i.input, i.expected, r.output, r.scores, e.stop_requested, "
                + _BREAKER_COLUMNS
                + " from experiment_results r join experiment_items i"
                " using (tenant_id, experiment_id, item_id)"
                " join experiments e using (tenant_id, experiment_id)"
                " left join provider_breakers b on b.task_queue = $4 and b.provider = $5"
                " where r.tenant_id = $1 and r.experiment_id = $2 and r.item_id = $3",
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                self._base_queue(input.provider),
                input.provider,
            )
        judge = spec.judges.get(input.eval_name)
        if row is None or judge is None:
            raise ApplicationError(
                f"no task output or no eval {input.eval_name!r} for item {input.item_id!r}",
                type="NotFound",
                non_retryable=True,
            )
        scores = json.loads(row["scores"])
        if input.eval_name in scores:
            score = scores[input.eval_name].get("score")
            return JudgeItemResult(
                item_id=input.item_id, eval_name=input.eval_name, score=score, evaluated=True
            )
        if row["stop_requested"]:
            raise ApplicationError(
                "experiment is stopping: no new provider call",
                type="ExperimentStopped",
                non_retryable=True,
            )
        assert isinstance(judge, LlmJudgeEval)
        messages = judge_messages(
            judge, row["input"], row["output"] or "", _expected(row["expected"])
        )
        response, latency, error_kind, error = await self._provider_call(
            input.provider,
            self._deployment(input.deployment_id),
            messages,
            None,
            (input.tenant_id, input.experiment_id),
            _breaker_seen(row),
        )
        entry: dict[str, Any]
        if response is None:
            entry = {"score": None, "passed": False, "detail": f"judge failed: {error}"}
        else:
            reply = response.choices[0].message.content or ""
            parsed = parse_judge(judge, reply)
            entry = (
                parsed.as_json()
                if parsed is not None
                else {"score": None, "passed": False, "detail": f"no score in: {reply[:200]}"}
            )
        entry["latency_ms"] = latency
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            updated = await conn.fetchrow(
                "update experiment_results"
                " set scores = case when scores ? $4 then scores else scores || $5::jsonb end,"
                " updated_at = now()"
                " where tenant_id = $1 and experiment_id = $2 and item_id = $3"
                " returning scores",
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                input.eval_name,
                json.dumps({input.eval_name: entry}),
            )
            merged = json.loads(updated["scores"])
            evaluated = all(name in merged for name in spec.judges)
            if evaluated:
                await conn.execute(
                    "update experiment_results set evaluated = true"
                    " where tenant_id = $1 and experiment_id = $2 and item_id = $3",
                    input.tenant_id,
                    input.experiment_id,
                    input.item_id,
                )
        return JudgeItemResult(
            item_id=input.item_id,
            eval_name=input.eval_name,
            score=merged[input.eval_name].get("score"),
            evaluated=evaluated,
        )
