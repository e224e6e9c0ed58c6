"""Pacing of requests: concurrency, requests per second/minute, tokens per minute, and the
shared pause a 429's Retry-After (or an exhausted rate-limit header) imposes.

The budget belongs to the **endpoint** (provider, base_url, model, key), once per process:
every run, every step and every worker that calls the same model on the same server draws
from one :class:`EndpointLimits`, also when runs overlap or follow each other in one
process (each ``asyncio.run`` has its own event loop, so nothing here holds an asyncio
object across calls: waits are reservations of a moment, then a sleep).

Every attempt goes through :meth:`Throttle.slot`, in this order:

1. take a concurrency slot of the run: adaptive, AIMD as in NVIDIA Data Designer: a 429
   halves the limit, each run of ``limit`` successes adds one back;
2. wait while a pause is in force (Retry-After, capped at ``max_retry_after``);
3. reserve a send time from the request window (:class:`RateWindow`): no window of one
   second, starting anywhere, holds more than the cap, from the first request on;
4. take the token budgets (total, input, output tokens per minute): estimated before the
   call, corrected from the response's usage after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from datagen.llm.ratewindow import SENDING, RateWindow, Send, TokenBudget, mark_sent
from datagen.llm.types import RateLimitInfo
from datagen.redact import get_logger

__all__ = ["SENDING", "AdaptiveConcurrency", "EndpointLimits", "RateSpec", "RateWindow",
           "Send", "Throttle", "TokenBudget", "endpoint_key", "endpoint_limits", "limits_from",
           "mark_sent"]

log = get_logger("datagen.llm")

# Grants are spaced so that any cap+1 consecutive ones span the window plus this margin:
# the time between our grant and the request reaching the server varies by a few
# milliseconds (event-loop wake-ups, the transport's own CPU before it sends), and the
# margin absorbs that variation so the server never sees cap+1 in one second.
# The bound is enforced on the moment each transport reports its request written (the
# fast transports just before their socket write; litellm's, aiohttp's write_bytes, in the
# same step as its socket write); the margin covers the time from there to the server
# (measured: 0.5-4 ms). It costs cap x margin of the rate. (litellm's was 0.04 while its
# moment was aiohttp's send(), a loop turn or more before the write.)
SEND_JITTER_MARGIN_S = {"fast": 0.03, "slow": 0.03}


@dataclass(frozen=True)
class RateSpec:
    """What the config asks of one endpoint."""

    requests_per_second: float | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None
    max_retry_after: float = 60.0
    margin: float = SEND_JITTER_MARGIN_S["fast"]


@dataclass
class Estimate:
    """Tokens a request may use, before it is sent."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class EndpointLimits:
    """The process-wide budget of one endpoint: request window, token budgets, pause."""

    def __init__(self, name: str, spec: RateSpec, probe: bool = True) -> None:
        self.name = name
        self.spec = spec
        self.window: RateWindow | None = None
        self.tokens: dict[str, TokenBudget] = {}
        self.paused_until = 0.0  # time.monotonic() deadline shared by every worker
        self.pause_reason = ""
        self._cold = probe  # no request has gone out in this process yet
        self.reports_writes = False  # its transport tells the window when it writes
        self._probe: Send | None = None  # the first one, until it is written or answered
        self._probe_deadline = 0.0
        self._configure(spec)

    def _configure(self, spec: RateSpec) -> None:
        rates = [r for r in (spec.requests_per_second,
                             spec.requests_per_minute / 60 if spec.requests_per_minute
                             else None) if r]
        old = self.window
        self.window = RateWindow.for_rate(min(rates), spec.margin) if rates else None
        if old is not None and self.window is not None:
            self.window.adopt(old)
        self.tokens = {kind: TokenBudget(per_minute) for kind, per_minute in (
            ("total", spec.tokens_per_minute), ("input", spec.input_tokens_per_minute),
            ("output", spec.output_tokens_per_minute)) if per_minute}
        self.spec = spec

    def reconfigure(self, spec: RateSpec) -> None:
        if spec != self.spec:
            log.info("rate limits of %s changed: %s", self.name, spec)
            self._configure(spec)

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tokens)

    def pause(self, seconds: float, reason: str) -> float:
        """Hold every worker for ``seconds`` (capped); returns the pause taken."""
        cap = self.spec.max_retry_after
        if seconds > cap:
            log.warning("%s asked for a pause of %g s (%s); waiting %g s, the "
                        "model.max_retry_after cap", self.name, seconds, reason, cap)
            seconds = cap
        until = time.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until, self.pause_reason = until, reason
            log.warning("%s: every request waits %.1f s (%s), until %s", self.name, seconds,
                        reason, time.strftime("%H:%M:%S", time.localtime(time.time()
                                                                         + seconds)))
        return seconds

    def observe(self, info: RateLimitInfo | None) -> None:
        """A response's rate-limit headers (OpenAI's x-ratelimit-*, Anthropic's
        anthropic-ratelimit-*): when one budget has nothing left, every worker waits for
        its reset instead of collecting 429s."""
        if info is None:
            return
        for kind in ("requests", "tokens", "input_tokens", "output_tokens"):
            remaining = getattr(info, f"{kind}_remaining")
            reset = getattr(info, f"{kind}_reset_s")
            if remaining is not None and remaining <= 0 and reset:
                self.pause(reset, f"the provider's headers: no {kind.replace('_', ' ')} "
                                  "left until the limit resets")

    def paused_for(self) -> float:
        return max(0.0, self.paused_until - time.monotonic())

    def free_now(self) -> bool:
        """Nothing to wait for: no request window, no token budget, no pause (a cluster's
        limits always answer False: their state lives elsewhere)."""
        return self.window is None and not self.tokens and \
            self.paused_until <= time.monotonic()

    def rate_limited(self) -> None:
        """A 429 (the run's adaptive concurrency has halved): a cluster's limits tell
        every worker; one process has nothing more to do."""

    async def wait_turn(self, estimate: Estimate | None = None) -> Send | None:
        """Wait for the pause, the request window and the token budgets; the request's
        Send (None without a request window)."""
        send = None
        while True:
            while (remaining := self.paused_for()) > 0:
                await asyncio.sleep(remaining)
            if self.window is not None:
                send = await self._window_turn(self.window)
                if self.paused_for() > 0:  # a 429 arrived while we waited: wait again
                    continue
            break
        if estimate is not None and self.tokens:
            wait = max(self._take(kind, estimate) for kind in self.tokens)
            if wait > 0:
                await asyncio.sleep(wait)
        return send

    async def _probe_out(self) -> None:
        """The process's first request to an endpoint goes alone, until it is written
        (or answered, or 2 s passed): it may wait on imports and a new connection between
        our grant and the wire, and the window must count it from when it really went."""
        while (probe := self._probe) is not None and not probe.written and \
                time.monotonic() < self._probe_deadline:
            await asyncio.sleep(0.002)
        self._probe = None

    async def _window_turn(self, window: RateWindow) -> Send:
        await self._probe_out()
        now = time.monotonic()
        at = window.reserve(now)
        if at > now:
            await asyncio.sleep(at - now)
        while True:
            await self._probe_out()
            extra, send = window.settle(time.monotonic())
            if send is not None:
                break
            await asyncio.sleep(extra)
        send.pending = self.reports_writes
        if self._cold:
            self._cold, self._probe = False, send
            self._probe_deadline = time.monotonic() + 2.0
        return send

    def done(self, send: Send | None) -> None:
        """A request's attempt is over (answered or failed). The first one of the process,
        on a transport that cannot say when it wrote it, counts from its answer."""
        if send is not None and send is self._probe:
            if not send.written:
                send.sent(time.monotonic())
            self._probe = None
        if send is not None:
            send.pending = False  # written, or it never will be (it failed before)

    def _take(self, kind: str, estimate: Estimate) -> float:
        amount = {"total": estimate.total, "input": estimate.prompt,
                  "output": estimate.completion}[kind]
        return self.tokens[kind].take(amount)

    def used(self, estimate: Estimate, prompt: int, completion: int) -> None:
        actual = {"total": prompt + completion, "input": prompt, "output": completion}
        guess = {"total": estimate.total, "input": estimate.prompt,
                 "output": estimate.completion}
        for kind, budget in self.tokens.items():
            budget.adjust(guess[kind] - (actual[kind] or guess[kind]))


