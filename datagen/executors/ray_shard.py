"""One attempt of one shard, on the worker Ray chose: take the shard's lease (the fence of
its files), make its job (the shard's items, its part files resumed, limits drawn from the
run's budget), run the engine, and report to the run's coordinator as it goes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from datagen.engine import RunInterrupted, execute
from datagen.engine.job import Job
from datagen.errors import DatagenError
from datagen.executors.local import close_job
from datagen.executors.ray_board import ShardDisplay
from datagen.lease import ShardLease, StaleAttempt
from datagen.llm.caller import CallStats
from datagen.llm.cluster import BudgetPort, ClusterEndpoints, ClusterLimits
from datagen.llm.throttle import limits_from
from datagen.redact import get_logger, redact
from datagen.runlog import RunLog
from datagen.shards import ShardRun

log = get_logger("datagen.pipeline")
REPORT_S = 0.5
MANIFEST_PARTS = ("counts", "steps", "calls", "tokens", "cost_usd", "timings", "dropped",
                  "callbacks")


async def attempt(make_shard: Any, shard: ShardRun, coordinator: Any, port: BudgetPort,
                  ray_attempt: int) -> dict[str, Any]:
    import ray as _ray

    ray: Any = _ray
    lease = ShardLease(shard.lease)
    epoch = await asyncio.to_thread(lease.take)  # waits for an append in progress
    await coordinator.begin.remote(shard.index, epoch, {
        "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(), "ray_attempt": ray_attempt})
    endpoints = ClusterEndpoints(port, f"{shard.index}/{epoch}")
    display = ShardDisplay()
    job: Job | None = None
    reporter: asyncio.Future[None] | None = None
    limits_from(endpoints)  # every caller this job makes draws from the run's budget
    try:
        job = make_shard(shard=shard, epoch=epoch, display=display, fence=lease.held)
        assert job is not None
        for caller in job.callers:
            limits = caller.throttle.limits
            if isinstance(limits, ClusterLimits) and caller.throttle.concurrency:
                limits.concurrency.append(caller.throttle.concurrency)
        await endpoints.start()
        reporter = asyncio.ensure_future(_report(coordinator, shard, epoch, display, job))
        outcome = await _run(job)
    except DatagenError as exc:  # could not even start (e.g. the rebuilt pipeline differs)
        outcome = {"status": "failed", "error": _error(exc)}
    finally:
        limits_from(None)
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        if job is not None:
            with contextlib.suppress(Exception):
                await coordinator.report.remote(shard.index, epoch,
                                                display.snapshot(_stats(job)))
        await endpoints.stop()
        if job is not None:
            await close_job(job)
        lease.release()
    await coordinator.end.remote(shard.index, epoch, outcome)
    return {"shard": shard.index, "attempt": epoch, **outcome}


async def _run(job: Job) -> dict[str, Any]:
    """The engine over the shard's items; how it ended, with its manifest's numbers."""
    try:
        with RunLog(job.files.log):
            done = await execute(job)
        return {"status": done.status, "manifest": _summary(done.manifest)}
    except RunInterrupted as stop:
        return {"status": "interrupted", "manifest": _summary(stop.result.manifest)}
    except StaleAttempt as exc:
        log.warning("%s", exc)
        return {"status": "stale", "error": _error(exc)}
    except DatagenError as exc:
        result = getattr(exc, "result", None)
        return {"status": "failed", "error": _error(exc), "fatal": True,
                "manifest": _summary(result.manifest) if result is not None else None}


def _error(exc: DatagenError) -> dict[str, str]:
    return {"kind": str(getattr(exc, "kind", type(exc).__name__)),
            "type": type(exc).__name__, "message": redact(str(exc))}


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in MANIFEST_PARTS}


def _stats(job: Job) -> CallStats:
    return CallStats.total([caller.stats for caller in job.callers])


async def _report(coordinator: Any, shard: ShardRun, epoch: int, display: ShardDisplay,
                  job: Job) -> None:
    """The attempt's counters to the coordinator, every REPORT_S."""
    while True:
        await asyncio.sleep(REPORT_S)
        try:
            await coordinator.report.remote(shard.index, epoch, display.snapshot(_stats(job)))
        except Exception:  # a report is a view; the next one may get through
            log.debug("reporting to the coordinator failed", exc_info=True)
