"""Experiment: run a task over every item of a dataset, score it, summarise it.

The workflow holds ids and counters, never outputs: items and results live in
PostgreSQL. Each item is one activity on its provider's task queue (the task
call plus its deterministic evals), then one per `llm_judge` eval on the
judge's provider queue. The Temporal server dispatches each provider queue at
the provider's adaptive rate and round-robin across experiments (fairness key
= experiment id), so an item waiting for capacity holds no worker slot.

One module, longer than most, because it is one concept: dispatching, stop and
resume, continue-as-new and the monitor all read and write the same in-memory
counters and in-flight set, and splitting them would pass that state around.
"""

from __future__ import annotations

import asyncio
import zlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import Priority, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.experiments import ExperimentActivities
    from activities.provider_batches import ProviderBatchActivities
    from activities.provider_calls import ProviderCallActivities
    from konstruct.experiments.models import (
        BatchItem,
        BatchItemResult,
        BudgetProgress,
        ExperimentCarry,
        ExperimentInput,
        ExperimentProgress,
        ExperimentResult,
        ExperimentStatus,
        ExperimentSummary,
        FinalizeInput,
        JudgeItemInput,
        JudgeItemResult,
        LatencyStats,
        MonitorInput,
        MonitorResult,
        PauseKind,
        PendingItem,
        PendingPage,
        PendingPageInput,
        PrepareInput,
        PrepareResult,
        ProviderProgress,
        RecordFailureInput,
        ResultCount,
        ResultCountInput,
        Route,
        RunBatchInput,
        RunBatchResult,
        RunItemInput,
        RunItemResult,
        StopFlagInput,
        StopFlagResult,
        ToggleInput,
        ToggleRecord,
        ToggleResult,
        WaitingCalls,
        WaitingCallsInput,
        usd,
    )
    from konstruct.platform.errors import (
        BudgetExhausted,
        ExperimentStopped,
        QuotaExceeded,
        workflow_failure,
    )
    from konstruct.platform.naming import ProviderQueue
    from konstruct.platform.temporal.search_attributes import KIND, STATUS, TENANT
    from konstruct.platform.temporal.validation import parse_input


# Loading a 20,000-line dataset takes seconds; a database restart is survived
# by retrying.
PREPARE_TIMEOUT = timedelta(minutes=5)
PREPARE_HEARTBEAT = timedelta(seconds=10)
# Short, so a call lost with a killed worker is retried within seconds.
DB_TIMEOUT = timedelta(seconds=10)
MONITOR_TIMEOUT = timedelta(seconds=5)
FINALIZE_TIMEOUT = timedelta(minutes=2)
# Our errors (InvalidInput, NotFound, ExperimentStopped) arrive marked
# non-retryable by the worker's interceptor: no list of type names here.
DB_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
)
# Toggle records kept in `progress`.
TOGGLE_HISTORY = 20
# Patch marker: runs recorded before it drained every queued call before
# continue-as-new; runs after it cancel the ones not started yet.
CANCEL_WAITING_BEFORE_NEW_RUN = "cancel-waiting-calls-before-continue-as-new"
# Patch marker: runs recorded before it reported `completed` from the workflow's
# own counters; runs after it count results in PostgreSQL first, dispatch the
# items left without one again (after these pauses), and else end `incomplete`.
SETTLE_UNFINISHED = "settle-items-without-a-result"
SETTLE_PAUSES_S = (1.0, 2.0, 4.0)
# Patch marker: runs after it send task calls in batches while the provider's
# rate is high (`ExperimentOptions.batch_*`), and count `continue_as_new_every`
# in task activities (one item, or one batch) rather than items.
BATCH_CALLS = "batch-task-calls-at-high-rates"
# Patch marker: a stop or resume that arrives while a run is still loading (its
# first moments, after every continue-as-new too) is kept and applied once the
# run has loaded; before, it was refused, and a signal's refusal is silent.
QUEUE_EARLY_TOGGLES = "queue-toggles-while-loading"
# A batch waits for its slots on the provider's schedule; its heartbeat, not
# this, is what notices a dead worker.
BATCH_TIMEOUT = timedelta(minutes=30)
BATCHES_IN_FLIGHT = 8
# No local activities here: the monitor, the dispatch loop and failing items run
# concurrently, and concurrent local activities resolve in completion order when
# first run but in sequence order on replay (a behaviour of the Python SDK), which
# broke replay of this workflow without a cache.


