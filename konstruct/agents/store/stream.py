"""Publishing a message's live events (`konstruct.agents.streaming`)."""

from __future__ import annotations

import asyncpg

from konstruct.agents.streaming import STREAM_CHANNEL


async def notify(conn: asyncpg.Connection, payloads: list[str]) -> None:
    """Send each payload on the stream channel, in order; a listener gets them as
    soon as this commits (at once outside a transaction)."""
    for payload in payloads:
        await conn.execute("select pg_notify($1, $2)", STREAM_CHANNEL, payload)
