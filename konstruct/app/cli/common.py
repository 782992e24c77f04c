"""Shared plumbing of the CLI: options, settings and connections (output is in `output`).

Loaded by every command, so it imports no client library at module level: asyncpg,
temporalio, the settings and rich are imported by the functions that use them.
"""

from __future__ import annotations

import functools
import gc
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click

from konstruct.platform.errors import ServiceUnreachable

if TYPE_CHECKING:
    import asyncpg
    from pydantic import BaseModel
    from rich.table import Column
    from temporalio.client import Client

    from konstruct.config import Settings

T = TypeVar("T")

# The one --tenant option of every command that takes it.
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _tenant_id(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A tenant id as the workflows accept one (lowercase letters, digits, _ and -)."""
    if not _TENANT.match(value):
        raise click.BadParameter(
            f"{value!r} is not a tenant id: 1-63 lowercase letters, digits, '_' or '-',"
            " starting with a letter or digit",
            param=param,
        )
    return value


def workflow_id_value(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A workflow id given by hand: not blank, no whitespace, at most 200 characters."""
    if value is not None and (
        not value.strip() or len(value) > 200 or any(c.isspace() for c in value)
    ):
        raise click.BadParameter(
            f"{value!r} is not a workflow id: 1-200 characters, no spaces", param=param
        )
    return value


tenant_option = click.option(
    "--tenant", default="demo", show_default=True, help="tenant id", callback=_tenant_id
)
# The tenant of commands that take it as their first argument (`agents`, `send`).
tenant_argument = click.argument("tenant", callback=_tenant_id)


def json_option(help: str = "print JSON") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--json`, passed to the command as `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def field_option(
    model: type[BaseModel], field: str, *decls: str, help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option with the default and bounds a model puts on `field`, so that click
    names the option when a value is out of bounds and `--help` shows the default."""
    info = model.model_fields[field]
    bounds: dict[str, Any] = {}
    for rule in info.metadata:
        bounds.update(
            {key: getattr(rule, key) for key in ("ge", "gt", "le", "lt") if hasattr(rule, key)}
        )
    kind = click.IntRange if info.annotation is int else click.FloatRange
    bounded = kind(
        bounds.get("ge", bounds.get("gt")),
        bounds.get("le", bounds.get("lt")),
        min_open="gt" in bounds,
        max_open="lt" in bounds,
    )
    return click.option(*decls, type=bounded, default=info.default, show_default=True, help=help)


@dataclass
class CliState:
    """What the root command's options give every subcommand."""

    config: str | None = None
    state_dir: str | None = None

    @cached_property
    def settings(self) -> Settings:
        from konstruct.config import load_settings

        return load_settings(self.config, state_dir=self.state_dir)


pass_state = click.make_pass_decorator(CliState, ensure=True)


def tenant_and_argument(name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """`TENANT NAME`: the arguments of a command on one of a tenant's things (a key,
    a document, a tool, an MCP server), given to it after the CLI state."""

    def decorate(command: Callable[..., int]) -> Callable[..., int]:
        return tenant_argument(click.argument(name)(pass_state(command)))

    return decorate


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, freeing clients while the loop still runs.

    A Temporal client left for interpreter shutdown sometimes aborts the
    process (exit 134, PyGILState_Release); collecting it first avoids that.
    """
    import asyncio  # here, not at the top: `konstruct status` and `--help` never need it

    async def run() -> T:
        try:
            return await coroutine
        finally:
            gc.collect()

    return asyncio.run(run())


async def temporal_client(settings: Settings) -> Client:
    from konstruct.platform.temporal.client import connect

    target = settings.temporal.target
    try:
        return await connect(settings)
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


def _connect_refusals() -> tuple[type[Exception], ...]:
    """Raised while connecting: the server is down, or refuses this role or database."""
    import asyncpg

    return (
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
    )


@contextmanager
def reaching_postgres(url: str) -> Iterator[None]:
    """Turns a failure to connect to `url` into one line saying what to do."""
    refusals = _connect_refusals()
    try:
        yield
    except (OSError, TimeoutError) as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc
        raise ServiceUnreachable(
            f"cannot reach PostgreSQL at {_postgres_at(url)} ({reason}): start the stack with"
            " `konstruct up` or set KONSTRUCT_DATABASE_URL"
        ) from None
    except refusals as exc:
        raise ServiceUnreachable(
            f"PostgreSQL at {_postgres_at(url)} refused the connection ({_first_line(exc)}):"
            " run `konstruct migrate`, or check KONSTRUCT_DATABASE_URL and"
            " KONSTRUCT_APP_DATABASE_URL"
        ) from None


@asynccontextmanager
async def app_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A small pool of the application role, closed on exit."""
    from konstruct.platform import db

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


def in_tenant(
    settings: Settings, tenant: str, work: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """Run `work` in one transaction scoped to `tenant` (row-level security), on an
    `app_pool`, from synchronous command code."""
    from konstruct.platform import db

    async def run(pool: asyncpg.Pool) -> T:
        async with db.tenant_transaction(pool, tenant) as conn:
            return await work(conn)

    return with_pool(settings, run)


# What a list command's function returns: the store call that fetches its rows, run
# in a transaction scoped to the command's `tenant`.
Query = Callable[["asyncpg.Connection"], Awaitable[list[Any]]]


def listing(
    empty: str, columns: Sequence[str | Column], row: Callable[[Any], Sequence[Any]]
) -> Callable[[Callable[..., Query]], Callable[..., int]]:
    """Turn a function returning a `Query` into a list command.

    The command gets `--json`; it prints the rows as JSON, as a table of one
    `row` each, or the `empty` sentence (formatted with the command's parameters).
    """

    def decorate(query_of: Callable[..., Query]) -> Callable[..., int]:
        @json_option()
        @pass_state
        @functools.wraps(query_of)
        def command(state: CliState, as_json: bool, **params: Any) -> int:
            from konstruct.app.cli.output import print_json, print_table

            items = in_tenant(state.settings, params["tenant"], query_of(**params))
            if as_json:
                print_json(items)
            elif not items:
                print(empty.format(**params))
            else:
                print_table(columns, [row(item) for item in items])
            return 0

        return command

    return decorate
