"""Task calls of several items to one provider in one activity: the high-rate path.

At a hundred calls a second and more, what bounds an experiment is not the
provider but the cost of one activity per item (its task, its events, its
database round trips). A batch pays those once for many items:

- its items are read in one query;
- its calls book their slots on the provider's shared schedule
  (`konstruct.providers.store.reserve_calls`: one virtual clock per provider
  in PostgreSQL, shared by every worker and experiment, and by the single-item
  path too) and go out paced at the provider's rate, a few at a time, so a
  stop is seen before the next booking;
- their answers are counted per worker and provider every quarter second (a
  429 at once) instead of one locked row update per call;
- their results are written together, one transaction per group of answers
  that arrived while the last one was written, each as soon as it can be, so a
  worker killed mid-batch leaves every answered item's result stored and its
  retry calls only what was still in flight.

A batch makes one attempt per item. What it cannot settle by itself, a 429, a
failing provider, an item it cannot find, it hands back (`retry`) and the
workflow runs that item on the single-item path, whose Temporal retries, server
waits and breaker admission handle the hard cases.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from opentelemetry import trace
from temporalio import activity

from activities.base import finishing_once_started
from activities.call_results import Answer, batch_result, new_result, task_messages
from activities.provider_calls import (
    ProviderCallActivities,
    ProviderRequest,
    _calls,
    _latency,
    _throttled,
)
from activities.spend import task_key
from konstruct.experiments.models import (
    BatchItem,
    BatchItemResult,
    RunBatchInput,
    RunBatchResult,
    attempts_left,
)
from konstruct.experiments.store import cache, results
from konstruct.experiments.store import experiments as store
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import BudgetExhausted
from konstruct.providers.adapter import (
    AnnouncedLimits,
    Completion,
    ProviderFailure,
    call_error,
    classify,
    complete_on,
)
from konstruct.providers.store import OutcomeCounts, record_outcomes


class _Ledger:
    """One provider's answers in this worker, not yet counted in PostgreSQL."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.flushed_at = time.monotonic()
        self._clear()

    def _clear(self) -> None:
        self.ok = self.throttled = self.failures = self.failures_after_ok = 0
        self.retry_after_s: float | None = None
        self.newest_429_sent: float | None = None
        self.last_error = ""
        self.token_excess = 0.0
        self.limits: AnnouncedLimits | None = None

    def answered(self, token_excess: float, limits: AnnouncedLimits | None) -> None:
        """Any answer: the tokens it used beyond its booking, the limits it announced."""
        self.token_excess += token_excess
        if limits is not None:
            self.limits = limits

    def ok_answer(self) -> None:
        self.ok += 1
        self.failures_after_ok = 0

    def refused(self, retry_after_s: float | None, sent: float) -> None:
        self.throttled += 1
        if retry_after_s is not None:
            self.retry_after_s = max(self.retry_after_s or 0.0, retry_after_s)
        self.newest_429_sent = max(self.newest_429_sent or sent, sent)

    def failed(self, error: str) -> None:
        self.failures += 1
        self.failures_after_ok += 1
        self.last_error = error

    def take(self) -> OutcomeCounts | None:
        if not (self.ok or self.throttled or self.failures or self.token_excess):
            return None
        counts = OutcomeCounts(
            ok=self.ok,
            throttled=self.throttled,
            failures=self.failures,
            failures_after_ok=self.failures_after_ok,
            retry_after_s=self.retry_after_s,
            newest_429_age_s=None
            if self.newest_429_sent is None
            else time.perf_counter() - self.newest_429_sent,
            last_error=self.last_error,
            token_excess=self.token_excess,
            limits=self.limits,
        )
        self._clear()
        self.flushed_at = time.monotonic()
        return counts


