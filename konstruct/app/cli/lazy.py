"""A click group that imports a subcommand's module only when that subcommand is called.

`konstruct --help` lists the commands from the one-line help stored with each
name, so it imports none of them, and `konstruct status` imports the stack's
commands only. tests/test_cli_startup.py checks that each stored line is what
the command's own help shortens to, so the two cannot drift apart.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click


class LazyGroup(click.Group):
    """A group whose commands are `name -> ("module:attribute", one-line help)`,
    imported on first use; commands added the usual way are listed with them."""

    def __init__(
        self, *args: Any, lazy: Mapping[str, tuple[str, str]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(self.load(cmd_name), cmd_name)
        return self.commands.get(cmd_name)

    def load(self, name: str) -> click.Command:
        """Import the command stored under `name`."""
        module, _, attribute = self.lazy[name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[name][0]} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The `Commands:` section of `--help`, as click writes it, from the stored help."""
        stubs: dict[str, click.Command] = {
            name: click.Command(name, help=help) for name, (_, help) in self.lazy.items()
        }
        listing = click.Group(self.name, commands={**stubs, **self.commands})
        click.Group.format_commands(listing, ctx, formatter)
