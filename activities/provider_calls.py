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
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg
from opentelemetry import metrics, trace
from temporalio import activity

from activities.base import finishing_once_started, heartbeating, request_leaving
from activities.call_results import (
    Answer,
    judge_cost,
    judge_entry,
    judge_result,
    new_result,
    run_result,
    task_messages,
)
from activities.spend import CallSpend, judge_key, task_key
from konstruct.config import ExperimentSettings
from konstruct.experiments.evals import judge_messages
from konstruct.experiments.models import (
    JudgeItemInput,
    JudgeItemResult,
    LlmJudgeEval,
    RunItemInput,
    RunItemResult,
    TaskSpec,
    attempts_left,
)
from konstruct.experiments.store import cache, results
from konstruct.experiments.store import experiments as store
from konstruct.experiments.store.budgets import Reservation, SpendFlags
from konstruct.experiments.store.cache import CacheEntry
from konstruct.experiments.trajectory import Transcript
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
from konstruct.providers.tokens import TokenEstimates

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


C = TypeVar("C", results.TaskCall, results.JudgeCall)


@dataclass(frozen=True)
class _Plan:
    """The call an item still needs: its messages, and (cache on) its cache key and
    the entry found under it."""

    messages: list[dict[str, str]]
    key: str = ""
    hit: CacheEntry | None = None


