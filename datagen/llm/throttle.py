"""Pacing of requests: a smooth requests-per-second cap and a shared pause for 429s.

aiolimiter is the leaky bucket; we give it a bucket of one request that drains every
1 / (rate x margin) seconds. ``AsyncLimiter(rate, 1)`` would let a full bucket through at
once and burst again whenever the client falls behind (measured: 155-204 requests in one
second against a cap of 100); a one-request bucket spaces requests evenly, so no
1-second window at the server sees more than the cap even with ~30 ms of network jitter.
"""

from __future__ import annotations

import asyncio
import time

from aiolimiter import AsyncLimiter

RATE_MARGIN = 0.97


class Throttle:
    """Every request waits its turn here before it is sent."""

    def __init__(self, requests_per_second: float | None = None) -> None:
        self.rate = requests_per_second
        self._limiter = (
            AsyncLimiter(1, 1.0 / (requests_per_second * RATE_MARGIN))
            if requests_per_second
            else None
        )
        self._paused_until = 0.0  # time.monotonic() deadline shared by all workers

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (a provider's Retry-After)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait_turn(self) -> None:
        while (remaining := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)
        if self._limiter is not None:
            await self._limiter.acquire()
