"""Samples that share one request: the N samples of one input at one step asked at once
with ``n=N`` (``model.samples_in_one_request``), the prompt sent and billed once.

A group is the samples of one input at one step: a step's own (``.step(...,
samples=N)``), which start together, or the copies ``run.samples`` hands out, which
arrive one by one on different workers, at the first step. The first sample to ask
sends the group's request (a task of its own, so that no sample's cancellation cancels
the others' answer), and each takes its choice of the answer. The group is kept until
every sample it expects has asked or given up (:meth:`SharedRequests.leave`), then
forgotten; when every sample waiting for it is cancelled (a second Ctrl+C), so is its
request. On resume, a group some of whose samples are done sends nothing: its answer
comes from the cache (stored whole, every choice), or its samples ask one by one.

A sample asks on its own (n=1, its own seed), exactly as without sharing, when the server
returned fewer choices than asked, when its choice had no text, for every retry after its
answer was rejected, and when the shared request failed in a way asking apart may not
(the server refused ``n``; an answer it could not read). A step whose server refused
``n``, or whose samples render different requests, asks apart for the rest of the run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion
from datagen.plan import StepRuntime
from datagen.pool import PoolItem, item_key
from datagen.redact import get_logger
from datagen.seen import KeyIndex

log = get_logger("datagen.engine")
# what a shared request may fail with that the samples' own requests may not
ASK_APART = frozenset({"bad_request", "malformed_response", "empty_response"})
MAX_CHOICES = 128  # OpenAI's largest n: more samples than that ask one by one


@dataclass
class Seat:
    """One sample's place in its group."""

    slot: str  # the group: the step, the key of what is sampled, its first sample's variant
    index: int  # which choice is this sample's
    size: int  # n: the samples of the input
    expected: int  # the samples that will ask (fewer on resume: the others are done)
    base_variant: int  # the first sample's variant (the group's seed)
    gone: bool = False  # asked or gave up


@dataclass
class _Group:
    pending: int  # samples still to ask or give up
    key: str | None = None  # the shared request's identity (its cache key)
    task: asyncio.Future[tuple[Completion, int]] | None = None
    found: Completion | None = None  # a partly done group's answer, from the cache
    waiting: int = 0


class SharedRequests:
    """The groups of one job."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._apart: set[str] = set()  # steps whose samples ask on their own from now on

    def __len__(self) -> int:
        return len(self._groups)

    def seat(self, step: StepRuntime, sampled_key: str, base_variant: int, index: int,
             size: int, expected: int) -> Seat | None:
        """The seat of sample ``index`` of ``size``, or None when it asks on its own."""
        if not 1 < size <= MAX_CHOICES or not step.shared or step.name in self._apart:
            return None
        return Seat(f"{step.name}|{sampled_key}|{base_variant}", index, size, expected,
                    base_variant)

    def copy_seat(self, step: StepRuntime, item: PoolItem, size: int, done: KeyIndex
                  ) -> Seat | None:
        """The seat of a copy that run.samples handed out, at the first step (None: not
        a copy, or the step makes samples of its own)."""
        if item.sample is None or step.samples > 1:
            return None
        expected = sum(item_key(item.content_key, item.occurrence, i) not in done
                       for i in range(size)) if done else size
        return self.seat(step, item_key(item.content_key, item.occurrence, None),
                         item.variant - item.sample, item.sample, size, expected)

    async def answer(self, step: StepRuntime, seat: Seat, request: ChatRequest, key: str
                     ) -> tuple[Completion, int] | None:
        """This sample's choice of the group's answer to ``request`` (identity ``key``)
        and the attempts it took (0: from the cache); None: ask on your own."""
        if seat.gone:
            return None
        group = self._join(seat)
        if group.key is None:  # the first to ask
            group.key = key
            if seat.expected == seat.size:
                group.task = asyncio.ensure_future(step.caller.call(request, key))
            else:  # resumed: only what the cache holds
                group.found = step.caller.cached(key)
        self.leave(seat)
        if key != group.key:
            self._ask_apart(step, "its samples render different requests")
            return None
        if group.task is not None:
            answered = await self._wait(step, group, group.task)
        else:
            answered = None if group.found is None else (group.found, 0)
        if answered is None:
            return None
        choice = answered[0].choice(seat.index)
        return None if choice is None else (choice, answered[1])

    def leave(self, seat: Seat) -> None:
        """The sample has asked, or will not (it failed or was dropped before, or the run
        stops): once every sample expected has, the group is forgotten."""
        if seat.gone:
            return
        seat.gone = True
        group = self._join(seat)
        group.pending -= 1
        if group.pending <= 0:
            del self._groups[seat.slot]

    def close(self) -> None:
        """The job is over: no request of a group outlives it."""
        for group in self._groups.values():
            if group.task is not None and not group.task.done():
                group.task.cancel()
        self._groups.clear()

    def _join(self, seat: Seat) -> _Group:
        group = self._groups.get(seat.slot)
        if group is None:
            group = self._groups[seat.slot] = _Group(pending=seat.expected)
        return group

    async def _wait(self, step: StepRuntime, group: _Group,
                    task: asyncio.Future[tuple[Completion, int]]
                    ) -> tuple[Completion, int] | None:
        if task.cancelled():
            return None
        group.waiting += 1
        try:
            return await asyncio.shield(task)
        except CallError as err:
            if err.kind not in ASK_APART:
                raise
            if err.kind == "bad_request":
                self._ask_apart(step, f"the server refused n ({err.message[:200]})")
            return None
        finally:
            group.waiting -= 1
            if group.waiting == 0 and not task.done():
                task.cancel()  # every sample waiting for it was cancelled

    def _ask_apart(self, step: StepRuntime, why: str) -> None:
        if step.name not in self._apart:
            self._apart.add(step.name)
            log.warning("step %s: %s; its samples ask one request each from now on "
                        "(model.samples_in_one_request: false skips the try)", step.name, why)
