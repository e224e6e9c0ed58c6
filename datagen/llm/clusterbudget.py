"""The budget of a cluster's endpoints, kept in one place (a named actor of the run, see
``datagen.executors.ray_runtime``): the send slots, the token budgets, the pause a 429
imposes, and the cluster-wide adaptive concurrency. Plain Python, one clock (the actor's
``time.monotonic``); the workers' side is :mod:`datagen.llm.cluster`.

Send slots: a worker leases a few slots at a time, each a moment at which it may send one
request. Slots are granted exactly as one process's :class:`RateWindow` reserves them: any
``count + 1`` consecutive ones span the window plus a margin, and they are evenly paced,
so the provider never sees more than ``count`` requests in one second whatever the number
of workers. A worker sends on a slot or gives it up (it never sends late by more than a
few milliseconds), and reports a send that went out late, which moves that slot later
(the slots after it keep the bound from where it really went).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from datagen.llm.ratewindow import RateWindow, TokenBudget

# A cluster's grants travel to workers on other machines: their clock offsets are
# estimated to ~0.1-1 ms, a slot may be used up to LATE_S after its moment, a send later
# than that is reported and moves its slot, and the nodes' paths to the provider differ.
# The margin covers those on top of the transport's own jitter (SEND_JITTER_MARGIN_S):
# it costs count x margin of the rate (the two together: 0.1 s, ~9% at the cap). Measured
# on a 2-core box running a 3-node cluster and other jobs: the senders' own windows never
# passed the cap, while a server starved of CPU stamped arrivals up to 124 ms late.
CLUSTER_MARGIN_S = 0.07
LATE_S = 0.015
PROBE_HOLD_S = 2.0
# Slots are granted at most this far ahead: however many workers lease, none holds the
# future, and a send reported late (up to ~window - horizon) moves its slot before the
# slots it must keep its distance from are granted.
HORIZON_S = 0.25


class SlotLog:
    """The send slots of one endpoint (see the module docstring)."""

    def __init__(self, count: int, window: float, spacing: float, margin: float) -> None:
        self.count, self.window, self.spacing, self.margin = count, window, spacing, margin
        self._slots: deque[float] = deque(maxlen=count)
        self.held_until = 0.0  # a process's first request goes alone until it is written
        self._probe: float | None = None

    @classmethod
    def for_rate(cls, per_second: float, margin: float) -> SlotLog:
        w = RateWindow.for_rate(per_second, margin)
        return cls(w.count, w.window, w.spacing, margin)

    def held_for(self, now: float) -> float:
        return max(0.0, self.held_until - now) if self._probe is not None else 0.0

    def next_free(self, now: float) -> float:
        at = now
        if self._slots:
            at = max(at, self._slots[-1] + self.spacing)
        if len(self._slots) == self.count:
            at = max(at, self._slots[0] + self.window + self.margin)
        return at

    def grant(self, now: float, n: int, probe: bool = False) -> list[float]:
        """Up to ``n`` slots (one for a probe), none further than HORIZON_S ahead."""
        out: list[float] = []
        while len(out) < (1 if probe else n):
            at = self.next_free(now)
            if at > now + HORIZON_S:
                break
            self._slots.append(at)
            out.append(at)
        if probe and out:
            self._probe, self.held_until = out[0], now + PROBE_HOLD_S
        return out

    def move(self, at: float, to: float) -> None:
        """The request of slot ``at`` went out at ``to`` (later): the slots granted
        ``count`` after it count from there."""
        for i, slot in enumerate(self._slots):
            if slot == at:
                self._slots[i] = max(slot, to)
                break
        if self._probe is not None and self._probe == at:
            self._probe = None


@dataclass
class Concurrency:
    """AIMD for the whole cluster, as one run's AdaptiveConcurrency does it: a 429 anywhere
    halves the cluster's limit, each ``limit`` successes add one back; each shard runs its
    share (its own maximum x limit / the maximum of all shards)."""

    shards: dict[str, int] = field(default_factory=dict)  # attempt -> its maximum
    limit: int = 0
    successes: int = 0
    lowest: int | None = None  # the lowest limit a 429 brought it to

    @property
    def maximum(self) -> int:
        return sum(self.shards.values())

    def join(self, who: str, maximum: int) -> None:
        was = self.maximum
        self.shards[who] = maximum
        self.limit = self.maximum if self.limit >= was else self.limit + maximum

    def leave(self, who: str) -> None:
        gone = self.shards.pop(who, 0)
        self.limit = max(len(self.shards), min(self.limit, self.maximum)) if gone else \
            self.limit

    def rate_limited(self, times: int) -> None:
        for _ in range(times):
            self.limit = max(max(1, len(self.shards)), self.limit // 2)
        if times:
            self.successes = 0
            self.lowest = min(self.limit, self.lowest or self.limit)

    def succeeded(self, times: int) -> None:
        self.successes += times
        while self.limit < self.maximum and self.successes >= self.limit > 0:
            self.successes -= self.limit
            self.limit += 1


class EndpointBudget:
    """One endpoint's budget for the whole cluster."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        rates = [r for r in (spec.get("requests_per_second"),
                             (spec.get("requests_per_minute") or 0) / 60 or None) if r]
        margin = float(spec.get("margin") or 0.0) + CLUSTER_MARGIN_S
        self.slots = SlotLog.for_rate(min(rates), margin) if rates else None
        self.tokens = {kind: TokenBudget(per_minute) for kind, per_minute in (
            ("total", spec.get("tokens_per_minute")),
            ("input", spec.get("input_tokens_per_minute")),
            ("output", spec.get("output_tokens_per_minute"))) if per_minute}
        self.paused_until = 0.0
        self.pause_reason = ""
        self.concurrency = Concurrency()
        self.granted = 0

    def take_tokens(self, amounts: dict[str, float]) -> float:
        return max([self.tokens[k].take(v) for k, v in amounts.items() if k in self.tokens]
                   or [0.0])

    def settle(self, now: float, report: dict[str, Any]) -> None:
        for kind, delta in (report.get("tokens") or {}).items():
            if kind in self.tokens:
                self.tokens[kind].adjust(delta)
        self.concurrency.rate_limited(int(report.get("limited", 0)))
        self.concurrency.succeeded(int(report.get("succeeded", 0)))
        pause = report.get("pause")
        if pause:
            seconds, reason = pause
            if now + seconds > self.paused_until:
                self.paused_until, self.pause_reason = now + seconds, reason

    def state(self, now: float) -> dict[str, Any]:
        c = self.concurrency
        return {"now": now, "pause": max(0.0, self.paused_until - now),
                "reason": self.pause_reason, "limit": c.limit, "maximum": c.maximum,
                "held": self.slots.held_for(now) if self.slots is not None else 0.0,
                "next": max(0.0, self.slots.next_free(now) - now - HORIZON_S)
                if self.slots is not None else 0.0}


