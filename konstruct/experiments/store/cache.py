"""The output cache's SQL (`llm_cache`, per tenant under row-level security).

A call's key is the sha256 of what decides its answer: the kind of call (`task`
or `judge`), the deployment id, the messages (the system prompt and the rendered
prompt; a judge's prompt holds the task output it judges), the temperature, the
max_tokens and the item's epoch. Only successful calls are stored; a hit is
answered with no provider call, no rate slot and no budget reservation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

CallKind = Literal["task", "judge"]


def cache_key(
    kind: CallKind,
    deployment_id: str,
    messages: list[dict[str, str]],
    temperature: float | None,
    max_tokens: int | None,
    epoch: int,
    response_format: dict[str, Any] | None = None,
) -> str:
    """The hex sha256 of a call: the same for the same call in any experiment (a
    call without a `response_format` keeps the key it had before there was one)."""
    extra = {} if response_format is None else {"response_format": response_format}
    canonical = json.dumps(
        {
            **extra,
            "kind": kind,
            "deployment": deployment_id,
            "messages": [
                {"role": m.get("role", ""), "content": m.get("content") or ""} for m in messages
            ],
            "temperature": temperature,
            "max_tokens": max_tokens,
            "epoch": epoch,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def item_epoch(row: Any) -> int:
    """The epoch of an item row read with `EPOCH_COLUMN` (from 1, migration 010)."""
    return int(row["epoch"])


# The item's epoch (`experiment_items.epoch`, migration 010).
EPOCH_COLUMN = "i.epoch"


@dataclass(frozen=True)
class CacheEntry:
    key: str
    kind: CallKind
    deployment_id: str
    output: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    # What the call cost when it was made (None: its price was unknown).
    cost_usd: float | None


async def lookup(
    conn: asyncpg.Connection, tenant_id: str, keys: Iterable[str]
) -> dict[str, CacheEntry]:
    """The entries stored under `keys` (one query, however many keys)."""
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "select key, kind, deployment_id, output, model, prompt_tokens, completion_tokens,"
        " cost_usd from llm_cache where tenant_id = $1 and key = any($2::text[])",
        tenant_id,
        wanted,
    )
    return {
        r["key"]: CacheEntry(
            key=r["key"],
            kind=r["kind"],
            deployment_id=r["deployment_id"],
            output=r["output"],
            model=r["model"],
            prompt_tokens=r["prompt_tokens"],
            completion_tokens=r["completion_tokens"],
            cost_usd=r["cost_usd"],
        )
        for r in rows
    }


async def store(conn: asyncpg.Connection, tenant_id: str, entries: list[CacheEntry]) -> None:
    """Store successful calls' outputs; an entry stored first stays."""
    if not entries:
        return
    await conn.execute(
        "insert into llm_cache (tenant_id, key, kind, deployment_id, output, model,"
        " prompt_tokens, completion_tokens, cost_usd) select $1, * from unnest($2::text[],"
        " $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::int[],"
        " $9::float8[]) on conflict do nothing",
        tenant_id,
        [e.key for e in entries],
        [e.kind for e in entries],
        [e.deployment_id for e in entries],
        [e.output for e in entries],
        [e.model for e in entries],
        [e.prompt_tokens for e in entries],
        [e.completion_tokens for e in entries],
        [e.cost_usd for e in entries],
    )