_ENDPOINTS: dict[str, EndpointLimits] = {}
_ENDPOINTS_LOCK = threading.Lock()
LimitsSource = Callable[[str, RateSpec, str], EndpointLimits]
_SOURCE: list[LimitsSource] = []  # set while a cluster shard runs in this process


def limits_from(source: LimitsSource | None) -> None:
    """Where :func:`endpoint_limits` gets an endpoint's limits from: ``source(key, spec,
    name)`` (a cluster's budget, shared by every worker of the cluster), or ``None`` for
    this process's own again."""
    with _ENDPOINTS_LOCK:
        _SOURCE[:] = [source] if source is not None else []


def endpoint_key(provider: str, base_url: str | None, model: str, api_key: str | None) -> str:
    """Who the provider counts a limit against: its server, the model and the key (as a
    hash: the key itself is never kept)."""
    key_hash = hashlib.sha256((api_key or "").encode()).hexdigest()[:12]
    return f"{provider}|{base_url or ''}|{model}|{key_hash}"


def endpoint_limits(key: str, spec: RateSpec, name: str = "") -> EndpointLimits:
    """The one EndpointLimits of this process for ``key`` (its spec updated to ``spec``)."""
    with _ENDPOINTS_LOCK:
        if _SOURCE:
            return _SOURCE[0](key, spec, name or key.split("|")[2])
        limits = _ENDPOINTS.get(key)
        if limits is None:
            limits = _ENDPOINTS[key] = EndpointLimits(name or key.split("|")[2], spec)
        else:
            limits.reconfigure(spec)
        return limits


