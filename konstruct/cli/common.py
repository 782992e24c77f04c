"""Shared plumbing of the CLI commands."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from konstruct.config import Settings, load_settings
from konstruct.errors import KonstructError
from konstruct.temporal_client import connect

T = TypeVar("T")


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


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


async def client_of(settings: Settings) -> Client:
    try:
        return await connect(settings.temporal)
    except RuntimeError as exc:
        raise KonstructError(
            f"cannot reach Temporal at {settings.temporal.target}: {exc}. "
            "Is the stack up (`konstruct up`)?"
        ) from exc


def print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def failure_message(error: WorkflowFailureError) -> str:
    """The innermost cause of a workflow failure, with its type."""
    cause: BaseException | None = error.cause
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause  # type: ignore[union-attr]
    if isinstance(cause, ApplicationError) and cause.type:
        return f"{cause.type}: {cause.message}"
    return str(cause or error)
