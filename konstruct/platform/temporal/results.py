"""Waiting for a workflow's result when client and workers may hold different keys.

A worker that cannot decrypt a workflow's input (the client encrypted it with a
key the worker lacks) fails the workflow task, and Temporal retries it for as
long as the workflow may run: `handle.result()` alone would wait that long. So
`workflow_result` (and `guarded`, for any other wait on a workflow) also follows
the workflow's history up to its first completed workflow task (a few events:
by then a worker has read the input), and a failed workflow task whose message is a
`CodecError` (`CodecError: payload encrypted with key 'k2', which this process
does not have (it has k1; ...)`, kept readable in history by
`konstruct.platform.temporal.failures`: the server keeps only the message of a
workflow task's failure, dropping its type and encoded attributes) ends the
wait at once with a `ConfigError` naming the key ids. A result or failure the client itself cannot
decrypt (the worker encrypted it with a key the client lacks) is a
`ConfigError` naming that key as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from konstruct.platform.errors import ConfigError
from konstruct.platform.temporal.codec import KEYS_ENV, CodecError

T = TypeVar("T")

# How a worker's CodecError reads in a failed workflow task (see `failures.plain_message`).
_WORKER_CODEC_ERROR = f"{CodecError.__name__}: "


async def worker_codec_error(handle: WorkflowHandle[Any, Any], *, wait: bool = True) -> str | None:
    """The message of a workflow task a worker failed for want of a key; None once a
    workflow task completed (a worker read the input) or the workflow closed. Follows
    the history as it grows, or with `wait=False` reads it as it stands."""
    try:
        async for event in handle.fetch_history_events(page_size=16, wait_new_event=wait):
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                return None
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                continue
            message = event.workflow_task_failed_event_attributes.failure.message
            if message.startswith(_WORKER_CODEC_ERROR):
                return message.removeprefix(_WORKER_CODEC_ERROR)
    except RPCError:
        return None  # the wait itself reports what is wrong with the workflow
    return None


def key_mismatch(handle: WorkflowHandle[Any, Any], worker_said: str) -> ConfigError:
    return ConfigError(
        f"a worker cannot read workflow {handle.id}; it says: {worker_said}. The client and the"
        f" workers must share keys ({KEYS_ENV}): give the workers the client's key, or this"
        " client theirs. The workflow stays open and is retried until a worker can read it"
        f" (or `temporal workflow terminate -w {handle.id}`)"
    )


async def _stop(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def guarded(handle: WorkflowHandle[Any, Any], work: Awaitable[T]) -> T:
    """`work` (a wait on the workflow of `handle`), ended by a `ConfigError` naming the
    key ids as soon as a worker fails the workflow for want of a key, or the client
    cannot decrypt what the workflow returns."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(worker_codec_error(handle))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and (said := watcher.result()) is not None:
            raise key_mismatch(handle, said)
        try:
            return await task
        except WorkflowFailureError:
            raise  # the workflow ran, and failed: no key is missing
        except CodecError as exc:
            raise ConfigError(
                f"this client cannot read what workflow {handle.id} returned: {exc}"
            ) from None
        except Exception:
            # A wait that failed otherwise (a query the worker could not answer...)
            # may have failed for want of a key too: the history says.
            said = await worker_codec_error(handle, wait=False)
            if said is not None:
                raise key_mismatch(handle, said) from None
            raise
    finally:
        await _stop(watcher)
        await _stop(task)


# What a query that Temporal gave up on raises: a query of a closed workflow replays
# its history on a worker, and a busy worker may take it after the server stopped
# waiting ("CANCELLED: Timeout expired", or DEADLINE_EXCEEDED).
_QUERY_TIMED_OUT = (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)


async def query_workflow(
    handle: WorkflowHandle[Any, Any], query: Callable[..., Any], *, bound_s: float = 120.0
) -> Any:
    """`handle.query(query)`, asked again while Temporal times it out, for up to
    `bound_s`: a query changes nothing, so asking again is safe, and a slow answer
    is no reason to fail a command whose workflow ran."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            return await handle.query(query)
        except RPCError as exc:
            if exc.status not in _QUERY_TIMED_OUT or time.monotonic() > deadline:
                raise


async def workflow_result(handle: WorkflowHandle[Any, T]) -> T:
    """`handle.result()`, guarded against keys the client and the workers do not share."""
    return await guarded(handle, handle.result())
