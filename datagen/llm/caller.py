"""One call with everything around it: wait for a turn, send, retry what can be retried."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from datagen.llm.errors import CallError
from datagen.llm.throttle import Throttle
from datagen.llm.types import ChatRequest, Completion

if TYPE_CHECKING:
    from datagen.cache import ResponseCache

log = logging.getLogger("datagen.llm")
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class Transport(Protocol):
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
            out.requests += s.requests
            out.retries += s.retries
            out.rate_limited += s.rate_limited
            out.errors_by_kind.update(s.errors_by_kind)
            out.prompt_tokens += s.prompt_tokens
            out.completion_tokens += s.completion_tokens
            out.cache_hits += s.cache_hits
            out.cache_misses += s.cache_misses
            out.cost_usd = (None if out.cost_usd is None or s.cost_usd is None
                            else out.cost_usd + s.cost_usd)
        return out


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens a request may use, before it is sent: prompt characters / 4 + the budget."""
    prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4
    budget = request.params.get("max_tokens") or request.params.get("max_completion_tokens")
    return prompt + 4 * len(request.messages) + int(budget or 256)


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

    async def call(self, request: ChatRequest, cache_key: str | None = None
                   ) -> tuple[Completion, int]:
        """Send ``request``; returns the completion and the number of attempts made
        (0: answered from the cache, nothing sent).

        Raises the last :class:`CallError` when it cannot be retried or retries ran out.
        """
        if self.cache is not None and cache_key is not None:
            hit = self.cache.get(cache_key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit, 0
            self.stats.cache_misses += 1
        estimate = estimate_tokens(request) if self.throttle.counts_tokens else 0
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.throttle.slot(estimate):
                    self.stats.requests += 1
                    completion = await self.transport.complete(request)
            except CallError as err:
                self.stats.errors_by_kind[err.kind] += 1
                if err.kind == "rate_limit":
                    self.stats.rate_limited += 1
                    self.throttle.rate_limited()
                if not err.retryable or attempt > self.max_retries:
                    err.attempts = attempt
                    raise
                delay = self._delay(err, attempt)
                self.stats.retries += 1
                log.info("retry %d/%d in %.2fs after %s: %s", attempt, self.max_retries,
                         delay, err.kind, err.message[:200])
                await asyncio.sleep(delay)
                continue
            self.throttle.used_tokens(estimate, completion.usage.total_tokens or estimate)
            if self.throttle.concurrency is not None:
                self.throttle.concurrency.succeeded()
            if self.cache is not None and cache_key is not None:
                self.cache.put(cache_key, completion)  # before parsing: never paid twice
            self.stats.prompt_tokens += completion.usage.prompt_tokens
            self.stats.completion_tokens += completion.usage.completion_tokens
            if self.prices is None:
                self.stats.cost_usd = None
            elif self.stats.cost_usd is not None:
                self.stats.cost_usd += (completion.usage.prompt_tokens * self.prices[0]
                                        + completion.usage.completion_tokens * self.prices[1])
            return completion, attempt

    def _delay(self, err: CallError, attempt: int) -> float:
        if err.retry_after is not None:
            # The provider said when: every worker waits, not just this one.
            self.throttle.pause(err.retry_after)
            return err.retry_after + random.uniform(0, 0.1 * max(err.retry_after, 0.1))
        return backoff_delay(attempt - 1)
