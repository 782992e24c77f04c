"""Shared plumbing of the CLI: options, settings, connections and output."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import click
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text
from temporalio.client import Client, WorkflowFailureError

from konstruct import db
from konstruct.config import Settings, load_settings
from konstruct.errors import ServiceUnreachable, innermost_application_error
from konstruct.temporal_client import connect

T = TypeVar("T")

# Piped output is not wrapped at 80 columns: one table row stays one line.
_PIPE_WIDTH = 250

# The one --tenant option of every command that takes it.
tenant_option = click.option("--tenant", default="demo", show_default=True, help="tenant id")
# The tenant of commands that take it as their first argument (`agents`, `send`).
tenant_argument = click.argument("tenant")


def json_option(help: str = "print JSON") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--json`, passed to the command as `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=help)


@dataclass
class CliState:
    """What the root command's options give every subcommand."""

    config: str | None = None

    @cached_property
    def settings(self) -> Settings:
        return load_settings(self.config)


pass_state = click.make_pass_decorator(CliState, ensure=True)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, freeing clients while the loop still runs.

    A Temporal client left for interpreter shutdown sometimes aborts the
    process (exit 134, PyGILState_Release); collecting it first avoids that.
    """

    async def run() -> T:
        try:
            return await coroutine
        finally:
            gc.collect()

    return asyncio.run(run())


async def temporal_client(settings: Settings) -> Client:
    target = settings.temporal.target
    try:
        return await connect(settings.temporal)
    except RuntimeError as exc:
        reason = "connection refused" if "Connection refused" in str(exc) else _first_line(exc)
        raise ServiceUnreachable(
            f"cannot reach Temporal at {target} ({reason}): start the stack with"
            " `konstruct up` or set TEMPORAL_ADDRESS"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _postgres_at(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


# Raised while connecting: the server is down, or refuses this role or database.
_CONNECT_REFUSALS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


@contextmanager
def reaching_postgres(url: str) -> Iterator[None]:
    """Turns a failure to connect to `url` into one line saying what to do."""
    try:
        yield
    except (OSError, TimeoutError) as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc
        raise ServiceUnreachable(
            f"cannot reach PostgreSQL at {_postgres_at(url)} ({reason}): start the stack with"
            " `konstruct up` or set KONSTRUCT_DATABASE_URL"
        ) from None
    except _CONNECT_REFUSALS as exc:
        raise ServiceUnreachable(
            f"PostgreSQL at {_postgres_at(url)} refused the connection ({_first_line(exc)}):"
            " run `konstruct migrate`, or check KONSTRUCT_DATABASE_URL and"
            " KONSTRUCT_APP_DATABASE_URL"
        ) from None


@asynccontextmanager
async def app_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small pool of the application role, closed on exit."""
    url = db.app_url(settings)
    with reaching_postgres(url):
        pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def with_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run `work` on an `app_pool` from synchronous command code."""

    async def run() -> T:
        async with app_pool(settings) as pool:
            return await work(pool)

    return run_async(run())


@cache
def console() -> Console:
    """Where tables and live progress go; never colours or wraps a pipe."""
    return Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH, highlight=False)


def build_table(columns: Sequence[str | Column], rows: Iterable[Iterable[Any]]) -> Table:
    """Rows as a rich table; cells are plain text (brackets are not markup).

    Only the last column wraps when space runs out, so ids stay whole and greppable.
    """
    last = len(columns) - 1
    table = Table(
        *(Column(c, no_wrap=i < last) if isinstance(c, str) else c for i, c in enumerate(columns)),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for row in rows:
        table.add_row(*(Text("-" if cell is None else str(cell)) for cell in row))
    return table


def print_table(columns: Sequence[str | Column], rows: Iterable[Iterable[Any]]) -> None:
    console().print(build_table(columns, rows))


def print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def failure_message(error: WorkflowFailureError) -> str:
    """The error an activity or workflow raised, with its type."""
    cause = innermost_application_error(error)
    if cause is not None and cause.type:
        return f"{cause.type}: {cause.message}"
    deepest: BaseException | None = error.cause
    while getattr(deepest, "cause", None) is not None:
        deepest = deepest.cause  # type: ignore[union-attr]
    return str(deepest or error)
