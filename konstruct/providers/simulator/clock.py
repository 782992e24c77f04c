"""The simulator's clock: what rate limits, windows, quotas and timelines read.

It runs with `time.monotonic()` plus an offset, and a test can freeze it (no
refill, no window moving, whatever the wall time) or advance it by N seconds
(limiters and windows then behave as if N idle seconds passed) through
`POST /admin/clock`. It never goes backwards: resuming real time continues from
the reading it was frozen at, and seconds advanced stay advanced. Latency and
hang sleeps are real time and do not read it; a streamed reply's time to first
token and delay between tokens do (`sleep`), so a test that freezes the clock
holds a stream after its first token until it advances the clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class Clock:
    def __init__(self, source: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._offset = 0.0
        self._frozen_at: float | None = None
        # Set (and replaced) whenever the clock is moved by hand: wakes `sleep`ers.
        self._moved = asyncio.Event()

    def now(self) -> float:
        if self._frozen_at is not None:
            return self._frozen_at
        return self._source() + self._offset

    @property
    def frozen(self) -> bool:
        return self._frozen_at is not None

    def freeze(self) -> None:
        """Stop at the current reading (a frozen clock stays where it is)."""
        if self._frozen_at is None:
            self._frozen_at = self.now()

    def resume(self) -> None:
        """Run at real speed again, from the current reading."""
        if self._frozen_at is not None:
            self._offset = self._frozen_at - self._source()
            self._frozen_at = None
            self._wake()

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds` (>= 0), frozen or not."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"advance_s must be a finite number >= 0, not {seconds}")
        if self._frozen_at is not None:
            self._frozen_at += seconds
        else:
            self._offset += seconds
        self._wake()

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        """Wait until this clock has moved `seconds` on: in real time while it runs,
        or until a test advances (or resumes) it while it is frozen."""
        target = self.now() + seconds
        while (left := target - self.now()) > 0:
            moved = self._moved
            if self._frozen_at is not None:
                await moved.wait()
            else:
                try:
                    await asyncio.wait_for(moved.wait(), left)
                except TimeoutError:
                    pass


class ClockChange(BaseModel):
    """The body of `POST /admin/clock`: freeze or resume, then advance."""

    model_config = ConfigDict(extra="forbid")

    frozen: StrictBool | None = None
    advance_s: float = Field(0.0, ge=0, allow_inf_nan=False)

    def apply(self, clock: Clock) -> None:
        if self.frozen is True:
            clock.freeze()
        elif self.frozen is False:
            clock.resume()
        clock.advance(self.advance_s)
