"""One call with everything around it: the cache, a turn from the throttle, the send, and
the retries of what can be retried."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from datagen.llm.errors import CallError
from datagen.llm.throttle import Estimate, Throttle
from datagen.llm.types import ChatRequest, Completion
from datagen.redact import get_logger

if TYPE_CHECKING:
    from datagen.llm.cache import ResponseCache
    from datagen.seen import KeyIndex

log = get_logger("datagen.llm")
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class Transport(Protocol):
    """Sends one request, once (no hidden retries), and reads the answer; every failure
    is a :class:`CallError`. Real providers, the embedded model and the test kit's fakes
    all plug in here."""

    name: str

    async def complete(self, request: ChatRequest) -> Completion: ...

    async def aclose(self) -> None: ...


@dataclass
class CallStats:
    """Counters of one run's calls, reported in the manifest and the summary."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cost_usd: float | None = 0.0  # None once a call of unknown price was made

    @classmethod
    def total(cls, parts: list[CallStats]) -> CallStats:
        """The counters of every model a run used, added up (each model counted once)."""
        out = cls()
        for s in {id(s): s for s in parts}.values():
            out.add(s)
        return out

    def add(self, s: CallStats) -> None:
        self.requests += s.requests
        self.retries += s.retries
        self.rate_limited += s.rate_limited
        self.errors_by_kind.update(s.errors_by_kind)
        self.prompt_tokens += s.prompt_tokens
        self.completion_tokens += s.completion_tokens
        self.cache_hits += s.cache_hits
        self.cache_misses += s.cache_misses
        self.cost_usd = (None if self.cost_usd is None or s.cost_usd is None
                         else self.cost_usd + s.cost_usd)


def estimate_tokens(request: ChatRequest) -> Estimate:
    """Tokens a request may use, before it is sent: prompt characters / 4 + the budget."""
    text = request.prompt if request.prompt is not None else "".join(
        str(m.get("content", "")) for m in request.messages)
    budget = request.params.get("max_tokens") or request.params.get("max_completion_tokens")
    choices = request.params.get("n")  # n answers: n budgets, one prompt
    choices = choices if isinstance(choices, int) and choices > 1 else 1
    return Estimate(len(text) // 4 + 4 * len(request.messages), int(budget or 256) * choices)


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2**attempt))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


@dataclass
class Caller:
    transport: Transport
    throttle: Throttle
    max_retries: int = 3
    stats: CallStats = field(default_factory=CallStats)
    cache: ResponseCache | None = None
    prices: tuple[float, float] | None = None  # dollars per input / output token
    lookup: bool = True  # False: nothing this run asks can be stored yet (a new run whose
    # answers are kept for its own resume only): answers are stored, never looked up
    seen: KeyIndex | None = None  # batch mode, whose rounds replay answers: the requests
    # this run answered or counted already (a replay is not a cache hit)

    async def call(self, request: ChatRequest, cache_key: str | None = None
                   ) -> tuple[Completion, int]:
        """Send ``request``; returns the completion and the number of attempts made
        (0: answered from the cache, nothing sent).

        Raises the last :class:`CallError` when it cannot be retried or retries ran out.
        """
        if self.cache is not None and cache_key is not None and self.lookup:
            hit = self.cache.get(cache_key)
            if hit is not None:
                if self.seen is None or not self.seen.add(cache_key):
                    self.stats.cache_hits += 1
                return hit, 0
            self.stats.cache_misses += 1
        estimate = estimate_tokens(request) if self.throttle.counts_tokens else None
        attempt = 0
        throttle = self.throttle
        while True:
            attempt += 1
            try:
                if throttle.enter_now():  # nothing to wait for: no context manager
                    try:
                        self.stats.requests += 1
                        completion = await self.transport.complete(request)
                    finally:
                        throttle.leave_now()
                else:
                    async with throttle.slot(estimate):
                        self.stats.requests += 1
                        completion = await self.transport.complete(request)
            except CallError as err:
                await self._failed(err, attempt)
                continue
            return self._answered(request, completion, estimate, cache_key), attempt

    def cached(self, cache_key: str) -> Completion | None:
        """The cache's answer to a request, or None; nothing is sent. (For samples of a
        shared request of which some were done before a resume: the others' choices.)"""
        if self.cache is None or not self.lookup:
            return None
        hit = self.cache.get(cache_key)
        if hit is not None:
            self.stats.cache_hits += 1
        return hit

    async def _failed(self, err: CallError, attempt: int) -> None:
        """Count a failed attempt; raise it if it is final, else wait before the next."""
        self.stats.errors_by_kind[err.kind] += 1
        self.throttle.limits.observe(err.rate_limits)
        if err.kind == "rate_limit":
            self.stats.rate_limited += 1
            self.throttle.rate_limited()
        if not err.retryable or attempt > self.max_retries:
            err.attempts = attempt
            raise err
        delay = self._delay(err, attempt)
        self.stats.retries += 1
        log.info("retry %d/%d in %.2fs after %s: %s", attempt, self.max_retries, delay,
                 err.kind, err.message[:200])
        await asyncio.sleep(delay)

    def _answered(self, request: ChatRequest, completion: Completion,
                  estimate: Estimate | None, cache_key: str | None) -> Completion:
        prefill = request.prefill
        if prefill:  # the record holds the whole answer: the prefill and its continuation
            completion = with_prefill(completion, prefill)
        usage = completion.usage
        self.throttle.limits.observe(completion.rate_limits)
        if estimate is not None:
            self.throttle.used_tokens(estimate, usage.prompt_tokens, usage.completion_tokens)
        if self.throttle.concurrency is not None:
            self.throttle.concurrency.succeeded()
        if self.cache is not None and cache_key is not None:
            self.cache.put(cache_key, completion)  # before parsing: never paid twice
            if self.seen is not None:
                self.seen.add(cache_key)
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        if self.prices is None:
            self.stats.cost_usd = None
        elif self.stats.cost_usd is not None:
            self.stats.cost_usd += (usage.prompt_tokens * self.prices[0]
                                    + usage.completion_tokens * self.prices[1])
        return completion

    def _delay(self, err: CallError, attempt: int) -> float:
        if err.retry_after is not None:
            # The provider said when: every worker waits, not just this one (capped).
            wait = self.throttle.pause(err.retry_after, f"{err.kind}: Retry-After "
                                       f"{err.retry_after:g} s")
            return wait + random.uniform(0, 0.1 * max(wait, 0.1))
        return backoff_delay(attempt - 1)


def with_prefill(completion: Completion, prefill: str) -> Completion:
    """The whole answer to a request that ended with the assistant's opening words: the
    prefill and its continuation (as the record and the cache hold it)."""
    from dataclasses import replace

    def whole(text: str) -> str:  # a server that echoes the prefill: as it is
        return text if text.startswith(prefill) else prefill + text

    choices = tuple(replace(c, text=whole(c.text)) for c in completion.choices)
    return replace(completion, text=whole(completion.text), choices=choices)