class ClusterBudget:
    """Every endpoint's budget, by endpoint key (see :func:`datagen.llm.throttle.endpoint_key`)."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointBudget] = {}

    def join(self, key: str, spec: dict[str, Any], who: str, maximum: int) -> dict[str, Any]:
        budget = self.endpoints.get(key)
        if budget is None:
            budget = self.endpoints[key] = EndpointBudget(spec)
        budget.concurrency.join(who, maximum)
        return budget.state(time.monotonic())

    def leave(self, key: str, who: str) -> None:
        if key in self.endpoints:
            self.endpoints[key].concurrency.leave(who)

    def lease(self, key: str, n: int, probe: bool) -> tuple[list[float], dict[str, Any]]:
        """Up to ``n`` slots (a probe: one, holding the others back until it is written);
        none while the endpoint is paused or held for a probe (ask again after a moment)."""
        budget, now = self.endpoints[key], time.monotonic()
        slots: list[float] = []
        if budget.slots is not None and now >= budget.paused_until and \
                not budget.slots.held_for(now):
            slots = budget.slots.grant(now, n, probe)
            budget.granted += len(slots)
        return slots, budget.state(now)

    def moved(self, key: str, at: float, to: float) -> None:
        budget = self.endpoints[key]
        if budget.slots is not None:
            budget.slots.move(at, to)

    def tokens(self, key: str, amounts: dict[str, float]) -> float:
        return self.endpoints[key].take_tokens(amounts)

    def settle(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        budget, now = self.endpoints[key], time.monotonic()
        budget.settle(now, report)
        return budget.state(now)

    def summary(self) -> dict[str, Any]:
        return {key: {"send_slots_granted": b.granted,
                      "lowest_concurrency_after_429": b.concurrency.lowest}
                for key, b in self.endpoints.items()}
