"""What every class of activities shares: the list a worker registers, heartbeats while
a call runs, and how an activity outlasts an outage of PostgreSQL or the network."""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from konstruct.platform.errors import KonstructError, ServiceUnreachable

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# What `@activity.defn` sets on the function it registers (temporalio's own marker).
_DEFINITION = "__temporal_activity_definition"


class ActivityClass:
    """A class whose `@activity.defn` methods share what it was built with (a pool,
    a router...). `all()` lists them bound to the instance, in the order they are
    defined, so a new activity cannot be left out of its worker."""

    def all(self) -> list[Callable[..., Awaitable[Any]]]:
        names = dict.fromkeys(
            name
            for klass in reversed(type(self).__mro__)
            for name, member in vars(klass).items()
            if hasattr(member, _DEFINITION)
        )
        return [getattr(self, name) for name in names]


async def heartbeating(
    work: Awaitable[T],
    every_s: float,
    timeout_s: float | None = None,
    overdue: Exception | None = None,
) -> T:
    """Await `work`, heartbeating every `every_s` seconds, so a worker that dies
    mid-call is noticed within the activity's heartbeat timeout. Past `timeout_s`
    the work is cancelled and `overdue` raised (`TimeoutError` if none given)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    try:
        while True:
            wait = every_s
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise overdue or TimeoutError(f"no answer within {timeout_s:g} s")
                wait = min(every_s, remaining)
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        if not task.done():
            task.cancel()


# Set by `finishing_once_started` for the activity it runs: whether a request of it
# has left for the provider (`request_leaving`).
_REQUEST_LEFT: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("request_left")


def request_leaving() -> None:
    """Note that the running activity's request is leaving for the provider: from
    here a cancel the workflow asks for no longer stops it (`finishing_once_started`)."""
    left = _REQUEST_LEFT.get(None)
    if left is not None:
        left[0] = True


def finishing_once_started(run: F) -> F:
    """For a call activity the workflow cancels only while it is still scheduled
    (waiting on its queue for capacity): a cancel the workflow asked for that reaches
    it once its request has left (`request_leaving`) came too late, so the activity
    finishes and stores its answer.

    The workflow reads which calls are still scheduled, then cancels them; a call
    that starts between the two gets the cancel at its next heartbeat, perhaps while
    its request is at the provider. Stopped there, the request is paid for and its
    answer dropped, and the item, still without a result, is called again. A cancel
    before the request leaves (waiting for a slot), any other cancel (the worker
    shutting down, the activity timed out, reset, paused, or gone), or a second one
    stops it.

    Goes under `@activity.defn`."""

    @functools.wraps(run)
    async def finishing(*args: Any, **kwargs: Any) -> Any:
        left = [False]
        token = _REQUEST_LEFT.set(left)
        try:
            work = asyncio.ensure_future(run(*args, **kwargs))  # runs in a copy: sees `left`
        finally:
            _REQUEST_LEFT.reset(token)
        late_cancel_taken = False
        while True:
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                if work.cancelled():
                    raise
                if not work.done():
                    details = activity.cancellation_details()
                    asked = details is not None and details.cancel_requested
                    if late_cancel_taken or not asked or not left[0]:
                        work.cancel()
                        raise
                    late_cancel_taken = True
                    activity.logger.info("cancel asked after the request left: finishing it")
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()

    return cast(F, finishing)


# What asyncpg and the socket layer raise while PostgreSQL restarts or the network
# is away: a refused or reset connection, a server starting up or shutting down,
# a connection lost in the middle of a query, too many connections for now.
_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, ConnectionDoesNotExistError too
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,  # refused, reset, aborted, broken pipe
    TimeoutError,  # a connect or acquire that got no answer
    socket.gaierror,  # a host name that does not resolve for now
)
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ETIMEDOUT,
    errno.EPIPE,
}
# asyncpg's InterfaceError says this of a connection or pool that went away.
_CLOSED = ("connection is closed", "pool is closed", "pool is closing")


def is_outage(error: BaseException) -> bool:
    """Whether `error`, or the error it was raised from, says PostgreSQL or the network
    is away for now (see `_OUTAGES`; a closed connection or pool too). An error that
    already says whether to retry it (ours, an ApplicationError) is taken at its word."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (ApplicationError, KonstructError)):
            return False
        if isinstance(cause, _OUTAGES):
            return True
        if isinstance(cause, asyncpg.InterfaceError) and any(s in str(cause) for s in _CLOSED):
            return True
        # asyncio's connect raises a bare OSError when every address refused.
        if type(cause) is OSError and (cause.errno is None or cause.errno in _NETWORK_ERRNOS):
            return True
        cause = cause.__cause__
    return False


def outlasting_outages(attempts: int) -> Callable[[F], F]:
    """For an activity whose retry policy limits time, not attempts (the workflow's
    schedule-to-close): an outage (`is_outage`) is raised as a retryable
    ServiceUnreachable, retried for as long as that time allows; any other failure
    Temporal would retry is raised non-retryable from attempt `attempts` on, so it
    ends after as many attempts as an attempt limit gave it. (Attempts spent in an
    outage count too: a failure of another kind right after one is not retried.)

    Goes under `@activity.defn`. Our non-retryable errors pass as they are."""

    def decorate(run: F) -> F:
        @functools.wraps(run)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await run(*args, **kwargs)
            except Exception as error:
                if is_outage(error):
                    raise ServiceUnreachable(
                        f"PostgreSQL or the network did not answer "
                        f"({type(error).__name__}: {error}); retried until it does"
                    ).with_traceback(error.__traceback__) from error
                if activity.info().attempt >= attempts and _retryable(error):
                    raise _given_up(error).with_traceback(error.__traceback__) from error
                raise

        return cast(F, guarded)

    return decorate


def _retryable(error: Exception) -> bool:
    if isinstance(error, ApplicationError):
        return not error.non_retryable
    if isinstance(error, KonstructError):
        return error.retryable
    return True


def _given_up(error: Exception) -> ApplicationError:
    """The same failure (type, message, details), not retried again."""
    if isinstance(error, ApplicationError):
        return ApplicationError(error.message, *error.details, type=error.type, non_retryable=True)
    kind = error.error_type if isinstance(error, KonstructError) else type(error).__name__
    return ApplicationError(str(error), type=kind, non_retryable=True)
