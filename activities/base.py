"""What every class of activities shares: the list a worker registers, and heartbeats while a call runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import activity

T = TypeVar("T")

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
