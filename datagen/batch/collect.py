"""Collecting an ended batch: its results downloaded (streamed to disk), every line read
as the online parser reads an answer, and in one pass per thousand lines: each answer
kept in the ledger and the response cache, each request's outcome, and for each request
that came back unanswered the decision: sent again in the next round (an error a retry
can fix: ``model.max_retries`` times at most; an expired or failed batch: at least
``BATCH_LOSSES`` times; a cancel: always, on resume), or failed for good with the error
(a 4xx, or retries used up). Collecting again (after a crash half-way) gives the same
ledger: every write is keyed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datagen.batch.api import (
    CANCELLED,
    ERRORED,
    MISSING,
    SUCCEEDED,
    BatchAPI,
    BatchView,
    Result,
)  # fmt: skip
from datagen.batch.ledger import BatchLedger, BatchRow, RequestRow
from datagen.batch.target import BatchTarget
from datagen.costs import cost
from datagen.llm.cache import ResponseCache
from datagen.llm.caller import with_prefill
from datagen.llm.errors import CallError
from datagen.redact import get_logger

log = get_logger("datagen.batch")
LINES_PER_COMMIT = 1000
BATCH_LOSSES = 3  # an expired or failed batch's requests are sent again at least so often


@dataclass
class Usage:
    """Tokens of a batch's answers and what they cost, at the batch and the online price."""

    prompt: int = 0
    completion: int = 0
    cost: float | None = 0.0
    online_cost: float | None = 0.0

    def add(self, target: BatchTarget | None, prompt: int, completion: int) -> None:
        self.prompt += prompt
        self.completion += completion
        for name, prices in (("cost", target.prices if target else None),
                             ("online_cost", target.online_prices if target else None)):
            so_far = getattr(self, name)
            spent = cost(prices, prompt, completion)
            setattr(self, name, None if so_far is None or spent is None else so_far + spent)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "cost_usd": self.cost, "online_cost_usd": self.online_cost}


Collected = Callable[[BatchRow, Usage], None]


class Collector:
    """Collects ended batches into the ledger and the cache (see the module docstring)."""

    def __init__(self, ledger: BatchLedger, cache: ResponseCache | None, folder: Path,
                 targets: dict[str, BatchTarget], on_collected: Collected) -> None:
        self.ledger, self.cache, self.folder = ledger, cache, folder
        self.targets, self.on_collected = targets, on_collected

    async def collect(self, row: BatchRow, api: BatchAPI, view: BatchView | None) -> None:
        """Everything an ended batch holds, into the ledger; then ``collected``."""
        target = self.targets.get(row.step)
        retries = target.max_retries if target else 3
        latency = max(0.0, (row.ended_at or time.time()) - (row.created_at or time.time()))
        paths = await api.results(view, self.folder, f"batch-{row.seq}") if view else []
        usage, foreign = Usage(), 0
        for path in paths:
            batch: list[bytes] = []
            with open(path, "rb") as fh:
                for raw in fh:
                    if raw.strip():
                        batch.append(raw)
                    if len(batch) >= LINES_PER_COMMIT:
                        foreign += self._lines(row, api, batch, latency, retries, usage, target)
                        batch = []
            foreign += self._lines(row, api, batch, latency, retries, usage, target)
        why = row.error or f"the batch ended {row.status or 'without results'}"
        with self.ledger.transaction():
            for request in self.ledger.unresolved(row.seq):  # no line came back for it
                self._unanswered(request, MISSING, CallError(
                    "server_error", f"no result for this request ({why})"), retries)
        if foreign:
            log.warning("batch %s: %d result line(s) of requests it was not sent with were "
                        "ignored", row.batch_id, foreign)
        if self.cache is not None:
            self.cache.flush()
        tally = self.ledger.tally(row.seq)
        self.ledger.update(row.seq, state="collected", tally=tally, usage=usage.as_dict())
        self.on_collected(row, usage)
        for path in paths:
            path.unlink(missing_ok=True)
        log.info("batch %s (#%d, step %s) collected: %s", row.batch_id, row.seq, row.step,
                 ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))

    def _lines(self, row: BatchRow, api: BatchAPI, lines: list[bytes], latency: float,
               retries: int, usage: Usage, target: BatchTarget | None) -> int:
        """One transaction's worth of result lines; the number not of this batch."""
        foreign = 0
        with self.ledger.transaction():
            for raw in lines:
                result = api.read_line(raw, latency)
                request = self.ledger.request(result.custom_id)
                if request is None or request.seq != row.seq:
                    foreign += 1
                    continue
                self._result(request, result, retries, usage, target)
        return foreign

    def _result(self, request: RequestRow, result: Result, retries: int, usage: Usage,
                target: BatchTarget | None) -> None:
        if result.outcome == SUCCEEDED and result.completion is not None:
            completion = result.completion
            if request.prefill:  # as online: the record holds the prefill and what follows
                completion = with_prefill(completion, request.prefill)
            self.ledger.keep_answer(request.key, completion, request.custom_id)
            self.ledger.settle(request.custom_id, SUCCEEDED)
            if self.cache is not None:
                self.cache.put(request.key, completion)
            usage.add(target, completion.usage.prompt_tokens,
                      completion.usage.completion_tokens)
            return
        error = result.error or CallError(
            "timeout" if result.outcome != CANCELLED else "cancelled",
            "the batch expired before this request was answered"
            if result.outcome != CANCELLED else "the batch was cancelled")
        self._unanswered(request, result.outcome, error, retries)

    def _unanswered(self, request: RequestRow, outcome: str, error: CallError,
                    retries: int) -> None:
        """Sent again next round, or failed for good (the item fails with ``error``)."""
        self.ledger.settle(request.custom_id, outcome)
        if outcome == CANCELLED:
            return  # a cancel is not the request's fault: resumed, it is sent again
        tries = self.ledger.tries(request.key)
        if outcome != ERRORED:  # the batch, not the request, failed: sent again regardless
            retries = max(retries, BATCH_LOSSES)
        if error.retryable and tries <= retries:
            return
        if error.retryable:
            error = CallError(error.kind, f"{error.message} (sent in {tries} batches, "
                              "model.max_retries used up)", error.status)
        error.attempts = tries
        self.ledger.keep_error(request.key, error, request.custom_id)
