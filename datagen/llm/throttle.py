"""Pacing of requests: concurrency, requests per second/minute, tokens per minute, and the
shared pause a 429's Retry-After imposes.

Every attempt goes through :meth:`Throttle.slot`, in this order:

1. wait while a Retry-After pause is in force (it holds every worker, not just one);
2. take a concurrency slot: adaptive, AIMD as in NVIDIA Data Designer: a 429 halves the
   limit, each run of ``limit`` successes adds one back, up to the configured maximum;
3. wait for the request rate: aiolimiter with a small bucket. ``AsyncLimiter(rate, 1)``
   would let a whole bucket through at once and burst again whenever the client falls
   behind (measured: 155-204 requests in one second against a cap of 100). Any 1-second
   window holds at most capacity + leak rate requests, so the bucket holds 3% of the rate
   (at least one request) and leaks at 97%: the two add up to the cap. A bucket of exactly
   one request would lose every late wake-up of the event loop (measured: 91 req/s against
   a cap of 100); a few requests of slack absorb them (measured: 97);
4. wait for the token budget: an estimate (prompt characters / 4 + max_tokens) is taken
   before the call and corrected from the response's usage after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter

RATE_MARGIN = 0.97


def request_limiter(rate: float, slack: bool = True) -> AsyncLimiter:
    """A limiter that never lets more than ``rate`` requests into any 1-second window.

    ``slack=False`` keeps a bucket of one request: for transports that spend milliseconds
    of CPU between our grant and their send (litellm: ~4 ms), where a few requests of
    slack let sends bunch at the server (measured: 114 in one second against a cap of 100).
    """
    capacity = max(1, int(rate * (1 - RATE_MARGIN))) if slack else 1
    leak = rate * RATE_MARGIN
    return AsyncLimiter(capacity, capacity / leak)


class TokenBucket:
    """A token bucket that can be charged or refunded after the fact.

    Written by hand because aiolimiter cannot give back budget: the token estimate made
    before a call is corrected with the real usage after it. Waiters are served in order.
    """

    def __init__(self, per_second: float, capacity: float) -> None:
        self.rate = per_second
        self.capacity = capacity
        self.level = capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:
            self._refill()
            while self.level < amount:
                await asyncio.sleep((amount - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def adjust(self, delta: float) -> None:
        """Give back (``delta`` > 0) or charge more (< 0) after the real usage is known."""
        self._refill()
        self.level = min(self.capacity, self.level + delta)


class AdaptiveConcurrency:
    """At most ``limit`` requests in flight; the limit shrinks on 429 and grows back.

    The uncontended path takes no lock (the event loop runs one task at a time, and there
    is no await between the check and the increment); waiters queue in order.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._successes = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot was handed over by _wake
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # handed a slot while being cancelled: give it back
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def rate_limited(self) -> None:
        self.limit = max(1, self.limit // 2)
        self._successes = 0

    def succeeded(self) -> None:
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self.limit += 1
            self._successes = 0
            self._wake()


def _per_second(requests_per_second: float | None, requests_per_minute: float | None
                ) -> float | None:
    rates = [r for r in (requests_per_second,
                         requests_per_minute / 60 if requests_per_minute else None) if r]
    return min(rates) if rates else None


class Throttle:
    """Every attempt waits its turn here before it is sent."""

    def __init__(self, requests_per_second: float | None = None, *,
                 requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, concurrency: int | None = None,
                 slack: bool = True) -> None:
        self.rate = _per_second(requests_per_second, requests_per_minute)
        self._limiter = request_limiter(self.rate, slack) if self.rate else None
        self._tokens = (TokenBucket(tokens_per_minute / 60 * RATE_MARGIN,
                                    capacity=tokens_per_minute / 60)
                        if tokens_per_minute else None)
        self.concurrency = AdaptiveConcurrency(concurrency) if concurrency else None
        self._paused_until = 0.0  # time.monotonic() deadline shared by all workers

    @property
    def counts_tokens(self) -> bool:
        """Whether a tokens-per-minute budget is enforced (else no estimate is needed)."""
        return self._tokens is not None

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (a provider's Retry-After)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def rate_limited(self) -> None:
        if self.concurrency is not None:
            self.concurrency.rate_limited()

    async def _wait_pause(self) -> None:
        while (remaining := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)

    async def wait_turn(self, tokens: int = 0) -> None:
        """Wait for the pause, the request rate and the token budget (no slot taken)."""
        await self._wait_pause()
        if self._limiter is not None:
            await self._limiter.acquire()
        if self._tokens is not None and tokens:
            # a request larger than a second's budget is let through when the bucket is
            # full; it then holds the next ones back until the budget has caught up
            await self._tokens.take(tokens)

    def used_tokens(self, estimated: int, actual: int) -> None:
        if self._tokens is not None and estimated:
            self._tokens.adjust(estimated - actual)

    @asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[None]:
        """Hold a concurrency slot for one attempt, after waiting for the limits."""
        if self.concurrency is not None:
            await self.concurrency.acquire()
        try:
            await self.wait_turn(tokens)
            yield
        finally:
            if self.concurrency is not None:
                await self.concurrency.release()
