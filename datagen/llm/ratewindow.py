"""The two loop-free budgets of an endpoint: the request window (at most N requests in
any second, counted from when each request really went out) and a token budget per
minute. Thread-safe, and no asyncio object in them: every event loop of the process (and,
through the cluster's budget actor, every process) shares them."""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections import deque


class Send:
    """The moment one request went out: first when the window let it go, moved later when
    the transport reports the request written (or, for a process's first request on a
    transport that cannot report it, when its answer came back)."""

    __slots__ = ("at", "pending", "written")

    def __init__(self, at: float) -> None:
        self.at = at
        self.written = False
        self.pending = False  # its transport will report the write (until it does)

    def sent(self, at: float) -> None:
        self.at = max(self.at, at)
        self.written = True


# The Send of the request this task is making, for the transport's "written" hook.
SENDING: contextvars.ContextVar[Send | None] = contextvars.ContextVar("datagen_sending",
                                                                     default=None)


def mark_sent() -> None:
    """Called by a transport the moment its request is written (aiohttp's trace hook)."""
    send = SENDING.get()
    if send is not None:
        send.sent(time.monotonic())


class RateWindow:
    """At most ``count`` requests in any ``window`` seconds, spaced at least ``spacing``.

    Written by hand because a token bucket (aiolimiter's ``AsyncLimiter``) cannot give
    this guarantee at small rates: a bucket of capacity c leaking at r lets c + r requests
    into one second, so either c is 0 (impossible) or the cap is exceeded, or r is cut far
    below the cap (measured with aiolimiter: 6 in one second at a cap of 5, 201-202 at
    200). A sliding log of the last ``count`` send moments gives the exact bound.

    Two stages, both thread-safe and loop-free (every event loop of the process shares
    one window): a *reservation* spreads waiters over time without waking them all at
    once; *settling* checks the bound again against the moments requests really went out
    (a waiter woken late must not go together with the next ones).
    """

    def __init__(self, count: int, window: float, spacing: float, margin: float) -> None:
        self.count, self.window, self.spacing, self.margin = count, window, spacing, margin
        self._grants: deque[float] = deque(maxlen=count)  # reserved moments
        self._sent: deque[Send] = deque(maxlen=count)  # moments requests really went
        self._lock = threading.Lock()

    @classmethod
    def for_rate(cls, per_second: float, margin: float) -> RateWindow:
        """The window for a cap of ``per_second``: at most floor(rate) requests in any one
        second (a fractional rate below 1: one request per 1/rate seconds)."""
        if per_second >= 1:
            count, window = math.floor(per_second), 1.0
        else:
            count, window = 1, 1.0 / per_second
        # evenly paced at 90% of the window's share, so there is no burst at the start
        return cls(count, window, 0.9 * window / count, margin)

    def reserve(self, now: float) -> float:
        """The moment the next request may be sent (>= now), reserved for the caller."""
        with self._lock:
            at = now
            if self._grants:
                at = max(at, self._grants[-1] + self.spacing)
            if len(self._grants) == self.count:
                at = max(at, self._grants[0] + self.window + self.margin)
            self._grants.append(at)
            return at

    def settle(self, now: float) -> tuple[float, Send | None]:
        """After the wait for a reservation: (0, its Send) to go now, or (how much longer
        to wait, None)."""
        with self._lock:
            wait = 0.0
            if self._sent and not self._sent[-1].written:  # (a reported write is where
                # it went: a transport's bunched writes are the bound's business below)
                wait = self._sent[-1].at + 0.7 * self.spacing - now
            if len(self._sent) == self.count:
                wait = max(wait, self._oldest(now) + self.window + self.margin - now)
            if wait > 0:
                return wait, None
            send = Send(now)
            self._sent.append(send)
            return 0.0, send

    def _oldest(self, now: float) -> float:
        """When the earliest of the last ``count`` requests went out. One whose transport
        will report its write, not reported yet, goes out from now on (litellm's own CPU
        can hold a request back for tens of milliseconds, past requests granted after
        it: counted at its grant, that let cap + 1 into one second). Reported moments
        can be out of grant order, so every one is read."""
        return min(send.at if send.written or not send.pending else max(send.at, now)
                   for send in self._sent)

    def adopt(self, other: RateWindow) -> None:
        """Keep the moments of the window this one replaces (a changed config), so the
        bound holds across the change."""
        with self._lock:
            for stamp in list(other._grants)[-self.count:]:
                self._grants.append(stamp)
            for send in list(other._sent)[-self.count:]:
                self._sent.append(send)


class TokenBudget:
    """Tokens per minute, taken before a call and corrected after it.

    Written by hand because aiolimiter cannot give budget back: the estimate made before a
    call is corrected with the real usage after it. The level may go below zero (a debt):
    the caller waits until it is paid back. Thread-safe and loop-free, like RateWindow.
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute / 60.0  # one second's worth: no minute-sized burst
        self.level = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, amount: float) -> float:
        """Take ``amount``; return how long to wait before sending."""
        with self._lock:
            now = time.monotonic()
            self._refill(now)
            # a request larger than the capacity is let through at a full bucket; it then
            # holds the next ones back until the budget has caught up
            self.level -= min(amount, self.capacity)
            return max(0.0, -self.level / self.rate)

    def adjust(self, delta: float) -> None:
        """Give back (``delta`` > 0) or charge more (< 0) after the real usage is known."""
        with self._lock:
            self._refill(time.monotonic())
            self.level = min(self.capacity, self.level + delta)
