"""A worker's side of a cluster's budget: :class:`ClusterLimits`, the limits of one
endpoint for the engine of one shard, drawn from the run's budget actor (its logic is
:mod:`datagen.llm.clusterbudget`) instead of this process's own.

- Send slots are leased a few at a time (as many as requests wait, up to a slice) and
  used at their moment, converted to this machine's clock by an offset estimated on every
  reply (the reply with the shortest round trip of the last seconds: ~0.1-1 ms); a slot
  that cannot be used within ``LATE_S`` of its moment is given up, a request the transport
  wrote late moves its slot, and the first request of an attempt goes alone until it is
  written (a new connection, imports).
- Tokens are taken per request before its slot, and settled after the response.
- 429s, successes and Retry-After pauses are reported every ``SYNC_S``; every reply
  carries the cluster's pause and concurrency limit, which this shard applies (its share).

The budget is reached through a :class:`BudgetPort` (the Ray adapter in
``datagen.executors.ray_runtime``), so nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from typing import Any, Protocol

from datagen.llm.clusterbudget import LATE_S
from datagen.llm.ratewindow import Send
from datagen.llm.throttle import AdaptiveConcurrency, EndpointLimits, Estimate, RateSpec
from datagen.redact import get_logger

log = get_logger("datagen.llm")
SYNC_S = 0.1
SLICE_MAX = 16


class BudgetPort(Protocol):
    async def join(self, key: str, spec: dict[str, Any], who: str, maximum: int
                   ) -> dict[str, Any]: ...

    async def lease(self, key: str, n: int, probe: bool
                    ) -> tuple[list[float], dict[str, Any]]: ...

    async def tokens(self, key: str, amounts: dict[str, float]) -> float: ...

    async def settle(self, key: str, report: dict[str, Any]) -> dict[str, Any]: ...

    def moved(self, key: str, at: float, to: float) -> None: ...

    def leave(self, key: str, who: str) -> None: ...


class ClockOffset:
    """The budget's clock minus this one, from the replies with the shortest round trip."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=64)

    def add(self, remote: float, sent: float, received: float) -> None:
        self._samples.append((received, remote - (sent + received) / 2, received - sent))

    def local(self, remote: float) -> float:
        now = time.monotonic()
        recent = [s for s in self._samples if now - s[0] < 10.0] or list(self._samples)
        return remote - min(recent, key=lambda s: s[2])[1]


class ClusterSend(Send):
    """A send on a leased slot: reports a late write (or the probe's write) to the budget."""

    __slots__ = ("deadline", "limits", "probe", "slot")

    def __init__(self, at: float, deadline: float, slot: float, probe: bool,
                 limits: ClusterLimits) -> None:
        super().__init__(at)
        self.deadline, self.slot, self.probe, self.limits = deadline, slot, probe, limits

    def sent(self, at: float) -> None:
        super().sent(at)
        late = at - self.deadline
        if self.probe or late > 0.005:
            self.limits.port.moved(self.limits.key, self.slot, self.slot + max(0.0, late))
            self.probe = False