class _ResultWriter:
    """Writes a batch's results as they come: whatever arrived while the last
    write ran goes in the next, one transaction each."""

    def __init__(self, pool: asyncpg.Pool, tenant_id: str, experiment_id: str) -> None:
        self.pool, self.tenant_id, self.experiment_id = pool, tenant_id, experiment_id
        self._queue: list[tuple[str, results.NewResult, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None

    async def write(
        self, item_id: str, new: results.NewResult
    ) -> tuple[results.StoredResult, bool]:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item_id, new, future))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._write_queued())
        return await future

    async def _write_queued(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            try:
                async with tenant_transaction(self.pool, self.tenant_id) as conn:
                    stored = await results.store_results(
                        conn,
                        self.tenant_id,
                        self.experiment_id,
                        [(item_id, new) for item_id, new, _ in group],
                    )
            except Exception as exc:
                for _, _, future in group:
                    future.set_exception(exc)
                continue
            for item_id, _, future in group:
                future.set_result(stored[item_id])


@dataclass(frozen=True)
class _Call:
    """One item's call in a batch: its messages, and the tokens they are guessed at."""

    item: BatchItem
    call: results.TaskCall
    messages: list[dict[str, str]]
    estimate: int


@dataclass
class _Batch:
    input: RunBatchInput
    spec: store.StoredSpec
    writer: _ResultWriter
    throttled: int = 0
    failures: int = 0
    # Item id -> the cache key its call's output is stored under (cache on).
    keys: dict[str, str] = field(default_factory=dict)


def _seqs(items: list[BatchItem]) -> list[int] | None:
    """The items' places in the dataset, if the batch carries every one."""
    seqs = [i.seq for i in items]
    return None if any(seq is None for seq in seqs) else [s for s in seqs if s is not None]


class ProviderBatchActivities:
    """Shares the single-item path's plumbing: its pool, deployments, settings,
    spec cache, rate push and schedule booking."""

    def __init__(self, calls: ProviderCallActivities) -> None:
        self.calls = calls
        self._ledgers: dict[str, _Ledger] = {}

    @activity.defn(name="experiment_run_batch")
    @finishing_once_started
    async def run_batch(self, input: RunBatchInput) -> RunBatchResult:
        calls = self.calls
        async with tenant_transaction(calls.pool, input.tenant_id) as conn:
            spec = await calls._spec(conn, input.tenant_id, input.experiment_id)
            found = await results.task_calls(
                conn,
                input.tenant_id,
                input.experiment_id,
                [i.item_id for i in input.items],
                calls.task_queue,
                input.provider,
                seqs=_seqs(input.items),
            )
            keys, hits = await self._cached(conn, input, spec, found)
        out: dict[str, BatchItemResult] = {}
        todo: list[tuple[BatchItem, results.TaskCall]] = []
        answered: list[tuple[BatchItem, results.NewResult]] = []
        for item in input.items:
            call = found.get(item.item_id)
            if call is None or item.deployment_id not in calls.deployments:
                # The single-item path says what is wrong, non-retryably.
                out[item.item_id] = BatchItemResult(item_id=item.item_id, status="retry")
            elif call.result is not None:
                out[item.item_id] = batch_result(item.item_id, call.result, spec, fresh=False)
            elif call.stop_requested:
                out[item.item_id] = BatchItemResult(item_id=item.item_id, status="stopped")
            elif item.item_id in hits:
                # Answered by the cache: no call, no slot, no reservation.
                hit = Answer.from_cache(hits[item.item_id])
                new = new_result(spec, call, hit, item.deployment_id, input.provider)
                answered.append((item, new))
            else:
                todo.append((item, call))
        if answered:
            async with tenant_transaction(calls.pool, input.tenant_id) as conn:
                stored = await results.store_results(
                    conn,
                    input.tenant_id,
                    input.experiment_id,
                    [(item.item_id, new) for item, new in answered],
                )
            for item, new in answered:
                row, fresh = stored[item.item_id]
                out[item.item_id] = batch_result(item.item_id, row, spec, fresh, new)
        breaker = todo[0][1].breaker if todo else None
        if breaker is not None and breaker.status != "closed":
            # The provider is failing: its single calls wait for the breaker's probe.
            for item, _ in todo:
                out[item.item_id] = BatchItemResult(item_id=item.item_id, status="retry")
        elif todo:
            batch = _Batch(
                input,
                spec,
                _ResultWriter(calls.pool, input.tenant_id, input.experiment_id),
                keys=keys,
            )
            for result in await self._call_all(batch, todo):
                out[result.item_id] = result
            await self._flush(input.provider, force=True)
            # A refused item goes to the single path with all its attempts; a failed
            # call was one of them, retried only if another is left.
            retried: tuple[tuple[Literal["throttled", "call_failures"], int], ...] = (
                ("throttled", batch.throttled),
                ("call_failures", batch.failures if attempts_left(input.max_attempts, 1) else 0),
            )
            for what, n in retried:
                if n:
                    async with tenant_transaction(calls.pool, input.tenant_id) as conn:
                        await store.count_retried_call(
                            conn, input.tenant_id, input.experiment_id, what, n
                        )
        return RunBatchResult(items=[out[i.item_id] for i in input.items])

    async def _call_all(
        self, batch: _Batch, todo: list[tuple[BatchItem, results.TaskCall]]
    ) -> list[BatchItemResult]:
        """Book slots a few at a time and start each call at its slot; items left
        unbooked when a stop comes are `stopped`."""
        loop = asyncio.get_running_loop()
        inp = batch.input
        max_tokens = batch.spec.task.max_tokens
        calls = [
            _Call(
                item,
                call,
                messages := task_messages(batch.spec, item.item_id, call.input, call.metadata),
                self.calls.tokens.estimate(inp.provider, messages, max_tokens),
            )
            for item, call in todo
        ]
        started: list[asyncio.Task[BatchItemResult]] = []
        results: list[BatchItemResult] = []
        index = 0
        began, every_s = loop.time(), self.calls.settings.heartbeat_every_s

        def beat() -> None:
            # As the single-call path's: none in the first `heartbeat_every_s`. A
            # batch at 100 req/s ends in a fraction of a second, and the first
            # heartbeat (sent at once, not throttled) was one more request and
            # history write on the server for each.
            if loop.time() - began >= every_s:
                activity.heartbeat()

        try:
            while index < len(calls):
                if index and await self._stop_requested(inp):
                    break
                left = calls[index:]
                tokens_each = sum(c.estimate for c in left) / len(left)
                booked_at = loop.time()
                grant = await self.calls.book(inp.provider, len(left), tokens_each)
                base = loop.time() + grant.first_in_s
                for k in range(grant.granted):
                    call = calls[index]
                    index += 1
                    at = base + k * grant.interval_s
                    booked = tokens_each if grant.metered else 0.0
                    started.append(
                        asyncio.create_task(self._one(batch, call, (at, booked_at), booked))
                    )
                # Book again when the last slot booked is due.
                await asyncio.sleep(
                    max(0.0, base + (grant.granted - 1) * grant.interval_s - loop.time())
                )
                beat()
            results = [
                BatchItemResult(item_id=c.item.item_id, status="stopped") for c in calls[index:]
            ]
            pending = set(started)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=every_s)
                beat()
        finally:
            for task in started:
                if not task.done():
                    task.cancel()
        return [task.result() for task in started] + results

    async def _cached(
        self,
        conn: asyncpg.Connection,
        input: RunBatchInput,
        spec: store.StoredSpec,
        found: dict[str, results.TaskCall],
    ) -> tuple[dict[str, str], dict[str, cache.CacheEntry]]:
        """With the experiment's cache on: each item's cache key, and the entries
        found under them (one query for the batch)."""
        keys: dict[str, str] = {}
        for item in input.items:
            call = found.get(item.item_id)
            if call is None or not call.spend.cache or call.result is not None:
                continue
            messages = task_messages(spec, item.item_id, call.input, call.metadata)
            keys[item.item_id] = task_key(item.deployment_id, spec.task, messages, call.epoch)
        if not keys:
            return keys, {}
        entries = await cache.lookup(conn, input.tenant_id, keys.values())
        return keys, {i: entries[k] for i, k in keys.items() if k in entries}

    async def _stop_requested(self, inp: RunBatchInput) -> bool:
        async with tenant_transaction(self.calls.pool, inp.tenant_id) as conn:
            return await store.stop_requested(conn, inp.tenant_id, inp.experiment_id)

    async def _one(
        self, batch: _Batch, one: _Call, slot: tuple[float, float], booked: float
    ) -> BatchItemResult:
        """One item's task call at its slot (due at, booked at: loop times), learned
        from and stored; `booked`: the tokens its slot booked (0: not metered),
        settled with what it used."""
        await self.calls.until_slot(batch.input.provider, *slot)
        item, inp, calls = one.item, batch.input, self.calls
        ledger = self._ledgers.setdefault(inp.provider, _Ledger())
        try:
            # Held against the budgets until answered, as on the single-item path.
            held, _ = await calls.hold(self._request(batch, one), one.call.spend)
        except BudgetExhausted as exc:
            ledger.answered(-booked, None)  # no request: its slot's tokens go back
            return BatchItemResult(item_id=item.item_id, status="budget", message=str(exc))
        sent = time.perf_counter()
        completion: Completion | None = None
        try:
            completion, failure = await self._send(batch, one)
        finally:
            await calls.spend.settle(held, item.deployment_id, completion)
        learned = self._learn(batch, one, ledger, booked, sent, completion, failure)
        await self._flush(inp.provider)
        if isinstance(learned, BatchItemResult):
            return learned
        return await self._store(batch, one, learned)

    def _request(self, batch: _Batch, one: _Call) -> ProviderRequest:
        inp = batch.input
        deployment = self.calls.deployments[one.item.deployment_id]
        experiment = (inp.tenant_id, inp.experiment_id)
        return ProviderRequest(inp.provider, deployment, one.messages, batch.spec.task, experiment)

    async def _send(
        self, batch: _Batch, one: _Call
    ) -> tuple[Completion | None, ProviderFailure | None]:
        """The request, traced: its completion, or what its failure was."""
        deployment = self.calls.deployments[one.item.deployment_id]
        task = batch.spec.task
        with self.calls.calling(batch.input.provider, deployment) as span:
            try:
                completion = await complete_on(
                    deployment.litellm_params,
                    one.messages,
                    timeout_s=self.calls.settings.call_timeout_s,
                    temperature=task.temperature,
                    max_tokens=task.max_tokens,
                    response_format=task.response_format,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                return None, classify(exc)
        return completion, None

    def _learn(
        self,
        batch: _Batch,
        one: _Call,
        ledger: _Ledger,
        booked: float,
        sent: float,
        completion: Completion | None,
        failure: ProviderFailure | None,
    ) -> Answer | BatchItemResult:
        """Count an answer in the ledger and the metrics: the answer to store, or (not
        answered) what the workflow does with the item."""
        provider, item = batch.input.provider, one.item
        latency_ms = (time.perf_counter() - sent) * 1000
        if completion is not None:
            used = self.calls.tokens.used(provider, one.messages, completion)
            ledger.answered(used - booked if booked else 0.0, completion.limits)
            ledger.ok_answer()
            _calls.add(1, {"provider": provider, "outcome": "ok"})
            _latency.record(latency_ms, {"provider": provider})
            return Answer(
                completion,
                latency_ms,
                cost_usd=self.calls.spend.cost_of(item.deployment_id, completion),
                cache_key=batch.keys.get(item.item_id, ""),
            )
        assert failure is not None
        ledger.answered(-booked, failure.limits)  # a call with no answer used no tokens
        if failure.posture == "rejected":
            _calls.add(1, {"provider": provider, "outcome": "rejected"})
            return Answer(None, latency_ms, failure)
        return self._unanswered(batch, item, ledger, failure, sent)

    def _unanswered(
        self, batch: _Batch, item: BatchItem, ledger: _Ledger, failure: ProviderFailure, sent: float
    ) -> BatchItemResult:
        """A 429, a failing provider or a spent quota: the item goes back to the workflow."""
        provider, settings = batch.input.provider, self.calls.settings
        retry_in = 0.0
        if failure.posture == "throttled":
            ledger.refused(failure.retry_after_s, sent)
            batch.throttled += 1
            _throttled.add(1, {"provider": provider})
            retry_in = failure.retry_after_s or settings.retry_initial_s
        elif failure.posture == "failed":
            ledger.failed(failure.message)
            batch.failures += 1
            retry_in = settings.retry_initial_s
        outcome = "failure" if failure.posture == "failed" else failure.posture
        _calls.add(1, {"provider": provider, "outcome": outcome})
        if failure.posture == "quota":
            return BatchItemResult(
                item_id=item.item_id,
                status="quota",
                message=f"provider {provider!r} quota exceeded: {failure.message}",
            )
        if failure.posture == "failed":
            # One of the item's attempts: the single path makes the rest, if any.
            error = call_error(provider, failure)
            return BatchItemResult(
                item_id=item.item_id,
                status="retry",
                retry_in_s=retry_in,
                failed_kind=error.type,
                message=error.message,
            )
        return BatchItemResult(item_id=item.item_id, status="retry", retry_in_s=retry_in)

    async def _store(self, batch: _Batch, one: _Call, answer: Answer) -> BatchItemResult:
        """The answered item's result row, written with the others that arrive meanwhile."""
        item = one.item
        new = new_result(batch.spec, one.call, answer, item.deployment_id, batch.input.provider)
        try:
            stored, fresh = await batch.writer.write(item.item_id, new)
        except (asyncpg.PostgresError, OSError) as exc:
            # Answered but not stored: the single-item path calls again and stores it.
            activity.logger.warning("result of %s not stored: %s", item.item_id, exc)
            return BatchItemResult(item_id=item.item_id, status="retry")
        return batch_result(item.item_id, stored, batch.spec, fresh, new)

    async def _flush(self, provider: str, force: bool = False) -> None:
        """Count this worker's answers from the provider: when due, at once after a 429."""
        ledger = self._ledgers.get(provider)
        if ledger is None:
            return
        settings = self.calls.settings
        due = ledger.throttled or time.monotonic() - ledger.flushed_at >= settings.outcome_flush_s
        if not (due or force):
            return
        async with ledger.lock:
            counts = ledger.take()
            if counts is None:
                return
            try:
                async with self.calls.pool.acquire() as conn:
                    effect = await record_outcomes(
                        conn,
                        self.calls.task_queue,
                        provider,
                        counts,
                        breaker_seen=None,
                        aimd=self.calls.aimd,
                        breaker=self.calls.breaker,
                    )
            except (asyncpg.PostgresError, OSError) as exc:
                # The rate learns from the next ones; the results matter more.
                activity.logger.warning("answers of %s not counted: %s", provider, exc)
                return
        await self.calls.apply_effect(provider, effect, "batch")
