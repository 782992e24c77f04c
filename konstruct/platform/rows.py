"""Rows to typed values: one mapping for every store module, and the row count of a
command's status."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel

T = TypeVar("T")


def from_row(
    cls: type[T],
    row: Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    ids: tuple[str, ...] = (),
    docs: tuple[str, ...] = (),
    **values: Any,
) -> T:
    """A pydantic model or dataclass from a row: each field from the column of its
    name (or `columns[field]`), uuid columns `ids` as text, jsonb `docs` parsed;
    `values` are given as they are."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        names: list[str] = list(cls.model_fields)
    else:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    renamed = columns or {}
    for name in names:
        if name in values:
            continue
        value = row[renamed.get(name, name)]
        if name in ids and value is not None:
            value = str(value)
        elif name in docs and value is not None:
            value = json.loads(value)
        values[name] = value
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return cls.model_validate(values)  # type: ignore[return-value]
    return cls(**values)


async def fetch_all(
    conn: asyncpg.Connection, cls: type[T], query: str, *args: Any, **mapping: Any
) -> list[T]:
    """`from_row(cls, row, **mapping)` of each row `query` returns, in order."""
    return [from_row(cls, row, **mapping) for row in await conn.fetch(query, *args)]


async def fetch_one(
    conn: asyncpg.Connection, cls: type[T], query: str, *args: Any, **mapping: Any
) -> T | None:
    """`from_row(cls, row, **mapping)` of the row `query` returns (None: no row)."""
    row = await conn.fetchrow(query, *args)
    return None if row is None else from_row(cls, row, **mapping)


def row_count(status: str) -> int:
    """How many rows a command touched, from its status (`DELETE 2`, `INSERT 0 1`)."""
    return int(status.split()[-1])
