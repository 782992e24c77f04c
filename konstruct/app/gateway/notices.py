"""The gateway's one listener for `HandleMessage`'s notices that it awaits a person's approval."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

log = logging.getLogger("konstruct.app.gateway")

# The channel `HandleMessage` notifies (payload: its workflow id) when it starts
# waiting for a person to approve a tool call; delivered when that commits.
AWAITING_APPROVAL_CHANNEL = "konstruct_awaiting_approval"
# The listener's reconnect backoff, and how often it checks its idle connection.
LISTEN_RETRY_FIRST_S = 0.5
LISTEN_RETRY_MAX_S = 30.0
LISTEN_KEEPALIVE_S = 15.0


@dataclass
class ApprovalNotices:
    """One LISTEN connection for `konstruct_awaiting_approval`, shared by all requests.

    A request registers a future for its workflow id before it starts the workflow,
    so no notice of that workflow can slip between the start and the wait. The
    connection is re-made (with backoff) whenever it drops; `generation` counts
    connections, so a waiter can tell that notices may have been missed meanwhile.
    """

    url: str
    connected: bool = False
    generation: int = 0
    _waiters: dict[str, set[asyncio.Future[None]]] = field(default_factory=dict)
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

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for future in self._waiters.get(payload, ()):
            if not future.done():
                future.set_result(None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="gateway-approval-listener")

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
