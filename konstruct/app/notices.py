"""One listener for `HandleMessage`'s notices: that it awaits a person's approval, and
the live events of a streamed message (`konstruct.agents.streaming`). The gateway
keeps one for all its requests; `konstruct send --stream` one for its message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from konstruct.agents.streaming import STREAM_CHANNEL, StreamEvent, workflow_of
from konstruct.platform.errors import ServiceUnreachable

log = logging.getLogger("konstruct.app.notices")

# The channel `HandleMessage` notifies (payload: its workflow id) when it starts
# waiting for a person to approve a tool call; delivered when that commits.
AWAITING_APPROVAL_CHANNEL = "konstruct_awaiting_approval"
# The listener's reconnect backoff, and how often it checks its idle connection.
LISTEN_RETRY_FIRST_S = 0.5
LISTEN_RETRY_MAX_S = 30.0
LISTEN_KEEPALIVE_S = 15.0


@dataclass
class Notices:
    """One LISTEN connection for `konstruct_awaiting_approval` and the stream channel,
    shared by all requests.

    A request registers a future (`register`) or a queue (`subscribe`) for its
    workflow id before it starts the workflow, so no notice of that workflow can
    slip between the start and the wait. The
    connection is re-made (with backoff) whenever it drops; `generation` counts
    connections, so a waiter can tell that notices may have been missed meanwhile.
    """

    url: str
    connected: bool = False
    generation: int = 0
    _waiters: dict[str, set[asyncio.Future[None]]] = field(default_factory=dict)
    _streams: dict[str, set[asyncio.Queue[StreamEvent]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def register(self, workflow_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(workflow_id, set()).add(future)
        return future

    def unregister(self, workflow_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._waiters.get(workflow_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[workflow_id]
        future.cancel()

    def subscribe(self, workflow_id: str) -> asyncio.Queue[StreamEvent]:
        """A queue that gets the workflow's live events from now on."""
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._streams.setdefault(workflow_id, set()).add(queue)
        return queue

    def unsubscribe(self, workflow_id: str, queue: asyncio.Queue[StreamEvent]) -> None:
        queues = self._streams.get(workflow_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._streams[workflow_id]

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for future in self._waiters.get(payload, ()):
            if not future.done():
                future.set_result(None)

    def _streamed(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        queues = self._streams.get(workflow_of(payload))
        if not queues:
            return  # another process's message, or one nobody streams
        event = StreamEvent.decode(payload)
        if event is not None:
            for queue in queues:
                queue.put_nowait(event)

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Start listening and wait for the connection (a one-off listener's start:
        `konstruct send --stream`); ServiceUnreachable if it is not up in time."""
        self.start()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.connected:
            if asyncio.get_running_loop().time() >= deadline:
                await self.stop()
                raise ServiceUnreachable(
                    f"cannot listen for the message's live events on PostgreSQL within"
                    f" {timeout_s:g} s: is the stack up (`konstruct status`)?"
                )
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="notice-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _listen(self) -> None:
        backoff = LISTEN_RETRY_FIRST_S
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.url, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(AWAITING_APPROVAL_CHANNEL, self._notified)
                await conn.add_listener(STREAM_CHANNEL, self._streamed)
                self.connected = True
                self.generation += 1
                if backoff > LISTEN_RETRY_FIRST_S:
                    log.info("listening for %s again", AWAITING_APPROVAL_CHANNEL)
                backoff = LISTEN_RETRY_FIRST_S
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_KEEPALIVE_S)
                    except TimeoutError:
                        # A connection dropped without a word is only found by using it.
                        await conn.execute("select 1", timeout=5)
                log.warning("the %s listener lost its connection", AWAITING_APPROVAL_CHANNEL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "the %s listener is down (%s: %s); retrying in %g s",
                    AWAITING_APPROVAL_CHANNEL,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self.connected = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(LISTEN_RETRY_MAX_S, backoff * 2)


async def events_until(
    queue: asyncio.Queue[StreamEvent],
    done: asyncio.Future[Any],
    first: asyncio.Future[StreamEvent] | None = None,
) -> AsyncIterator[StreamEvent]:
    """The live events a subscription gets until `done` (the workflow's answer) is;
    `first`: a `queue.get()` the caller already started."""
    event = first
    while True:
        event = event or asyncio.ensure_future(queue.get())
        await asyncio.wait({event, done}, return_when=asyncio.FIRST_COMPLETED)
        if not event.done():
            event.cancel()
            return
        yield event.result()
        event = None
