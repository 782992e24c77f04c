"""How a workflow times out and retries a local activity: one typed value per kind
of call, named by the workflow (`DB`, `LLM_CALL`, `STEP`), instead of the same
keyword arguments repeated at every call. Deterministic: workflows import it.

An outage of PostgreSQL or the network is outlasted, not reported: a call that
touches PostgreSQL retries with no attempt limit, for `OUTAGE` beyond the time
its own work may take (its schedule-to-close). The activity gives up on other
failures itself after a few attempts (`activities.base.outlasting_outages`), and
our errors that no retry fixes are never retried."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

T = TypeVar("T")

# How long a call outlasts PostgreSQL or the network being away: a restart of
# PostgreSQL or of the Temporal dev server takes up to a minute.
OUTAGE = timedelta(minutes=2)


# Every retry of a local activity waits on a workflow timer, not in place in the
# SDK core: an in-place retry leaves the earlier attempt's start-to-close timer
# running (temporalio/sdk-rust#1454, in temporalio 1.35.0), which can time out a
# later attempt and, once its worker has shut down, panics the core ("receive
# half not dropped"). Retries happen only when something failed (an outage), so
# the workflow task each costs is paid rarely; recorded histories hold only the
# final marker of an in-place retry, so they replay the same. (0 is "unset".)
RETRY_THROUGH_A_TIMER = timedelta(milliseconds=1)


def retries(first: timedelta, longest: timedelta, attempts: int = 0) -> RetryPolicy:
    """Exponential backoff from `first` to `longest`; 0 attempts retries until a timeout."""
    return RetryPolicy(initial_interval=first, maximum_interval=longest, maximum_attempts=attempts)


@dataclass(frozen=True)
class LocalActivityOptions:
    start_to_close: timedelta
    retry_policy: RetryPolicy
    # Bounds the retries too; None leaves only start_to_close and the attempts.
    schedule_to_close: timedelta | None = None

    async def run(
        self, activity: Callable[..., Awaitable[T]], arg: Any, summary: str | None = None
    ) -> T:
        return await workflow.execute_local_activity_method(
            activity,
            arg,
            start_to_close_timeout=self.start_to_close,
            schedule_to_close_timeout=self.schedule_to_close,
            retry_policy=self.retry_policy,
            summary=summary,
            local_retry_threshold=RETRY_THROUGH_A_TIMER,
        )
