"""What the CLI prints: rich tables, live views and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import RenderableType

# Piped output is not wrapped at 80 columns: one table row stays one line.
_PIPE_WIDTH = 250


@cache
def console() -> Console:
    """Where tables and live views go; never colours or wraps a pipe."""
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


class LiveView:
    """A view that changes while a workflow runs.

    On a terminal it is redrawn in place (rich Live); piped, nothing is redrawn
    and `say` lines are the record. `say` prints above a live view either way.
    """

    def __init__(self, transient: bool = False) -> None:
        from rich.live import Live  # only the commands that follow a workflow load it

        self.console = console()
        self._live = (
            Live(console=self.console, auto_refresh=False, transient=transient)
            if self.console.is_terminal
            else None
        )

    @property
    def is_live(self) -> bool:
        return self._live is not None

    def update(self, view: RenderableType) -> None:
        if self._live is not None:
            self._live.update(view, refresh=True)

    def say(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
