"""Rows to typed values: one mapping for every store module."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

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