class ClusterLimits(EndpointLimits):
    """One endpoint's limits, drawn from the cluster's budget (see the module docstring)."""

    def __init__(self, key: str, spec: RateSpec, name: str, port: BudgetPort, who: str
                 ) -> None:
        super().__init__(name, spec, probe=False)  # its window and budgets: flags only
        self.key, self.port, self.who = key, port, who
        self.offset = ClockOffset()
        self.concurrency: list[AdaptiveConcurrency] = []
        self._slots: deque[tuple[float, float, bool]] = deque()  # (deadline, slot, probe)
        self._leasing: asyncio.Future[None] | None = None
        self._waiting = 0
        self._cold = True
        self._report: dict[str, Any] = {"tokens": Counter(), "done": 0, "limited": 0}
        self._sync: asyncio.Future[None] | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._share: int | None = None
        self.slice = max(1, min(SLICE_MAX, self.window.count // 8)) if self.window else 1

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        maximum = sum(c.maximum for c in self.concurrency) or 1
        t0 = time.monotonic()
        state = await self.port.join(self.key, dataclasses.asdict(self.spec), self.who,
                                     maximum)
        self._apply(state, t0, time.monotonic())
        self._sync = asyncio.ensure_future(self._sync_loop())

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
        try:
            await self._flush()
        finally:
            self.port.leave(self.key, self.who)

    # ---- what the throttle asks ------------------------------------------------------

    def free_now(self) -> bool:
        return False  # every attempt asks the cluster's budget (wait_turn)

    async def wait_turn(self, estimate: Estimate | None = None) -> Send | None:
        if estimate is not None and self.tokens:
            wait = await self.port.tokens(self.key, {"total": estimate.total,
                                                     "input": estimate.prompt,
                                                     "output": estimate.completion})
            if wait > 0:
                await asyncio.sleep(wait)
        while True:
            while (remaining := self.paused_for()) > 0:
                await asyncio.sleep(remaining)
            if self.window is None:
                return None
            deadline, slot, probe = await self._take_slot()
            now = time.monotonic()
            if deadline > now:
                await asyncio.sleep(deadline - now)
                now = time.monotonic()
            if now - deadline <= LATE_S and self.paused_for() <= 0:
                return ClusterSend(now, deadline, slot, probe, self)
            self._give_up(slot, probe)  # woken late, or a pause began: not on this slot

    def done(self, send: Send | None) -> None:
        self._report["done"] += 1
        if isinstance(send, ClusterSend) and send.probe and not send.written:
            send.sent(time.monotonic())  # a transport that cannot say when it wrote

    def rate_limited(self) -> None:
        self._report["limited"] += 1

    def pause(self, seconds: float, reason: str) -> float:
        taken = super().pause(seconds, reason)
        self._report["pause"] = (taken, reason)
        self._flushing = asyncio.ensure_future(self._flush())  # every worker, at once
        return taken

    def used(self, estimate: Estimate, prompt: int, completion: int) -> None:
        actual = {"total": prompt + completion, "input": prompt, "output": completion}
        guess = {"total": estimate.total, "input": estimate.prompt,
                 "output": estimate.completion}
        for kind in self.tokens:
            self._report["tokens"][kind] += guess[kind] - (actual[kind] or guess[kind])

    def reconfigure(self, spec: RateSpec) -> None:
        return None  # a cluster run's limits are the driver's config, fixed for the run

    # ---- slots -----------------------------------------------------------------------

    async def _take_slot(self) -> tuple[float, float, bool]:
        self._waiting += 1
        try:
            while True:
                now = time.monotonic()
                while self._slots and now - self._slots[0][0] > LATE_S:
                    _, slot, probe = self._slots.popleft()
                    self._give_up(slot, probe)
                if self._slots:
                    return self._slots.popleft()
                if self._leasing is None:
                    self._leasing = asyncio.ensure_future(self._lease())
                await asyncio.shield(self._leasing)
        finally:
            self._waiting -= 1

    async def _lease(self) -> None:
        try:
            probe = self._cold
            t0 = time.monotonic()
            slots, state = await self.port.lease(self.key, min(self._waiting, self.slice),
                                                 probe)
            self._apply(state, t0, time.monotonic())
            if not slots:  # paused, held for another's first request, or all granted
                await asyncio.sleep(min(0.05, max(0.002, state["pause"], state["held"],
                                                  state["next"])))
                return
            self._cold = self._cold and not probe
            self._slots.extend((self.offset.local(at), at, probe) for at in slots)
        finally:
            self._leasing = None

    def _give_up(self, slot: float, probe: bool) -> None:
        if probe:  # release the hold the probe put on everyone else
            self.port.moved(self.key, slot, slot)
            self._cold = True

    # ---- reports ---------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self._flush()
            except Exception:  # the next sync tries again; a dead budget fails the leases
                log.debug("cluster budget sync failed", exc_info=True)

    async def _flush(self) -> None:
        report, self._report = self._report, {"tokens": Counter(), "done": 0, "limited": 0}
        report["succeeded"] = max(0, report.pop("done") - report["limited"])
        report["tokens"] = dict(report["tokens"])
        t0 = time.monotonic()
        state = await self.port.settle(self.key, report)
        self._apply(state, t0, time.monotonic())

    def _apply(self, state: dict[str, Any], sent: float, received: float) -> None:
        self.offset.add(state["now"], sent, received)
        if state["pause"] > 0:
            until = received + state["pause"]
            if until > self.paused_until:
                self.paused_until, self.pause_reason = until, state["reason"]
        limit, maximum = state["limit"], state["maximum"]
        for c in self.concurrency:
            share = max(1, limit * c.maximum // maximum) if maximum else c.maximum
            if share != self._share:
                c.set_limit(share)
        if self.concurrency and maximum:
            self._share = max(1, limit * self.concurrency[0].maximum // maximum)


class ClusterEndpoints:
    """The limits source of one shard attempt (see ``throttle.limits_from``): one
    ClusterLimits per endpoint, all drawing from the run's budget."""

    def __init__(self, port: BudgetPort, who: str) -> None:
        self.port, self.who = port, who
        self.limits: dict[str, ClusterLimits] = {}

    def __call__(self, key: str, spec: RateSpec, name: str) -> EndpointLimits:
        if key not in self.limits:
            self.limits[key] = ClusterLimits(key, spec, name, self.port, self.who)
        return self.limits[key]

    async def start(self) -> None:
        for limits in self.limits.values():
            await limits.start()

    async def stop(self) -> None:
        for limits in self.limits.values():
            try:
                await limits.stop()
            except Exception:  # the run's own outcome matters more than a last report
                log.debug("leaving the cluster budget failed", exc_info=True)