@dataclass(frozen=True)
class ProviderRequest:
    """One request to one deployment: its messages, the task's settings (None: a
    judge call, sent without temperature or max_tokens) and its experiment."""

    provider: str
    deployment: Deployment
    messages: list[dict[str, Any]]
    task: TaskSpec | None
    # (tenant id, experiment id)
    experiment: tuple[str, str]
    # An agent's step: the tools it offers and its response format.
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def max_tokens(self) -> int | None:
        return self.task.max_tokens if self.task is not None else None


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
        # When (loop time) this process last lowered each provider's rate.
        self._lowered_at: dict[str, float] = {}
        self.tokens = TokenEstimates()
        # Prices, budget reservations (the cache is read with each item).
        self.spend = CallSpend(pool, self.deployments, settings.budget_hold_lease_s)

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

    def _ref(self, input: RunItemInput | JudgeItemInput) -> results.CallRef:
        return results.CallRef(
            input.tenant_id,
            input.experiment_id,
            input.item_id,
            self.task_queue,
            input.provider,
            input.seq,
        )

    def _deployment(self, deployment_id: str) -> Deployment:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise deployment_unavailable(deployment_id)
        return deployment

    async def _admit(self, provider: str) -> BreakerState:
        async with self.pool.acquire() as conn:
            admitted = await admit_call(conn, self.task_queue, provider, self.breaker)
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
        async with self.pool.acquire() as conn:
            effect = await record_outcome(
                conn,
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
        if effect.rate_lowered:
            self._lowered_at[provider] = asyncio.get_running_loop().time()
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
        request_leaving()
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
            async with self.pool.acquire() as conn:
                grant = await reserve_calls(
                    conn,
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

    async def until_slot(self, provider: str, at: float, booked_at: float) -> None:
        """Wait for a slot due at `at` (loop time), booked at `booked_at`. A slot
        booked before this process lowered the provider's rate was booked at the old
        rate, up to `schedule_horizon_s` ahead, and its call would meet the provider a
        429 had just said was full (bench idle-drop: 10 of 23 calls refused in the
        half second after a cut from 53 to 27 req/s). Such a call books again at the
        new rate and waits for that slot; the first is left unused. (Slots booked by
        other worker processes go at theirs until their own answers are counted.)"""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, at - loop.time()))
            if self._lowered_at.get(provider, -math.inf) <= booked_at:
                return
            booked_at = loop.time()
            grant = await self.book(provider, 1)
            at = booked_at + grant.first_in_s

    async def _call(self, request: ProviderRequest) -> Completion:
        """One request to one deployment, heartbeating while it runs."""
        return await heartbeating(
            complete_on(
                request.deployment.litellm_params,
                request.messages,
                timeout_s=self.settings.call_timeout_s,
                temperature=request.task.temperature if request.task is not None else None,
                max_tokens=request.max_tokens,
                response_format=request.task.response_format
                if request.task is not None
                else request.response_format,
                tools=request.tools,
            ),
            self.settings.heartbeat_every_s,
        )

    async def _provider_call(
        self,
        request: ProviderRequest,
        breaker: BreakerState | None,
        flags: SpendFlags | None = None,
    ) -> Answer:
        """Admit, reserve, call, learn, settle. Raises to retry, or `BudgetExhausted`
        (a budget is spent: no request made); returns a completion or a rejection."""
        # A closed breaker (read with the item) admits at once; otherwise ask under a lock.
        seen = breaker if breaker is not None and breaker.status == "closed" else None
        if seen is None:
            seen = await self._admit(request.provider)
        held, estimate = await self.hold(request, flags)
        answer: Answer | None = None
        try:
            answer = await self._booked_call(request, seen, estimate)
        finally:
            completion = answer.completion if answer is not None else None
            await self.spend.settle(held, request.deployment.deployment_id, completion)
        return answer

    async def hold(
        self, request: ProviderRequest, flags: SpendFlags | None
    ) -> tuple[Reservation | None, int]:
        """A call's estimated cost and tokens held against its budgets before it books
        a slot (`CallSpend.settle` releases them for what it used), with its token
        estimate. Raises `BudgetExhausted` when a budget is spent."""
        prompt_guess, completion_guess = self.tokens.split(
            request.provider, request.messages, request.max_tokens
        )
        held = await self.spend.reserve(
            request.experiment,
            flags,
            request.deployment.deployment_id,
            prompt_guess,
            completion_guess,
        )
        return held, prompt_guess + completion_guess

    async def _booked_call(
        self, request: ProviderRequest, seen: BreakerState, estimate: int
    ) -> Answer:
        """Book a slot on the provider's schedule, call, learn."""
        provider, deployment = request.provider, request.deployment
        # Every call takes a slot on the provider's schedule, batched or not, so
        # the rate holds whichever way calls reach it.
        booked_at = asyncio.get_running_loop().time()
        grant = await self.book(provider, 1, estimate)
        booked = estimate if grant.metered else 0
        await self.until_slot(provider, booked_at + grant.first_in_s, booked_at)
        started = time.perf_counter()
        with self.calling(provider, deployment) as span:
            try:
                completion = await self._call(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                rejected = await self._failed(request, seen, exc, started, booked)
                return Answer(None, (time.perf_counter() - started) * 1000, rejected)
        latency = (time.perf_counter() - started) * 1000
        _latency.record(latency, {"provider": provider})
        _calls.add(1, {"provider": provider, "outcome": "ok"})
        used = self.tokens.used(provider, request.messages, completion)
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
        request: ProviderRequest,
        seen: BreakerState,
        exc: Exception,
        sent: float,
        booked: float,
    ) -> ProviderFailure:
        """Learn from a failed call; raise to retry, or return the rejection to give up.
        A failed call used none of the tokens it `booked`: they go back."""
        failure = classify(exc)
        provider, (tenant_id, experiment_id) = request.provider, request.experiment
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
            await self._count_retried(tenant_id, experiment_id, "throttled")
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
        await self._count_retried(tenant_id, experiment_id, "call_failures")
        raise call_error(provider, failure)

    async def _count_retried(
        self, tenant_id: str, experiment_id: str, what: Literal["throttled", "call_failures"]
    ) -> None:
        """The failed call is retried (counted on the experiment) if its activity's
        retry policy leaves another attempt; on the last one the item fails instead,
        and its error kind says so."""
        if activity.in_activity():
            info = activity.info()
            policy = info.retry_policy
            if policy is not None and not attempts_left(policy.maximum_attempts, info.attempt):
                return
        async with tenant_transaction(self.pool, tenant_id) as conn:
            await store.count_retried_call(conn, tenant_id, experiment_id, what)

    # --- the activities ---------------------------------------------------------------

    async def _read(
        self,
        input: RunItemInput | JudgeItemInput,
        fetch: Callable[[asyncpg.Connection, results.CallRef], Awaitable[C | None]],
        plan: Callable[[store.StoredSpec, C], _Plan | None],
    ) -> tuple[store.StoredSpec, C | None, _Plan | None]:
        """The spec and the item, and (the item still needing its call, and no stop)
        the call's plan with its cache entry: one transaction."""
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            spec = await self._spec(conn, input.tenant_id, input.experiment_id)
            item = await fetch(conn, self._ref(input))
            planned = plan(spec, item) if item is not None and not item.stop_requested else None
            if planned is not None and planned.key:
                hit = (await cache.lookup(conn, input.tenant_id, [planned.key])).get(planned.key)
                planned = dataclasses.replace(planned, hit=hit)
        return spec, item, planned

    async def _answer(
        self,
        input: RunItemInput | JudgeItemInput,
        item: results.TaskCall | results.JudgeCall,
        planned: _Plan | None,
        task: TaskSpec | None,
    ) -> Answer:
        """The planned call's answer: from the cache (no request, no rate slot, no
        budget reservation), else from the provider. None made once a stop is asked."""
        if item.stop_requested:
            raise _stopping()
        assert planned is not None
        if planned.hit is not None:
            return Answer.from_cache(planned.hit)
        request = ProviderRequest(
            input.provider,
            self._deployment(input.deployment_id),
            planned.messages,
            task,
            (input.tenant_id, input.experiment_id),
        )
        answer = await self._provider_call(request, item.breaker, item.spend)
        return dataclasses.replace(answer, cache_key=planned.key)

    @activity.defn(name="experiment_run_item")
    @finishing_once_started
    async def run_item(self, input: RunItemInput) -> RunItemResult:
        """The task call of one item, its deterministic evals, and its result row, once.
        With the experiment's cache on, the same call made before answers it."""

        def plan(spec: store.StoredSpec, item: results.TaskCall) -> _Plan | None:
            if item.result is not None:
                return None
            messages = task_messages(spec, input.item_id, item.input, item.metadata)
            cached = item.spend.cache
            key = task_key(input.deployment_id, spec.task, messages, item.epoch) if cached else ""
            return _Plan(messages, key)

        spec, item, planned = await self._read(input, results.task_call, plan)
        if item is None:
            raise NotFound(f"item {input.item_id!r} is not in experiment {input.experiment_id!r}")
        if item.result is not None:
            return run_result(input.item_id, item.result, spec, fresh=False)
        answer = await self._answer(input, item, planned, spec.task)
        new = new_result(spec, item, answer, input.deployment_id, input.provider)
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            stored = await results.store_result(
                conn, input.tenant_id, input.experiment_id, input.item_id, new
            )
        return run_result(input.item_id, stored, spec, fresh=True, new=new)

    @activity.defn(name="experiment_judge_item")
    @finishing_once_started
    async def judge_item(self, input: JudgeItemInput) -> JudgeItemResult:
        """One llm_judge eval of one item; its score is merged into the result row once.
        Cached as task calls are, under its own key (judge deployment, judge prompt)."""

        def plan(spec: store.StoredSpec, item: results.JudgeCall) -> _Plan | None:
            judge = spec.judges.get(input.eval_name)
            if not isinstance(judge, LlmJudgeEval) or input.eval_name in item.scores:
                return None
            # An agent's item is judged on its whole transcript, not its last reply.
            output = (
                item.output
                if item.transcript is None
                else Transcript.model_validate(item.transcript).render()
            )
            messages = judge_messages(judge, item.input, output, item.expected)
            cached = item.spend.cache
            return _Plan(
                messages, judge_key(input.deployment_id, messages, item.epoch) if cached else ""
            )

        spec, item, planned = await self._read(input, results.judge_call, plan)
        judge = spec.judges.get(input.eval_name)
        if item is None or judge is None:
            raise NotFound(
                f"no task output or no eval {input.eval_name!r} for item {input.item_id!r}"
            )
        if input.eval_name in item.scores:
            return judge_result(input, item.scores[input.eval_name].get("score"), evaluated=True)
        answer = await self._answer(input, item, planned, None)
        assert isinstance(judge, LlmJudgeEval)
        cost = judge_cost(answer, input.deployment_id)
        async with tenant_transaction(self.pool, input.tenant_id) as conn:
            merged = await results.merge_judge_score(
                conn,
                input.tenant_id,
                input.experiment_id,
                input.item_id,
                input.eval_name,
                judge_entry(judge, answer, cost),
                list(spec.judges),
                cost,
            )
        score = merged.scores[input.eval_name].get("score")
        return judge_result(input, score, merged.evaluated, cost)
