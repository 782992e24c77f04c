"""The plumbing every DemoCascade step activity shares.

`demo_step` times a step's work into `work_ms` and, when the run's `fail_at`
names the step, fails it with `InjectedFailure` after its side effects, so the
workflow's compensations have something real to undo; a step outlasts an outage
of PostgreSQL, and gives up on any other failure after `STEP_ATTEMPTS`. Data
between steps travels as JSON artifacts in the store, referenced by URI and
sha256, so workflow history stays small.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from temporalio import activity

from activities.base import outlasting_outages
from konstruct.demo.models import DataRef, StepInput, StepOutput
from konstruct.platform.db import tenant_transaction
from konstruct.platform.errors import ForecastingError, InjectedFailure, KonstructError
from konstruct.registry import store as registry

T = TypeVar("T")
Owner = TypeVar("Owner")
In = TypeVar("In", bound=StepInput)
Out = TypeVar("Out", bound=StepOutput)

# A failure that is not an outage ends a step after this many attempts, and a
# compensation (which is then reported) after that many; DemoCascade's options
# retry an outage of PostgreSQL for minutes.
STEP_ATTEMPTS = 5
COMPENSATION_ATTEMPTS = 3


def demo_step(
    run: Callable[[Owner, In], Awaitable[Out]],
) -> Callable[[Owner, In], Awaitable[Out]]:
    """Time the step's work into `work_ms`; fail it after its side effects when injected;
    outlast an outage, give up on other failures after `STEP_ATTEMPTS`."""

    @outlasting_outages(STEP_ATTEMPTS)
    @functools.wraps(run)
    async def step(owner: Owner, input: In) -> Out:
        started = time.perf_counter()
        result = await run(owner, input)
        if input.inject_failure:
            raise InjectedFailure(f"injected failure at step {input.step!r} (fail_at)")
        work_ms = round((time.perf_counter() - started) * 1000, 3)
        return result.model_copy(update={"work_ms": work_ms})

    return step


async def compute(fn: Callable[..., T], *args: Any) -> T:
    """Domain work off the event loop (so the worker keeps answering while it runs).

    The forecasting module raises ValueError for what no retry fixes (an unknown
    model, a hash mismatch, a URI that does not parse): our ValueErrors pass as
    they are, any other becomes a ForecastingError (neither is retried).
    """
    try:
        return await asyncio.to_thread(fn, *args)
    except KonstructError:
        raise
    except ValueError as exc:
        raise ForecastingError(str(exc)) from exc


def caller() -> tuple[str, str]:
    """The workflow id and run id of the DemoCascade run that scheduled this step."""
    info = activity.info()
    return info.workflow_id or "", info.workflow_run_id or ""


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


async def put_json(pool: asyncpg.Pool, tenant_id: str, uri: str, value: Any) -> DataRef:
    async with tenant_transaction(pool, tenant_id) as conn:
        digest = await registry.store_artifact(conn, tenant_id, uri, _json_bytes(value))
    return DataRef(uri=uri, sha256=digest)


async def get_json(pool: asyncpg.Pool, tenant_id: str, ref: DataRef) -> Any:
    """A step's input, hash verified: a missing or changed file fails at once."""
    async with tenant_transaction(pool, tenant_id) as conn:
        data = await registry.load_artifact(conn, tenant_id, ref.uri, ref.sha256)
    return json.loads(data)
