"""Experiment calls to one provider deployment: the task call and the LLM judge.

These run on the provider's own task queue (`ProviderQueue(task_queue, provider)`),
which the Temporal server dispatches at the provider's adaptive rate: a call
waiting for capacity sits in the server's queue and holds no worker slot.

One attempt is one request to one deployment (litellm with no retries of its
own). Before it, the provider's circuit breaker is asked; after it, the rate
and the breaker learn from the answer (`konstruct.providers.adapter` says what
the answer was):

- success: the result row is written once (insert ... on conflict do nothing);
- 429: the rate drops, and the attempt fails with `next_retry_delay` = the
  provider's Retry-After, so the wait happens in the server, not in a slot;
- 5xx, timeout, connection error: counted by the breaker, Temporal retries
  (1 s, 2 s ... 32 s);
- a request the provider will never accept (400, 401...): a failed result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from opentelemetry import metrics, trace
from temporalio import activity

from activities.spend import CallSpend, cached_completion, judge_key, new_entry, task_key
from konstruct.config import ExperimentSettings
from konstruct.experiments.datasets import render_prompt
from konstruct.experiments.evals import judge_messages, parse_judge, score_local
from konstruct.experiments.models import (
    JudgeItemInput,
    JudgeItemResult,
    LlmJudgeEval,
    RunItemInput,
    RunItemResult,
    TaskSpec,
    eval_name,
)
from konstruct.experiments.store import cache
from konstruct.experiments.store import experiments as store
from konstruct.experiments.store.budgets import SpendFlags
from konstruct.experiments.store.cache import CacheEntry
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import ExperimentStopped, NotFound, QuotaExceeded
from konstruct.platform.naming import ProviderQueue
from konstruct.providers.adapter import (
    AnnouncedLimits,
    Completion,
    ProviderFailure,
    call_error,
    classify,
    complete_on,
    deployment_unavailable,
    provider_unavailable,
)
from konstruct.providers.control import BreakerState, Grant
from konstruct.providers.queue_limits import push_rate
from konstruct.providers.router import Deployment, RouterConfig
from konstruct.providers.store import (
    Outcome,
    OutcomeEffect,
    admit_call,
    record_outcome,
    reserve_calls,
)

_tracer = trace.get_tracer("konstruct.experiments")
_meter = metrics.get_meter("konstruct.experiments")
_calls = _meter.create_counter("konstruct.provider.calls", description="provider calls by outcome")
_throttled = _meter.create_counter("konstruct.provider.throttled", description="429 answers")
_trips = _meter.create_counter("konstruct.provider.breaker_trips", description="breaker trips")
_latency = _meter.create_histogram(
    "konstruct.provider.latency", unit="ms", description="provider call latency"
)
# Experiment specs kept in memory per worker (they never change once stored).
_SPEC_CACHE_SIZE = 256


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


# A completion's tokens guessed before any answer taught the worker better.
_FIRST_COMPLETION_GUESS = 64


class TokenEstimates:
    """A call's prompt + completion tokens guessed before it goes out, so a
    metered provider's token clock can book them: the prompt at four characters a
    token, corrected by what this provider's answers reported for their prompts,
    and the completion at `max_tokens` or what its answers used on average. The
    answer's usage settles the difference; a guess close to it matters because
    booked slots are spaced by the guess."""

    def __init__(self) -> None:
        self._completion: dict[str, float] = {}
        self._prompt_ratio: dict[str, float] = {}

    @staticmethod
    def _characters(messages: list[dict[str, str]]) -> int:
        return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages)

    def estimate(
        self, provider: str, messages: list[dict[str, str]], max_tokens: int | None
    ) -> int:
        prompt = self._characters(messages) * self._prompt_ratio.get(provider, 1.0)
        guess = self._completion.get(provider, _FIRST_COMPLETION_GUESS)
        return round(prompt + (max_tokens if max_tokens is not None else guess))

    def split(
        self, provider: str, messages: list[dict[str, str]], max_tokens: int | None
    ) -> tuple[int, int]:
        """`estimate` as (prompt, completion) tokens, which are priced apart."""
        prompt = round(self._characters(messages) * self._prompt_ratio.get(provider, 1.0))
        guess = self._completion.get(provider, _FIRST_COMPLETION_GUESS)
        return prompt, round(max_tokens if max_tokens is not None else guess)

    def used(self, provider: str, messages: list[dict[str, str]], completion: Completion) -> int:
        """The tokens an answer used; teaches the guesses (the first answer at once)."""

        def learn(table: dict[str, float], value: float) -> None:
            last = table.get(provider)
            table[provider] = value if last is None else 0.9 * last + 0.1 * value

        learn(self._completion, float(completion.completion_tokens))
        if completion.prompt_tokens:
            learn(self._prompt_ratio, completion.prompt_tokens / self._characters(messages))
        return completion.total_tokens or completion.prompt_tokens + completion.completion_tokens


def task_messages(
    spec: store.StoredSpec, item_id: str, text: str, fields: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """The task call's messages for one item: the template with its `{input}`, `{id}`
    and extra fields (`{column}`: the item's other dataset columns) filled in."""
    messages = []
    if spec.task.system_prompt:
        messages.append({"role": "system", "content": spec.task.system_prompt})
    prompt = render_prompt(spec.task.prompt_template, item_id, text, fields or {})
    messages.append({"role": "user", "content": prompt})
    return messages


def missing_judges(stored: store.StoredResult, spec: store.StoredSpec) -> list[str]:
    """The judge evals a stored task result still waits for (none once it failed)."""
    return [n for n in spec.judges if n not in stored.scores] if stored.status == "ok" else []


def new_result(
    spec: store.StoredSpec,
    item: store.TaskCall,
    answer: Answer,
    deployment_id: str,
    provider: str,
) -> store.NewResult:
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
    return store.NewResult(
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


def spent(new: store.NewResult) -> dict[str, Any]:
    """A result's cost fields, as the workflow counts them (RunItemResult, BatchItemResult)."""
    return {
        "cost_usd": new.cost_usd or 0.0,
        "cost_known": new.cost_usd is not None,
        "cached": new.cached,
        "saved_usd": new.saved_usd,
    }


def judge_cost(answer: Answer, deployment_id: str, key: str) -> store.JudgeCost:
    """What a judge call cost, and (a success, not from the cache) its cache entry."""
    completion, hit = answer.completion, answer.hit
    if hit is not None:
        return store.JudgeCost(cost_usd=0.0, cached=True, saved_usd=hit.cost_usd or 0.0)
    if completion is None:
        return store.JudgeCost(cost_usd=0.0)
    return store.JudgeCost(
        cost_usd=answer.cost_usd,
        cache_entry=new_entry("judge", key, deployment_id, completion, answer.cost_usd)
        if key
        else None,
    )


def _stopping() -> ExperimentStopped:
    return ExperimentStopped("experiment is stopping: no new provider call")


class ProviderCallActivities:
    """Injected: the app pool, the router config, the experiment settings and the
    worker's main task queue (the base of every provider queue it polls)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        router_config: RouterConfig,
        settings: ExperimentSettings,
        task_queue: str,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.task_queue = task_queue
        self.deployments: dict[str, Deployment] = {
            d.deployment_id: d for d in router_config.active()
        }
        self.aimd = settings.aimd_config()
        self.breaker = settings.breaker_config()
        self._specs: OrderedDict[tuple[str, str], store.StoredSpec] = OrderedDict()
        # Calls in progress per provider in this process (slot utilisation).
        self.in_progress: dict[str, int] = {}
        self.tokens = TokenEstimates()
        # Prices, budget reservations (the cache is read with each item).
        self.spend = CallSpend(pool, self.deployments)

    # --- shared plumbing -----------------------------------------------------------

    async def _spec(
        self, conn: asyncpg.Connection, tenant_id: str, experiment_id: str
    ) -> store.StoredSpec:
        key = (tenant_id, experiment_id)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        spec = await store.stored_spec(conn, tenant_id, experiment_id)
        if spec is None:
            raise NotFound(f"experiment {experiment_id!r} of tenant {tenant_id!r} does not exist")
        self._specs[key] = spec
        if len(self._specs) > _SPEC_CACHE_SIZE:
            self._specs.popitem(last=False)
        return spec

    def _ref(self, input: RunItemInput | JudgeItemInput) -> store.CallRef:
        return store.CallRef(
            input.tenant_id, input.experiment_id, input.item_id, self.task_queue, input.provider
        )

    def _deployment(self, deployment_id: str) -> Deployment:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise deployment_unavailable(deployment_id)
        return deployment

    async def _admit(self, provider: str) -> BreakerState:
        admitted = await admit_call(self.pool, self.task_queue, provider, self.breaker)
        if not admitted.admission.allowed:
            raise provider_unavailable(
                provider, admitted.admission.reason, admitted.admission.retry_in_s
            )
        return admitted.breaker

    async def _outcome(
        self,
        provider: str,
        outcome: Outcome,
        seen: BreakerState,
        retry_after: float | None = None,
        error: str = "",
        age_s: float | None = None,
        token_excess: float = 0.0,
        limits: AnnouncedLimits | None = None,
    ) -> None:
        effect = await record_outcome(
            self.pool,
            self.task_queue,
            provider,
            outcome,
            breaker_seen=seen,
            aimd=self.aimd,
            breaker=self.breaker,
            retry_after_s=retry_after,
            error=error,
            age_s=age_s,
            token_excess=token_excess,
            limits=limits,
        )
        await self.apply_effect(provider, effect, outcome)

    async def apply_effect(self, provider: str, effect: OutcomeEffect, why: str) -> None:
        """Count a trip; push a changed rate to the provider queue's server-side limit."""
        if effect.breaker_tripped:
            _trips.add(1, {"provider": provider})
        if effect.rate_changed_to is not None:
            try:
                await push_rate(
                    activity.client(),
                    ProviderQueue(self.task_queue, provider).name,
                    effect.rate_changed_to,
                    f"{why}: adaptive rate",
                )
            except Exception as exc:  # the worker's reconcile loop pushes it again
                activity.logger.warning("could not push rate for %s: %s", provider, exc)

    @contextlib.contextmanager
    def calling(self, provider: str, deployment: Deployment) -> Iterator[trace.Span]:
        """A provider call in progress: counted (slot utilisation), traced as a span."""
        self.in_progress[provider] = self.in_progress.get(provider, 0) + 1
        try:
            with _tracer.start_as_current_span("llm.completion") as span:
                span.set_attribute("llm.deployment", deployment.deployment_id)
                span.set_attribute("llm.provider", provider)
                yield span
        finally:
            self.in_progress[provider] -= 1

    async def book(self, provider: str, wanted: int = 1, tokens_each: float = 0.0) -> Grant:
        """Call slots on the provider's shared schedule (and, metered, `tokens_each`
        tokens for each); waits until some are granted."""
        while True:
            grant = await reserve_calls(
                self.pool,
                self.task_queue,
                provider,
                wanted,
                self.settings.schedule_horizon_s,
                tokens_each,
            )
            if grant.granted:
                return grant
            await asyncio.sleep(min(grant.retry_in_s, self.settings.heartbeat_every_s))
            activity.heartbeat()

    async def _call(
        self, deployment: Deployment, messages: list[dict[str, str]], task: TaskSpec | None
    ) -> Completion:
        """One request to one deployment, heartbeating while it runs."""
        call = asyncio.ensure_future(
            complete_on(
                deployment.litellm_params,
                messages,
                timeout_s=self.settings.call_timeout_s,
                temperature=task.temperature if task is not None else None,
                max_tokens=task.max_tokens if task is not None else None,
            )
        )
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
        flags: SpendFlags | None = None,
    ) -> Answer:
        """Admit, reserve, call, learn, settle. Raises to retry, or `BudgetExhausted`
        (a budget is spent: no request made); returns a completion or a rejection."""
        # A closed breaker (read with the item) admits at once; otherwise ask under a lock.
        seen = breaker if breaker is not None and breaker.status == "closed" else None
        if seen is None:
            seen = await self._admit(provider)
        max_tokens = task.max_tokens if task is not None else None
        prompt_guess, completion_guess = self.tokens.split(provider, messages, max_tokens)
        # Its estimated cost and tokens are held against the budgets before it books a
        # slot, and released for what it really used once answered (or not).
        held = await self.spend.reserve(
            experiment, flags, deployment.deployment_id, prompt_guess, completion_guess
        )
        answer: Answer | None = None
        try:
            answer = await self._booked_call(
                provider,
                deployment,
                messages,
                task,
                experiment,
                seen,
                prompt_guess + completion_guess,
            )
        finally:
            completion = answer.completion if answer is not None else None
            await self.spend.settle(held, deployment.deployment_id, completion)
        return answer

    async def _booked_call(
        self,
        provider: str,
        deployment: Deployment,
        messages: list[dict[str, str]],
        task: TaskSpec | None,
        experiment: tuple[str, str],
        seen: BreakerState,
        estimate: int,
    ) -> Answer:
        """Book a slot on the provider's schedule, call, learn."""
        # Every call takes a slot on the provider's schedule, batched or not, so
        # the rate holds whichever way calls reach it.
        grant = await self.book(provider, 1, estimate)
        booked = estimate if grant.metered else 0
        if grant.first_in_s > 0:
            await asyncio.sleep(grant.first_in_s)
        started = time.perf_counter()
        with self.calling(provider, deployment) as span:
            try:
                completion = await self._call(deployment, messages, task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                rejected = await self._failed(provider, seen, exc, experiment, started, booked)
                return Answer(None, (time.perf_counter() - started) * 1000, rejected)
        latency = (time.perf_counter() - started) * 1000
        _latency.record(latency, {"provider": provider})
        _calls.add(1, {"provider": provider, "outcome": "ok"})
        used = self.tokens.used(provider, messages, completion)
        await self._outcome(
            provider,
            "ok",
            seen,
            token_excess=used - booked if booked else 0.0,
            limits=completion.limits,
        )
        return Answer(
            completion, latency, cost_usd=self.spend.cost_of(deployment.deployment_id, completion)
        )

    async def _failed(
        self,
        provider: str,
        seen: BreakerState,
        exc: Exception,
        experiment: tuple[str, str],
        sent: float,
        booked: float,
    ) -> ProviderFailure:
        """Learn from a failed call; raise to retry, or return the rejection to give up.
        A failed call used none of the tokens it `booked`: they go back."""
        failure = classify(exc)
        tenant_id, experiment_id = experiment
        unused, limits = -booked, failure.limits
        if failure.posture == "throttled":
            _throttled.add(1, {"provider": provider})
            _calls.add(1, {"provider": provider, "outcome": "throttled"})
            await self._outcome(
                provider,
                "throttled",
                seen,
                retry_after=failure.retry_after_s,
                age_s=time.perf_counter() - sent,
                token_excess=unused,
                limits=limits,
            )
            await store.count_retried_call(self.pool, tenant_id, experiment_id, "throttled")
            raise call_error(provider, failure)
        if failure.posture == "quota":
            # Not a rate problem (the rate stays) nor the provider's health (no breaker).
            _calls.add(1, {"provider": provider, "outcome": "quota"})
            await self._outcome(provider, "neutral", seen, token_excess=unused)
            raise QuotaExceeded(f"provider {provider!r} quota exceeded: {failure.message}")
        if failure.posture == "rejected":
            _calls.add(1, {"provider": provider, "outcome": "rejected"})
            await self._outcome(provider, "neutral", seen, token_excess=unused)
            return failure
        _calls.add(1, {"provider": provider, "outcome": "failure"})
        await self._outcome(provider, "failure", seen, error=failure.message, token_excess=unused)
        await store.count_retried_call(self.pool, tenant_id, experiment_id, "call_failures")
        raise call_error(provider, failure)

    # --- the activities ---------------------------------------------------------------

    @activity.defn(name="experiment_run_item")
    async def run_item(self, input: RunItemInput) -> RunItemResult:
        """The task call of one item, its deterministic evals, and its result row, once.
        With the experiment's cache on, the same call made before answers it: no
        request, no rate slot, no budget reservation."""
        key, hit, messages = "", None, []
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self._spec(conn, input.tenant_id, input.experiment_id)
            item = await store.task_call(conn, self._ref(input))
            if item is not None and item.result is None and not item.stop_requested:
                messages = task_messages(spec, input.item_id, item.input, item.metadata)
                if item.spend.cache:
                    key = task_key(input.deployment_id, spec.task, messages, item.epoch)
                    hit = (await cache.lookup(conn, input.tenant_id, [key])).get(key)
        if item is None:
            raise NotFound(f"item {input.item_id!r} is not in experiment {input.experiment_id!r}")
        if item.result is not None:
            return self._result(input.item_id, item.result, spec, fresh=False)
        if item.stop_requested:
            raise _stopping()
        if hit is not None:
            answer = Answer.from_cache(hit)
        else:
            answer = await self._provider_call(
                input.provider,
                self._deployment(input.deployment_id),
                messages,
                spec.task,
                (input.tenant_id, input.experiment_id),
                item.breaker,
                item.spend,
            )
            answer = dataclasses.replace(answer, cache_key=key)
        new = new_result(spec, item, answer, input.deployment_id, input.provider)
        stored = await store.store_result(
            self.pool, input.tenant_id, input.experiment_id, input.item_id, new
        )
        return self._result(input.item_id, stored, spec, fresh=True, new=new)

    @staticmethod
    def _result(
        item_id: str,
        stored: store.StoredResult,
        spec: store.StoredSpec,
        fresh: bool,
        new: store.NewResult | None = None,
    ) -> RunItemResult:
        """What the workflow counts; `new`: what this attempt's call cost."""
        return RunItemResult(
            item_id=item_id,
            status=stored.status,
            missing_evals=missing_judges(stored, spec),
            latency_ms=stored.latency_ms,
            prompt_tokens=stored.prompt_tokens,
            completion_tokens=stored.completion_tokens,
            error_kind=stored.error_kind,
            fresh=fresh,
            **(spent(new) if new is not None else {}),
        )

    @activity.defn(name="experiment_judge_item")
    async def judge_item(self, input: JudgeItemInput) -> JudgeItemResult:
        """One llm_judge eval of one item; its score is merged into the result row once.
        Cached as task calls are, under its own key (judge deployment, judge prompt)."""
        key, hit, messages = "", None, []
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self._spec(conn, input.tenant_id, input.experiment_id)
            item = await store.judge_call(conn, self._ref(input))
            judge = spec.judges.get(input.eval_name)
            if (
                item is not None
                and isinstance(judge, LlmJudgeEval)
                and input.eval_name not in item.scores
                and not item.stop_requested
            ):
                messages = judge_messages(judge, item.input, item.output, item.expected)
                if item.spend.cache:
                    key = judge_key(input.deployment_id, messages, item.epoch)
                    hit = (await cache.lookup(conn, input.tenant_id, [key])).get(key)
        if item is None or judge is None:
            raise NotFound(
                f"no task output or no eval {input.eval_name!r} for item {input.item_id!r}"
            )
        if input.eval_name in item.scores:
            return JudgeItemResult(
                item_id=input.item_id,
                eval_name=input.eval_name,
                score=item.scores[input.eval_name].get("score"),
                evaluated=True,
            )
        if item.stop_requested:
            raise _stopping()
        assert isinstance(judge, LlmJudgeEval)
        if hit is not None:
            answer = Answer.from_cache(hit)
        else:
            answer = await self._provider_call(
                input.provider,
                self._deployment(input.deployment_id),
                messages,
                None,
                (input.tenant_id, input.experiment_id),
                item.breaker,
                item.spend,
            )
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
        entry["latency_ms"] = answer.latency_ms if hit is None else None
        cost = judge_cost(answer, input.deployment_id, key)
        if answer.completion is not None:
            entry["prompt_tokens"] = answer.completion.prompt_tokens
            entry["completion_tokens"] = answer.completion.completion_tokens
            entry["cost_usd"] = cost.cost_usd
            entry["cached"] = cost.cached
        merged = await store.merge_judge_score(
            self.pool,
            input.tenant_id,
            input.experiment_id,
            input.item_id,
            input.eval_name,
            entry,
            list(spec.judges),
            cost,
        )
        return JudgeItemResult(
            item_id=input.item_id,
            eval_name=input.eval_name,
            score=merged.scores[input.eval_name].get("score"),
            evaluated=merged.evaluated,
            cost_usd=cost.cost_usd or 0.0,
            cost_known=cost.cost_usd is not None,
            cached=cost.cached,
            saved_usd=cost.saved_usd,
        )
