"""The Experiment workflow's timeouts, retry policies, patch markers and item routing."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from konstruct.experiments.models import Route

A = TypeVar("A")
R = TypeVar("R")

# Loading a 20,000-line dataset takes seconds; a database restart is survived
# by retrying.
PREPARE_TIMEOUT = timedelta(minutes=5)
PREPARE_HEARTBEAT = timedelta(seconds=10)
# Short, so a call lost with a killed worker is retried within seconds.
DB_TIMEOUT = timedelta(seconds=10)
MONITOR_TIMEOUT = timedelta(seconds=5)
FINALIZE_TIMEOUT = timedelta(minutes=2)
# The summary heartbeats: an attempt lost with its worker or with the dev server's
# restart is retried after this, not after FINALIZE_TIMEOUT (the chaos soak: a
# finalize STARTED when the server was killed stayed so for its two minutes, and
# the soak took 180 s instead of 70).
FINALIZE_HEARTBEAT = timedelta(seconds=10)
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
# Patch marker: runs after it write every status they reach (stopped, paused by
# a budget, a quota or a breaker, running again) to the experiment's row, so
# `experiments list` and `show` say what the query, the search attribute and the
# Web UI say; before, the row said `stopping` for a stopped experiment.
STATUS_ON_ROW = "status-on-the-experiment-row"
# A batch waits for its slots on the provider's schedule; its heartbeat, not
# this, is what notices a dead worker.
BATCH_TIMEOUT = timedelta(minutes=30)
# Patch marker: runs after it let a batch take a quarter of `max_concurrency`
# (`BATCHES_IN_FLIGHT`), runs before it an eighth. Each batch costs the Temporal
# server and the worker an activity and a workflow task; at 100 req/s with 25
# slots, batches of 3 cost 17.2 CPU s per 1,000 items and reached 0.79 of the
# ceiling, batches of 6: 14.6 s and 0.85 (bench/experiments.py, same machine and
# hour). A quarter still leaves three batches running while one waits for its
# slowest call.
FEWER_LARGER_BATCHES = "a-batch-takes-a-quarter-of-the-slots"
BATCHES_IN_FLIGHT = 4
BATCHES_IN_FLIGHT_BEFORE = 8
# Patch marker: runs after it schedule their batches on the workflow's own task
# queue, where the worker that completes the workflow task starts them at once
# (Temporal's eager activity dispatch); runs before it, on the provider's batch
# queue, where each waited for the server's matching: 30-44 ms per batch on the dev
# server, an eighth of a batch's round trip at 100 req/s with 25 slots. Runs after
# it also dispatch a pass's first items once the monitor's first sample of the run
# is in (or failed), so that they go in batches when the provider's rate says so.
BATCHES_ON_WORKFLOW_QUEUE = "batches-on-the-workflow-queue"
# Patch marker: runs after it count a batch's failed call (not a 429) as one of the
# item's `max_attempts`: the single path makes the rest, and with none left the
# failure is recorded as it is. Before, a batched item could be called
# `max_attempts` + 1 times (4 items at `max_attempts` 1 against a failing provider:
# 8 failed calls, and the breaker opened at its fifth).
FAILED_BATCH_CALL_IS_AN_ATTEMPT = "a-failed-batch-call-is-an-attempt"
# No local activities here: the monitor, the dispatch loop and failing items run
# concurrently, and concurrent local activities resolve in completion order when
# first run but in sequence order on replay (a behaviour of the Python SDK), which
# broke replay of this workflow without a cache.


def pick_route(routes: list[Route], item_id: str) -> Route:
    """The same deployment for an item on every attempt, run and restart."""
    return routes[zlib.crc32(item_id.encode()) % len(routes)]


async def db_call(method: Callable[[Any, A], Awaitable[R]], arg: A) -> R:
    """One short database activity of `ExperimentActivities`, retried through a
    database restart."""
    return await workflow.execute_activity_method(
        method, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY_POLICY
    )