def pick_route(routes: list[Route], item_id: str) -> Route:
    """The same deployment for an item on every attempt, run and restart."""
    return routes[zlib.crc32(item_id.encode()) % len(routes)]


@workflow.defn
class Experiment:
    def __init__(self) -> None:
        self._input: ExperimentInput | None = None
        self._carry: ExperimentCarry | None = None
        self._status: ExperimentStatus = "running"
        self._paused_reason: str | None = None
        self._error: str | None = None
        self._stop_requested = False
        self._early_toggles: list[tuple[str, ToggleInput | None]] = []
        self._in_flight: dict[str, Any] = {}
        self._handles: dict[str, Any] = {}
        self._dispatched = 0
        self._done_this_run = 0
        self._monitor: MonitorResult | None = None
        self._providers: list[ProviderProgress] = []
        self._items_per_s = 0.0
        self._last_sample: tuple[float, int] | None = None
        self._finishing = False
        self._monitor_off = False
        # Set when a provider said its quota is spent, or a budget is: the experiment
        # pauses (a stop made by the workflow itself) until someone resumes it.
        self._quota_reason: str | None = None
        self._pause_kind: PauseKind | None = None
        # The experiment's and its tenant's budget at the last monitor sample.
        self._budget: BudgetProgress | None = None
        # Items found without a result at the end, and the last reason one was left so.
        self._unfinished = 0
        self._unrecorded: str | None = None
        # Set once per run (`BATCH_CALLS`); task activities dispatched this run.
        self._batching = False
        self._calls_this_run = 0

    # --- messages ------------------------------------------------------------------

    @workflow.query
    def progress(self) -> ExperimentProgress:
        inp, carry = self._input, self._carry
        if inp is None:
            return ExperimentProgress(experiment_id="", tenant_id="", name="", status="running")
        total = carry.prepared.total if carry else 0
        done = (carry.evaluated + carry.failed) if carry else 0
        refusals = [t for t in (carry.toggles if carry else []) if not t.accepted]
        eta = None
        if self._items_per_s > 0 and total:
            eta = round((total - done) / self._items_per_s, 1)
        return ExperimentProgress(
            experiment_id=inp.experiment_id,
            tenant_id=inp.tenant_id,
            name=inp.name or inp.experiment_id,
            status=self._status,
            paused_reason=self._paused_reason,
            paused_kind=(self._pause_kind or "breaker") if self._status == "paused" else None,
            total=total,
            completed=carry.completed if carry else 0,
            failed=carry.failed if carry else 0,
            in_flight=len(self._in_flight),
            evaluated=carry.evaluated if carry else 0,
            max_concurrency=inp.max_concurrency,
            slot_utilisation=round(len(self._in_flight) / inp.max_concurrency, 3),
            items_per_s=round(self._items_per_s, 2),
            eta_s=eta,
            providers=self._providers,
            latency=self._monitor.latency if self._monitor else LatencyStats(),
            prompt_tokens=carry.prompt_tokens if carry else 0,
            completion_tokens=carry.completion_tokens if carry else 0,
            cost_usd=round(carry.cost_usd, 9) if carry else 0.0,
            cost_known=carry.cost_known if carry else True,
            cache_hits=carry.cache_hits if carry else 0,
            cost_saved_usd=round(carry.cost_saved_usd, 9) if carry else 0.0,
            budget=self._budget,
            run_index=carry.run_index if carry else 0,
            toggles=list(carry.toggles) if carry else [],
            last_refusal=refusals[-1] if refusals else None,
            error=self._error,
            unfinished=self._unfinished,
            incomplete_reason=self._unrecorded if self._status == "incomplete" else None,
        )

    @workflow.signal
    def stop(self, input: ToggleInput | None = None) -> None:
        self._toggle("stop", input)

    @workflow.signal
    def resume(self, input: ToggleInput | None = None) -> None:
        self._toggle("resume", input)

    @workflow.update
    def request_stop(self, input: ToggleInput | None = None) -> ToggleResult:
        """`stop`, answered: accepted, or refused with the reason."""
        return self._toggle("stop", input)

    @workflow.update
    def request_resume(self, input: ToggleInput | None = None) -> ToggleResult:
        return self._toggle("resume", input)

    def _toggle(self, action: str, input: ToggleInput | None) -> ToggleResult:
        loading = (self._carry is None or self._input is None) and not self._finishing
        if loading and workflow.patched(QUEUE_EARLY_TOGGLES):
            self._early_toggles.append((action, input))
            return ToggleResult(
                accepted=True,
                status=self._status,
                reason=f"{action} queued: applied as soon as the run has loaded",
            )
        now = workflow.now()
        reason = self._refusal(action, now.timestamp())
        accepted = reason is None
        if accepted:
            self._stop_requested = action == "stop"
        if self._carry is not None:
            if accepted:
                self._carry.last_toggle_at = now.timestamp()
            by = f" by {input.by}" if input and input.by else ""
            self._carry.toggles = [
                *self._carry.toggles,
                ToggleRecord(
                    action="stop" if action == "stop" else "resume",
                    accepted=accepted,
                    reason=(reason or "accepted") + by,
                    at=now.isoformat(),
                ),
            ][-TOGGLE_HISTORY:]
        self._publish()
        return ToggleResult(accepted=accepted, status=self._status, reason=reason or "accepted")

    def _refusal(self, action: str, now: float) -> str | None:
        if self._finishing or self._status in ("completed", "failed"):
            return f"the experiment is {self._status}"
        if self._carry is None or self._input is None:
            return "the experiment is still loading its dataset; try again in a moment"
        if action == "stop" and self._stop_requested:
            return f"the experiment is already {self._status}"
        if action == "resume" and not self._stop_requested:
            return f"the experiment is not stopped (it is {self._status})"
        last = self._carry.last_toggle_at
        cooldown = self._input.options.toggle_cooldown_s
        if last is not None and now - last < cooldown:
            return (
                f"too soon: {now - last:.1f} s since the last stop/resume; wait "
                f"{cooldown - (now - last):.1f} s more (cooldown {cooldown:g} s)"
            )
        return None

    # --- the run -------------------------------------------------------------------

    @workflow.run
    async def run(self, raw_input: dict[str, Any]) -> ExperimentResult:
        inp = parse_input(ExperimentInput, raw_input, "Experiment")
        self._input = inp
        self._batching = workflow.patched(BATCH_CALLS)
        workflow.upsert_search_attributes(
            [
                TENANT.value_set(inp.tenant_id),
                KIND.value_set("experiment"),
                STATUS.value_set("running"),
            ]
        )
        if inp.carry is None:
            self._publish("loading the dataset")
            try:
                prepared: PrepareResult = await workflow.execute_activity_method(
                    ExperimentActivities.prepare,
                    PrepareInput(experiment=inp, workflow_id=workflow.info().workflow_id),
                    start_to_close_timeout=PREPARE_TIMEOUT,
                    heartbeat_timeout=PREPARE_HEARTBEAT,
                    retry_policy=DB_RETRY_POLICY,
                )
            except ActivityError as err:
                self._set_status("failed")
                self._error = str(err.cause or err)
                raise workflow_failure(err) from None
            self._carry = ExperimentCarry(
                prepared=prepared,
                completed=prepared.completed,
                failed=prepared.failed,
                evaluated=prepared.evaluated,
                cost_usd=prepared.cost_usd,
                cost_known=prepared.cost_known,
                cache_hits=prepared.cache_hits,
                cost_saved_usd=prepared.cost_saved_usd,
                started_at=workflow.now().timestamp(),
            )
        else:
            self._carry = inp.carry
            self._stop_requested = inp.carry.stop_requested
        early, self._early_toggles = self._early_toggles, []
        for action, toggle in early:
            self._toggle(action, toggle)
        monitor_task = asyncio.create_task(self._monitor_loop())
        outcome = "again"
        while outcome != "done":
            if self._stop_requested:
                await self._stop_and_wait()
                continue
            outcome = await self._dispatch_pass()
            if outcome == "done" and workflow.patched(SETTLE_UNFINISHED):
                outcome = await self._settle_unfinished()
            if outcome == "continue_as_new":
                self._monitor_off = True
                await monitor_task
                await workflow.wait_condition(workflow.all_handlers_finished)
                carry = self._carry
                carry.run_index += 1
                carry.stop_requested = self._stop_requested
                next_input = inp.model_copy(update={"carry": carry})
                if next_input.dataset.items is not None:
                    # The items are in PostgreSQL; the next run's history need not carry them.
                    next_input.dataset = next_input.dataset.model_copy(update={"items": []})
                workflow.continue_as_new(next_input.model_dump(mode="json", exclude_none=True))
        self._finishing = self._monitor_off = True
        await monitor_task
        status: ExperimentStatus = "incomplete" if self._unfinished else "completed"
        self._set_status(status)
        summary: ExperimentSummary = await workflow.execute_activity_method(
            ExperimentActivities.finalize,
            FinalizeInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                name=inp.name or inp.experiment_id,
                status=status,
                reason=self._unrecorded if self._unfinished else None,
                workflow_id=workflow.info().workflow_id,
                workflow_run_id=workflow.info().run_id,
                providers=self._carry.prepared.providers,
                params={
                    "model_group": inp.task.model_group,
                    "evals": [e.kind for e in inp.evals],
                    "max_concurrency": inp.max_concurrency,
                },
            ),
            start_to_close_timeout=FINALIZE_TIMEOUT,
            retry_policy=DB_RETRY_POLICY,
        )
        self._publish()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return ExperimentResult(summary=summary, registry_run_id=summary.registry_run_id)

    async def _dispatch_pass(self) -> str:
        """Dispatch every pending item once; 'done', 'stopped', 'again' or 'continue_as_new'."""
        assert self._input is not None and self._carry is not None
        inp = self._input
        cursor = -1
        dispatched = 0
        outcome = "again"
        upcoming: Any = None
        while outcome == "again":
            if upcoming is not None:
                page: PendingPage = await upcoming
            else:
                page = await self._pending_page(cursor)
            upcoming = None
            if not page.items:
                break
            if self._batching:
                # The next page is read while this one is dispatched: a page read
                # takes tens of ms, a dip of that at every page at 200 items/s.
                upcoming = asyncio.create_task(self._pending_page(page.items[-1].seq))
            # Items gathered into batches, per provider, not yet dispatched.
            gathered: dict[str, list[PendingItem]] = {}
            for item in page.items:
                if len(self._in_flight) >= inp.max_concurrency:
                    self._dispatch_batches(gathered)
                await workflow.wait_condition(
                    lambda: len(self._in_flight) < inp.max_concurrency or self._stop_requested
                )
                if self._stop_requested:
                    outcome = "stopped"
                    break
                if self._should_continue_as_new():
                    outcome = "continue_as_new"
                    break
                cursor = item.seq
                if item.item_id in self._in_flight:
                    continue
                self._in_flight[item.item_id] = True
                dispatched += 1
                size, provider = self._batch_size(item)
                if size <= 1:
                    self._calls_this_run += 1
                    asyncio.create_task(self._run_item(item))
                    continue
                batch = gathered.setdefault(provider, [])
                batch.append(item)
                if len(batch) >= size:
                    self._dispatch_batches({provider: gathered.pop(provider)})
            if outcome == "again":
                self._dispatch_batches(gathered)
            else:
                for batch in gathered.values():  # never sent: still pending
                    for item in batch:
                        self._in_flight.pop(item.item_id, None)
        if outcome == "continue_as_new" and workflow.patched(CANCEL_WAITING_BEFORE_NEW_RUN):
            await self._cancel_waiting_calls()
        await workflow.wait_condition(lambda: not self._in_flight)
        if outcome != "again":
            return outcome
        if self._stop_requested:
            return "stopped"
        return "again" if dispatched else "done"

    async def _pending_page(self, after_seq: int) -> PendingPage:
        assert self._input is not None
        inp = self._input
        page: PendingPage = await workflow.execute_activity_method(
            ExperimentActivities.pending_page,
            PendingPageInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                after_seq=after_seq,
                limit=inp.options.page_size,
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY_POLICY,
        )
        return page

    async def _settle_unfinished(self) -> str:
        """'done' when PostgreSQL holds a result for every item; else 'again' (the
        next pass dispatches the items left without one), or, after the last
        pause, 'done' with `_unfinished` set: the experiment ends `incomplete`."""
        assert self._input is not None and self._carry is not None
        inp, carry = self._input, self._carry
        count: ResultCount = await workflow.execute_activity_method(
            ExperimentActivities.result_count,
            ResultCountInput(tenant_id=inp.tenant_id, experiment_id=inp.experiment_id),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY_POLICY,
        )
        # The total prepare loaded is what must be accounted for, whatever the rows say.
        self._unfinished = max(carry.prepared.total, count.total) - count.with_result
        if self._unfinished <= 0:
            self._unfinished = 0
            return "done"
        if carry.settle_rounds >= len(SETTLE_PAUSES_S):
            self._unrecorded = (
                f"{self._unfinished} of {carry.prepared.total} items have no result after "
                f"{carry.settle_rounds} more passes: {self._unrecorded or 'none could be run'}"
            )
            return "done"
        self._publish(f"{self._unfinished} items without a result: dispatching them again")
        await workflow.sleep(SETTLE_PAUSES_S[carry.settle_rounds])
        carry.settle_rounds += 1
        return "again"

    async def _cancel_waiting_calls(self) -> None:
        """Before continue-as-new: calls still queued for capacity go to the next run.

        Draining them here would leave the provider idle while the queue empties;
        cancelled before they start, they make no request, and their items, still
        without a result, are the next run's first page. Calls already started finish.
        """
        waiting: WaitingCalls = await workflow.execute_activity_method(
            ExperimentActivities.waiting_calls,
            WaitingCallsInput(workflow_id=workflow.info().workflow_id),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY_POLICY,
        )
        self._cancel_calls(waiting.activity_ids)

    def _cancel_calls(self, activity_ids: list[str]) -> None:
        for activity_id in activity_ids:
            handle = self._handles.get(activity_id)
            if handle is not None and not handle.done():
                handle.cancel()

    def _should_continue_as_new(self) -> bool:
        assert self._input is not None
        done = self._calls_this_run if self._batching else self._done_this_run
        return (
            done >= self._input.options.continue_as_new_every
            or workflow.info().is_continue_as_new_suggested()
        )

    def _batch_size(self, item: PendingItem) -> tuple[int, str]:
        """How many items go in one task activity to the item's provider now (1: no
        batch), from the provider's rate at the last monitor sample."""
        assert self._input is not None and self._carry is not None
        if not self._batching or not item.needs_task:
            return 1, ""
        provider = pick_route(self._carry.prepared.task_routes, item.item_id).provider
        rate = next((p.rate_rps for p in self._providers if p.provider == provider), 0.0)
        o = self._input.options
        if rate < o.batch_above_rps:
            return 1, provider
        # At least `BATCHES_IN_FLIGHT` batches fit in `max_concurrency`: a batch is done
        # when its slowest call is, and one large batch at a time would stall the flow.
        in_flight_cap = self._input.max_concurrency // BATCHES_IN_FLIGHT
        size = min(o.batch_max_items, in_flight_cap, int(rate * o.batch_window_s))
        return max(2, size), provider

    def _dispatch_batches(self, gathered: dict[str, list[PendingItem]]) -> None:
        for provider, items in gathered.items():
            if items:
                self._calls_this_run += 1
                asyncio.create_task(self._run_batch(provider, items))
        gathered.clear()

    def _retry_policy(self) -> RetryPolicy:
        assert self._input is not None
        o = self._input.options
        return RetryPolicy(
            initial_interval=timedelta(seconds=o.retry_initial_s),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=o.retry_max_s),
            maximum_attempts=o.max_attempts,
        )

    def _start_call(
        self, method: Any, arg: Any, provider: str, key: str, batch: bool = False
    ) -> tuple[Any, str]:
        assert self._input is not None
        o = self._input.options
        self._dispatched += 1
        activity_id = f"{key}#{self._dispatched}"
        queue = ProviderQueue(workflow.info().task_queue, provider)
        handle = workflow.start_activity_method(
            method,
            arg,
            task_queue=queue.batch_name if batch else queue.name,
            start_to_close_timeout=BATCH_TIMEOUT if batch else timedelta(seconds=o.call_timeout_s),
            heartbeat_timeout=timedelta(seconds=o.heartbeat_timeout_s),
            retry_policy=self._retry_policy(),
            activity_id=activity_id,
            # A stop cancels only calls still waiting for capacity; wait for the answer.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            priority=Priority(fairness_key=self._input.experiment_id),
        )
        self._handles[activity_id] = handle
        return handle, activity_id

    async def _run_item(self, item: PendingItem, delay_s: float = 0.0) -> None:
        """One item on the single-call path: its task call (after `delay_s`, a
        batch's Retry-After), then its judges."""
        assert self._input is not None and self._carry is not None
        inp, carry = self._input, self._carry
        keys: list[str] = []
        task_done = not item.needs_task
        try:
            if delay_s > 0:
                try:
                    await workflow.wait_condition(
                        lambda: self._stop_requested, timeout=timedelta(seconds=delay_s)
                    )
                except TimeoutError:
                    pass
                if self._stop_requested:
                    return  # still pending: a resume runs it
            missing = item.missing_evals
            if item.needs_task:
                route = pick_route(carry.prepared.task_routes, item.item_id)
                handle, key = self._start_call(
                    ProviderCallActivities.run_item,
                    RunItemInput(
                        tenant_id=inp.tenant_id,
                        experiment_id=inp.experiment_id,
                        item_id=item.item_id,
                        deployment_id=route.deployment_id,
                        provider=route.provider,
                    ),
                    route.provider,
                    f"task:{item.item_id}",
                )
                keys.append(key)
                result: RunItemResult = await handle
                if result.status == "failed":
                    carry.failed += 1
                    self._done_this_run += 1
                    return
                carry.completed += 1
                task_done = True
                if result.fresh:
                    carry.prompt_tokens += result.prompt_tokens
                    carry.completion_tokens += result.completion_tokens
                    self._count_cost(result)
                missing = result.missing_evals
            for name in missing:
                route = pick_route(carry.prepared.judge_routes[name], item.item_id)
                judge, key = self._start_call(
                    ProviderCallActivities.judge_item,
                    JudgeItemInput(
                        tenant_id=inp.tenant_id,
                        experiment_id=inp.experiment_id,
                        item_id=item.item_id,
                        eval_name=name,
                        deployment_id=route.deployment_id,
                        provider=route.provider,
                    ),
                    route.provider,
                    f"judge:{name}:{item.item_id}",
                )
                keys.append(key)
                judged: JudgeItemResult = await judge
                self._count_cost(judged)
            carry.evaluated += 1
            self._done_this_run += 1
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, CancelledError) or (
                isinstance(cause, ApplicationError) and cause.type == ExperimentStopped.error_type
            ):
                return  # stopped before its call: still pending, a resume runs it
            if isinstance(cause, ApplicationError) and cause.type == QuotaExceeded.error_type:
                self._quota_spent(cause.message)
                return
            if isinstance(cause, ApplicationError) and cause.type == BudgetExhausted.error_type:
                # The quota's pause: the same commands (a stop, then a wait for a resume).
                self._quota_spent(cause.message, "budget")
                return  # no request made: still pending, a resume runs it
            kind = cause.type if isinstance(cause, ApplicationError) and cause.type else "Error"
            try:
                recorded: bool = await workflow.execute_activity_method(
                    ExperimentActivities.record_failure,
                    RecordFailureInput(
                        tenant_id=inp.tenant_id,
                        experiment_id=inp.experiment_id,
                        item_id=item.item_id,
                        error_kind=kind,
                        error=str(cause or err),
                    ),
                    start_to_close_timeout=DB_TIMEOUT,
                    retry_policy=DB_RETRY_POLICY,
                )
            except ActivityError as unrecordable:
                recorded, cause = False, unrecordable.cause or unrecordable
            if not recorded:
                # Nothing holds this item's failure, so it is counted nowhere: it stays
                # without a result and the count at the end finds it.
                self._unrecorded = (
                    f"item {item.item_id!r} failed and could not be recorded: {cause}"
                )
                return
            if task_done:
                carry.evaluated += 1  # a judge gave up: the item is scored without it
            else:
                carry.failed += 1
            self._done_this_run += 1
        finally:
            self._in_flight.pop(item.item_id, None)
            for key in keys:
                self._handles.pop(key, None)

    def _quota_spent(self, message: str, kind: PauseKind = "quota") -> None:
        """No retry helps a spent quota or budget: pause, and leave the item pending."""
        if self._quota_reason is None:
            self._quota_reason = message
            self._pause_kind = kind
            self._stop_requested = True
            self._publish(f"paused: {kind}: {message}")

    def _count_cost(self, r: RunItemResult | BatchItemResult | JudgeItemResult) -> None:
        """What a call of this run cost, or saved by coming from the cache."""
        assert self._carry is not None
        carry = self._carry
        carry.cost_usd += r.cost_usd
        carry.cost_known = carry.cost_known and r.cost_known
        if r.cached:
            carry.cache_hits += 1
            carry.cost_saved_usd += r.saved_usd

    async def _run_batch(self, provider: str, items: list[PendingItem]) -> None:
        """Task calls of several items in one activity. What the batch settled is
        counted here; what it handed back goes on the single-call path."""
        assert self._input is not None and self._carry is not None
        inp, carry = self._input, self._carry
        by_id = {item.item_id: item for item in items}
        handed_over: set[str] = set()
        handle, key = self._start_call(
            ProviderBatchActivities.run_batch,
            RunBatchInput(
                tenant_id=inp.tenant_id,
                experiment_id=inp.experiment_id,
                provider=provider,
                items=[
                    BatchItem(
                        item_id=item.item_id,
                        deployment_id=pick_route(
                            carry.prepared.task_routes, item.item_id
                        ).deployment_id,
                    )
                    for item in items
                ],
            ),
            provider,
            f"batch:{items[0].item_id}",
            batch=True,
        )
        try:
            try:
                result: RunBatchResult = await handle
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, CancelledError):
                    return  # stopped before it ran: its items are still pending
                # The batch itself failed for good: each item goes the single way,
                # whose errors say what is wrong with it.
                for item in items:
                    handed_over.add(item.item_id)
                    asyncio.create_task(self._run_item(item))
                return
            for r in result.items:
                item = by_id[r.item_id]
                if r.status == "retry":
                    handed_over.add(item.item_id)
                    asyncio.create_task(self._run_item(item, delay_s=r.retry_in_s))
                elif r.status == "quota":
                    self._quota_spent(r.message or f"provider {provider!r} quota exceeded")
                elif r.status == "budget":
                    self._quota_spent(r.message or "a budget is spent", "budget")
                elif r.status in ("ok", "failed"):
                    if self._count_batch_result(item, r):
                        handed_over.add(item.item_id)
        finally:
            self._handles.pop(key, None)
            for item_id in by_id:
                if item_id not in handed_over:
                    self._in_flight.pop(item_id, None)

    def _count_batch_result(self, item: PendingItem, r: BatchItemResult) -> bool:
        """Count a stored result; True when its judges still run (on their own)."""
        assert self._carry is not None
        carry = self._carry
        if r.status == "failed":
            carry.failed += 1
            self._done_this_run += 1
            return False
        carry.completed += 1
        if r.fresh:
            carry.prompt_tokens += r.prompt_tokens
            carry.completion_tokens += r.completion_tokens
            self._count_cost(r)
        if r.missing_evals:
            judged = PendingItem(
                seq=item.seq, item_id=item.item_id, needs_task=False, missing_evals=r.missing_evals
            )
            asyncio.create_task(self._run_item(judged))
            return True
        carry.evaluated += 1
        self._done_this_run += 1
        return False

    async def _stop_and_wait(self) -> None:
        self._set_status("stopping")
        flagged = await self._set_stop_flag(stopped=True)
        self._cancel_calls(flagged.waiting_activity_ids)
        await workflow.wait_condition(lambda: not self._in_flight)
        if self._quota_reason is not None and self._pause_kind == "budget":
            self._paused_reason = f"budget: {self._quota_reason}"
            self._set_status("paused")
        elif self._quota_reason is not None:
            self._paused_reason = f"quota: {self._quota_reason}; resume once it is raised"
            self._set_status("paused")
        else:
            self._set_status("stopped")
        await workflow.wait_condition(lambda: not self._stop_requested)
        self._quota_reason = None
        self._pause_kind = None
        await self._set_stop_flag(stopped=False)
        self._set_status("running")

    async def _set_stop_flag(self, stopped: bool) -> StopFlagResult:
        assert self._input is not None
        result: StopFlagResult = await workflow.execute_activity_method(
            ExperimentActivities.set_stop_flag,
            StopFlagInput(
                tenant_id=self._input.tenant_id,
                experiment_id=self._input.experiment_id,
                stopped=stopped,
                workflow_id=workflow.info().workflow_id,
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY_POLICY,
        )
        return result

    # --- monitoring ----------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        assert self._input is not None and self._carry is not None
        inp = self._input
        while not self._monitor_off:
            if self._status == "stopped":
                await workflow.wait_condition(
                    lambda: self._monitor_off or self._status != "stopped"
                )
                continue
            sample: MonitorResult | None
            try:
                sample = await workflow.execute_activity_method(
                    ExperimentActivities.monitor,
                    MonitorInput(
                        tenant_id=inp.tenant_id,
                        experiment_id=inp.experiment_id,
                        providers=self._carry.prepared.providers,
                    ),
                    start_to_close_timeout=MONITOR_TIMEOUT,
                    retry_policy=RetryPolicy(maximum_attempts=1),
                )
            except (ActivityError, ApplicationError):
                sample = None  # the database is away: keep the last known state
            if sample is not None:
                self._absorb(sample)
            self._publish()
            try:
                await workflow.wait_condition(
                    lambda: self._monitor_off,
                    timeout=timedelta(seconds=inp.options.monitor_interval_s),
                )
            except TimeoutError:
                pass

    def _absorb(self, sample: MonitorResult) -> None:
        assert self._carry is not None
        previous = {p.provider: p for p in (self._monitor.providers if self._monitor else [])}
        elapsed = sample.at - self._monitor.at if self._monitor else 0.0
        providers = []
        for p in sample.providers:
            before = previous.get(p.provider)
            if before is not None and elapsed > 0:
                p.ok_per_s = round((p.ok_total - before.ok_total) / elapsed, 2)
                p.throttled_per_s = round((p.throttled_total - before.throttled_total) / elapsed, 2)
            providers.append(p)
        self._providers = providers
        self._monitor = sample
        self._budget = sample.budget
        done = self._carry.evaluated + self._carry.failed
        if self._last_sample is not None and sample.at > self._last_sample[0]:
            rate = (done - self._last_sample[1]) / (sample.at - self._last_sample[0])
            self._items_per_s = (
                rate if self._items_per_s == 0 else 0.5 * self._items_per_s + 0.5 * rate
            )
        self._last_sample = (sample.at, done)
        unhealthy = [p for p in providers if p.breaker != "closed"]
        if self._status in ("running", "paused") and self._quota_reason is None:
            if unhealthy:
                p = unhealthy[0]
                self._paused_reason = (
                    f"provider {p.provider!r}: circuit {p.breaker.replace('_', '-')} after "
                    f"{p.consecutive_failures} consecutive failures; items wait and resume by "
                    f"themselves (next probe in {p.cooldown_left_s:.0f} s)"
                )
                self._set_status("paused")
            else:
                self._paused_reason = None
                self._set_status("running")

    def _set_status(self, status: ExperimentStatus) -> None:
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([STATUS.value_set(status)])
        if status != "paused":
            self._paused_reason = None
        self._publish()

    def _publish(self, note: str = "") -> None:
        progress = self.progress()
        lines = [
            f"**{progress.status}** {progress.evaluated + progress.failed}/{progress.total} done"
            f" ({progress.failed} failed), {progress.in_flight} in flight,"
            f" {progress.items_per_s:.1f} items/s"
            + (f", ETA {progress.eta_s:.0f} s" if progress.eta_s is not None else "")
        ]
        if note:
            lines.append(note)
        if progress.paused_reason:
            lines.append(f"paused: {progress.paused_reason}")
        if progress.cost_usd or progress.cache_hits or not progress.cost_known:
            lines.append(
                f"cost {usd(progress.cost_usd)}"
                + ("" if progress.cost_known else " (some calls of unknown price, counted 0)")
                + (
                    f", {progress.cache_hits} cache hits saved {usd(progress.cost_saved_usd)}"
                    if progress.cache_hits
                    else ""
                )
            )
        b = progress.budget
        if b is not None:
            parts = []
            if b.max_usd is not None:
                parts.append(f"{usd(b.spent_usd)} of {usd(b.max_usd)}")
            if b.max_tokens is not None:
                parts.append(f"{b.spent_tokens} of {b.max_tokens} tokens")
            if b.reserved_usd or b.reserved_tokens:
                parts.append(f"{usd(b.reserved_usd)} / {b.reserved_tokens} tokens reserved")
            if b.tenant_max_usd is not None:
                parts.append(
                    f"tenant {b.tenant_month}: {usd(b.tenant_spent_usd)} of {usd(b.tenant_max_usd)}"
                )
            lines.append("budget: " + ", ".join(parts))
        for p in progress.providers:
            lines.append(
                f"- `{p.provider}`: rate {p.rate_rps:.1f}/s, ok {p.ok_per_s:.1f}/s,"
                f" 429 {p.throttled_per_s:.1f}/s, breaker {p.breaker}"
                f" ({p.breaker_trips} trips)"
            )
        if progress.last_refusal is not None:
            r = progress.last_refusal
            lines.append(f"last refused {r.action}: {r.reason}")
        workflow.set_current_details("\n\n".join(lines))