class AdaptiveConcurrency:
    """At most ``limit`` requests in flight; the limit shrinks on 429 and grows back.

    The uncontended path takes no lock (the event loop runs one task at a time, and there
    is no await between the check and the increment); waiters queue in order. One per run
    (its futures belong to the run's event loop).
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

    def take_now(self) -> bool:
        """A slot at once, if one is free and nobody waits for one (no coroutine)."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    def release(self) -> None:
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

    def set_limit(self, limit: int) -> None:
        """A limit decided elsewhere: this process's share of a cluster-wide one."""
        self.limit = max(1, min(self.maximum, limit))
        self._successes = 0
        self._wake()

    def succeeded(self) -> None:
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self.limit += 1
            self._successes = 0
            self._wake()


class Throttle:
    """One run's view of an endpoint: its own concurrency, the endpoint's shared limits.

    ``Throttle(rate)`` alone (no ``limits``) has limits of its own, for tests and tools.
    """

    def __init__(self, requests_per_second: float | None = None, *,
                 requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, concurrency: int | None = None,
                 limits: EndpointLimits | None = None) -> None:
        self.limits = limits or EndpointLimits("endpoint", RateSpec(
            requests_per_second, requests_per_minute, tokens_per_minute), probe=False)
        self.concurrency = AdaptiveConcurrency(concurrency) if concurrency else None

    @property
    def counts_tokens(self) -> bool:
        """Whether a token budget is enforced (else no estimate is needed)."""
        return self.limits.counts_tokens

    def pause(self, seconds: float, reason: str = "Retry-After") -> float:
        """Hold every worker of the endpoint for ``seconds`` (capped); the pause taken."""
        return self.limits.pause(seconds, reason)

    def rate_limited(self) -> None:
        if self.concurrency is not None:
            self.concurrency.rate_limited()
        self.limits.rate_limited()

    async def wait_turn(self, estimate: Estimate | None = None) -> Send | None:
        return await self.limits.wait_turn(estimate)

    def used_tokens(self, estimate: Estimate, prompt: int, completion: int) -> None:
        self.limits.used(estimate, prompt, completion)

    def enter_now(self) -> bool:
        """Begin an attempt at once when nothing asks it to wait (the common case: no
        request window, no token budget, no pause, a free concurrency slot), with no
        coroutine and no context variable; end it with :meth:`leave_now`. False: go
        through :meth:`slot`."""
        if not self.limits.free_now():
            return False
        return self.concurrency is None or self.concurrency.take_now()

    def leave_now(self) -> None:
        if self.concurrency is not None:
            self.concurrency.release()

    @asynccontextmanager
    async def slot(self, estimate: Estimate | None = None) -> AsyncIterator[None]:
        """Hold a concurrency slot for one attempt, after waiting for the limits."""
        if self.concurrency is not None:
            await self.concurrency.acquire()
        send, token = None, None
        try:
            send = await self.wait_turn(estimate)
            token = SENDING.set(send)
            yield
        finally:
            if token is not None:
                SENDING.reset(token)
            self.limits.done(send)
            if self.concurrency is not None:
                self.concurrency.release()
