"""Publishing a message's live events while its activities run (for a message sent
with `stream`): the text a model step writes, and its tool calls starting and ending.

Best effort by design: the stored reply is the truth, and the client's view
(`konstruct.agents.streaming.StreamView`) completes its text from it at the end,
so an event lost to a database hiccup costs liveness, never the answer. A step's
work never waits on publishing: text is buffered and one `NOTIFY` at a time
carries whatever arrived meanwhile (the busier the worker, the bigger each).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg

from konstruct.agents.store.stream import notify
from konstruct.agents.streaming import MAX_TEXT_PER_EVENT, StreamEvent

log = logging.getLogger("konstruct.agent")


class TextPublisher:
    """One run of one model step: `write` its text as it comes, `close` at the end."""

    def __init__(self, pool: asyncpg.Pool, workflow_id: str, step: int) -> None:
        self.pool = pool
        self.workflow_id = workflow_id
        self.step = step
        self.run = uuid.uuid4().hex[:8]
        self._buffer = ""
        self._sending: asyncio.Task[None] | None = None

    def write(self, text: str) -> None:
        if not text:
            return
        self._buffer += text
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())

    async def close(self) -> None:
        """Send what is left (the step's answer is stored after this)."""
        if self._sending is not None:
            await self._sending
        if self._buffer:
            await self._send()

    async def _send(self) -> None:
        while self._buffer:
            text, self._buffer = self._buffer, ""
            events = [
                StreamEvent(
                    self.workflow_id,
                    "text",
                    self.step,
                    self.run,
                    text[i : i + MAX_TEXT_PER_EVENT],
                ).encode()
                for i in range(0, len(text), MAX_TEXT_PER_EVENT)
            ]
            await publish(self.pool, events)


async def publish(pool: asyncpg.Pool, payloads: list[str]) -> None:
    """NOTIFY the payloads; a failure is logged, never raised (see the module)."""
    try:
        async with pool.acquire(timeout=5) as conn:
            await notify(conn, payloads)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        log.warning("a live event of a message was not published: %s", exc)


async def publish_tool(
    pool: asyncpg.Pool, workflow_id: str, step: int, call_id: str, tool: str, status: str
) -> None:
    await publish(
        pool,
        [
            StreamEvent(
                workflow_id, "tool", step, call_id=call_id, tool=tool, status=status
            ).encode()
        ],
    )
