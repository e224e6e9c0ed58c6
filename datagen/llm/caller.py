"""One call with everything around it: wait for a turn, send, retry what can be retried."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from datagen.llm.errors import CallError
from datagen.llm.throttle import Throttle
from datagen.llm.types import ChatRequest, Completion

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

    async def call(self, request: ChatRequest) -> tuple[Completion, int]:
        """Send ``request``; returns the completion and the number of attempts made.

        Raises the last :class:`CallError` when it cannot be retried or retries ran out.
        """
        attempt = 0
        while True:
            attempt += 1
            await self.throttle.wait_turn()
            self.stats.requests += 1
            try:
                completion = await self.transport.complete(request)
            except CallError as err:
                self.stats.errors_by_kind[err.kind] += 1
                if err.kind == "rate_limit":
                    self.stats.rate_limited += 1
                if not err.retryable or attempt > self.max_retries:
                    err.attempts = attempt
                    raise
                delay = self._delay(err, attempt)
                self.stats.retries += 1
                log.info("retry %d/%d in %.2fs after %s: %s", attempt, self.max_retries,
                         delay, err.kind, err.message[:200])
                await asyncio.sleep(delay)
                continue
            self.stats.prompt_tokens += completion.usage.prompt_tokens
            self.stats.completion_tokens += completion.usage.completion_tokens
            return completion, attempt

    def _delay(self, err: CallError, attempt: int) -> float:
        if err.retry_after is not None:
            # The provider said when: every worker waits, not just this one.
            self.throttle.pause(err.retry_after)
            return err.retry_after + random.uniform(0, 0.1 * max(err.retry_after, 0.1))
        return backoff_delay(attempt - 1)
