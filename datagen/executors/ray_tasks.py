"""The driver's shard tasks: launched, relaunched when an attempt was fenced (``stale``)
or lost on a node that Ray declared dead but never ran again, cancelled on Ctrl+C,
SIGTERM or a fatal error."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

from datagen.engine.workers import on_stop_signals
from datagen.executors import ray_runtime as rt
from datagen.executors.ray_plan import ShardPlan
from datagen.redact import get_logger

log = get_logger("datagen.pipeline")
STALE_RELAUNCHES = 3
# An attempt whose node was declared dead but that Ray neither failed nor ran again: a
# node cut off (or frozen) rather than crashed keeps its task's reference pending for
# ever (measured: 40 s and counting, ray.cancel or not). After this long the driver
# gives it up and runs the shard again itself; the lease fences the old attempt.
ABANDON_S = 5.0


class ShardTasks:
    def __init__(self, plan: ShardPlan, executor: Any, shipped: Any, coordinator: Any
                 ) -> None:
        self.plan, self.ex = plan, executor
        self.shipped, self.coordinator = shipped, coordinator
        self.pending: dict[Any, int] = {}  # task reference -> shard
        self.relaunched: dict[int, int] = {}
        self.dead_since: dict[int, float] = {}
        self.abandoned: list[dict[str, Any]] = []
        self.interrupts = 0
        self.signal: int | None = None
        self.shutdown_timeout = 30.0

    def launch(self, shard: int) -> None:
        ref = rt.launch(self.shipped, self.plan.run_of(shard), self.coordinator,
                        self.ex.num_cpus, self.ex.max_retries)
        self.pending[ref] = shard

    def ready(self) -> list[tuple[Any, int]]:
        ready, _ = rt.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        return [(ref, self.pending.pop(ref)) for ref in ready]

    def stale(self, shard: int) -> None:
        """A newer attempt took the shard's files from the one Ray knows: run it again
        (a few times) so the run does not end before the shard does."""
        if not self.interrupts and self.relaunched.get(shard, 0) < STALE_RELAUNCHES:
            self.relaunched[shard] = self.relaunched.get(shard, 0) + 1
            self.launch(shard)

    def abandon_lost(self, attempts: list[dict[str, Any]]) -> None:
        """Run a shard again when its attempt's node is dead and Ray does nothing."""
        if not self.pending or self.interrupts:
            return
        latest: dict[int, dict[str, Any]] = {}
        for entry in attempts:
            shard = entry["shard"]
            if shard not in latest or entry["attempt"] > latest[shard]["attempt"]:
                latest[shard] = entry
        alive, now = rt.alive_nodes(), time.monotonic()
        for ref, shard in list(self.pending.items()):
            a = latest.get(shard)
            if a is None or a["outcome"] is not None or a.get("node_id") in alive:
                self.dead_since.pop(shard, None)
                continue
            if now - self.dead_since.setdefault(shard, now) < ABANDON_S:
                continue
            log.warning("shard %d: attempt %d on node %s, declared dead, was neither ended "
                        "nor run again by Ray in %.0f s: running the shard again", shard,
                        a["attempt"], a.get("node"), ABANDON_S)
            with contextlib.suppress(Exception):
                rt.ray.cancel(ref, force=True)
            del self.pending[ref]
            self.dead_since.pop(shard)
            self.abandoned.append({"shard": shard, "attempt": a["attempt"],
                                   "node": a.get("node")})
            self.launch(shard)

    def cancel(self, force: bool) -> None:
        for ref in list(self.pending):
            try:
                rt.ray.cancel(ref, force=force)
            except Exception:  # already finished, or its worker is gone
                log.debug("cancelling a shard failed", exc_info=True)

    # ---- signals ---------------------------------------------------------------------

    def install_signals(self) -> Callable[[], None]:
        return on_stop_signals(self._on_signal)

    def _on_signal(self, sig: int) -> None:
        self.interrupts += 1
        self.signal = sig
        log.warning("%s: stopping the shards (the files stay valid; resume continues)",
                    signal.Signals(sig).name)
        self.cancel(force=self.interrupts > 1)
        if self.interrupts == 1:
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self.cancel, True)
