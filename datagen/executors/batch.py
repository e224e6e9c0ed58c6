"""Batch mode: the engine in rounds around the provider's batch API.

Each round runs the unchanged engine over the whole pool, as a resume would: items
finished in an earlier round (or an earlier run) are skipped; steps answered before
replay from the ledger or the cache for free; a batch step's request not answered yet
goes into this round's request files and its item waits (``Deferred``). When a round has
deferred anything, its batches are taken to the provider and polled until every one has
ended and is collected (``datagen.batch.flow``), and the next round begins; a round that
defers nothing ends the run. Validation retries and fan-out children land in later rounds
by themselves; online steps run as they always do, their answers replayed from the cache.

Ctrl+C or SIGTERM while waiting stops the wait (the batches keep running at the provider;
``--resume`` collects them); ``datagen cancel`` stops it the same way.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from datagen.batch.api import BatchAPI, make_api
from datagen.batch.collect import Collector, Usage
from datagen.batch.flow import BatchFlow
from datagen.batch.ledger import BatchLedger, BatchRow
from datagen.batch.summary import section
from datagen.batch.target import BatchPlan, BatchTarget
from datagen.engine import EngineRun
from datagen.engine.job import Job
from datagen.engine.workers import on_stop_signals
from datagen.errors import DatagenError
from datagen.executors.batch_round import BatchCollector, Finished, failures_on_file
from datagen.llm.caller import CallStats
from datagen.redact import get_logger
from datagen.result import RunResult
from datagen.seen import KeyIndex

log = get_logger("datagen.batch")
MAX_ROUNDS = 1000  # each round answers at least one step of every waiting item


class RoundsError(DatagenError):
    kind = "batch_rounds"


async def run_batch(job: Job) -> RunResult:
    """Run a job whose steps include batch steps (see the module docstring)."""
    plan = job.batch_plan
    assert plan is not None
    ledger = BatchLedger(job.files.batches)
    apis = _apis(plan)
    try:
        return await BatchRun(job, plan, ledger, apis).run()
    finally:
        for api in {id(a): a for a in apis.values()}.values():
            await api.aclose()
        ledger.close()


def _apis(plan: BatchPlan) -> dict[str, BatchAPI]:
    """One client per target (steps on one model share it)."""
    made: dict[tuple[str, str, str, str], BatchAPI] = {}
    apis = {}
    for step, target in plan.targets.items():
        same = (target.api, target.base_url, target.key() or "", repr(sorted(
            target.headers.items())))
        if same not in made:
            made[same] = make_api(target)
        apis[step] = made[same]
    return apis


class BatchRun:
    def __init__(self, job: Job, plan: BatchPlan, ledger: BatchLedger,
                 apis: dict[str, BatchAPI]) -> None:
        self.job, self.plan, self.ledger, self.apis = job, plan, ledger, apis
        folder = job.files.batch_dir
        self.started = time.time()
        self.engine = EngineRun(job, rounds=True)
        self.collector = BatchCollector(job, ledger, apis, plan.targets, folder)
        self.flow = BatchFlow(ledger, self._api_for,
                              Collector(ledger, job.cache, folder, plan.targets,
                                        self._collected),
                              plan.settings, folder, self._notify, self._cancelled)
        self._note = ""

    async def run(self) -> RunResult:
        job = self.job
        for caller in job.callers:  # rounds replay answers: every caller looks them up
            caller.lookup, caller.seen = True, KeyIndex()
        if not job.source.pool.reiterable:  # a generator: written out, to be read again
            job.source = await job.source.spill(job.files.pool_copy)
            job.total = (job.source.pool.total or 0) * job.source.samples
        job.batch = self.collector
        self.engine.recorder.failed_before = failures_on_file(job.files.failures)
        self.flow.recover()
        self.engine.begin()
        failure: DatagenError | None = None
        try:
            await self.flow.tidy()
            failure = await self._rounds()
        except DatagenError as exc:
            failure = exc
        except BaseException as exc:  # a bug, or cancelled: the files stay valid
            self.engine.recorder.extra["batches"] = self.section()
            self.engine.abandon(exc)
            raise
        self.engine.recorder.extra["batches"] = self.section()
        log.info("batch mode: waited %.1f s for the provider", self.flow.waited_s)
        return self.engine.end(failure)

    async def _rounds(self) -> DatagenError | None:
        job, counts = self.job, self.engine.recorder.counts
        first, finished, skipped = job.source, Finished(job), 0
        for number in range(1, MAX_ROUNDS + 1):
            job.source = first if number == 1 else first.reopen()
            self.collector.new_round(waiting=bool(self.flow.open_batches()))
            counts.deferred = 0
            failure = await self.engine.one_pass()
            if number == 1:
                skipped = counts.skipped  # done before this run; later skips are rounds'
            counts.skipped = skipped
            finished.absorb()
            prepared = self.collector.finish_round()
            log.info("round %d: %d items written, %d waiting for batches; %d requests in "
                     "%d new batch(es)", number, counts.finished, counts.deferred,
                     self.collector.files.requests, len(prepared))
            self.engine.recorder.extra["batches"] = self.section()
            self.engine.recorder.write_manifest("running", None)
            if failure is not None or self.engine.interrupts or not counts.deferred:
                return failure
            if not self.flow.open_batches():
                return RoundsError(f"round {number}: {counts.deferred} items wait for "
                                   "answers, but no batch is open to give them")
            if await self._between():
                return None
        return RoundsError(f"batch mode ended after {MAX_ROUNDS} rounds with items still "
                           "waiting")

    async def _between(self) -> bool:
        """Submit this round's batches and wait for every open one; True when the run
        is to stop (a signal, or ``datagen cancel``)."""
        stop = asyncio.Event()
        restore = self._signals(stop)
        try:
            await self.flow.submit()
            if self._cancelled():
                done = False
            else:
                done = await self.flow.wait(stop)
        finally:
            restore()
        if done:
            return False
        if not stop.is_set():
            await self.flow.cancel_open()
            self.engine.stop_error = {
                "kind": "cancelled", "message": "the run's batches were cancelled "
                "(datagen cancel); datagen run --resume sends what is missing again"}
        return True

    def _signals(self, stop: asyncio.Event) -> Callable[[], None]:
        def on_signal(sig: int) -> None:
            self.engine.interrupts += 1
            self.engine.signal = sig
            log.warning("%s: no longer waiting for the batches (they keep running at the "
                        "provider; --resume collects them)", signal.Signals(sig).name)
            stop.set()

        return on_stop_signals(on_signal)

    # ---- hooks of the flow ---------------------------------------------------------------

    def _api_for(self, row: BatchRow) -> BatchAPI:
        api = self.apis.get(row.step)
        if api is not None:
            return api
        # a batch of a step this pipeline no longer has (resumed after an edit)
        described: dict[str, Any] = row.target or {}
        target = BatchTarget(api=described.get("api", row.api), base_url=described.get(
            "base_url", ""), key_env=described.get("key_env", ""), model=row.model,
            max_retries=3, max_requests=1, max_bytes=1, prices=None, online_prices=None,
            price_source="unknown")
        api = self.apis[row.step] = make_api(target)
        return api

    def _collected(self, row: BatchRow, usage: Usage) -> None:
        """A batch's answers paid for: its tokens and cost in this run's counters."""
        step = self.collector.steps.get(row.step)
        stats = step.caller.stats if step is not None else CallStats()
        stats.prompt_tokens += usage.prompt
        stats.completion_tokens += usage.completion
        if usage.cost is None or stats.cost_usd is None:
            stats.cost_usd = None
        else:
            stats.cost_usd += usage.cost

    def _notify(self, text: str) -> None:
        counts, display = self.engine.recorder.counts, self.job.display
        display.update(counts.succeeded, counts.failed + counts.dropped)
        display.note(text)
        if text and text != self._note:
            log.info("%s", text)
        self._note = text

    def _cancelled(self) -> bool:
        when = self.ledger.meta("cancel_requested_at")
        return when is not None and float(when) >= self.started

    def section(self) -> dict[str, Any]:
        c = self.engine.recorder.counts
        stats = CallStats.total([caller.stats for caller in self.job.callers])
        run = {"records": c.succeeded, "in_file": self.job.resumed + c.succeeded,
               "validation_retries": dict(c.validation_retries),
               "failed_by_step": dict(c.failed_by_step),
               "dropped_by_step": dict(c.dropped_by_step), "cache_hits": stats.cache_hits,
               "waiting": c.deferred, "failed_again": c.failed_again}
        prices = {step: t.price_source for step, t in self.plan.targets.items()}
        summary = section(self.ledger, run, prices)
        summary["waited_s"] = round(self.flow.waited_s, 3)
        return summary
