"""The local executor: the engine in this process, with the run's log file around it and
every resource of the job released at the end (the transports' connections, the cache,
the run lock)."""

from __future__ import annotations

from datagen.engine import execute
from datagen.engine.job import Job
from datagen.errors import ConfigError
from datagen.redact import get_logger
from datagen.result import RunResult
from datagen.runlog import RunLog
from datagen.shards import ShardLayout

log = get_logger("datagen.pipeline")


async def run_local(job: Job) -> RunResult:
    try:
        shards = ShardLayout.of(job.files).folder
        if job.manifest_base.get("resumed") and shards.is_dir():
            raise ConfigError(f"{job.files.results} was made on a cluster (its shards are in "
                              f"{shards}): resume it with executor='ray' (--executor ray)")
        with RunLog(job.files.log):
            log.info("run started: model %s, %s items, concurrency %d, output %s%s",
                     job.manifest_base.get("model"),
                     job.total if job.total is not None else "unknown",
                     job.options.concurrency, job.files.results,
                     f" (resuming: {len(job.done)} done)" if len(job.done) else "")
            if job.batch_plan is not None:  # batch steps: the engine in rounds
                from datagen.executors.batch import run_batch

                return await run_batch(job)
            return await execute(job)
    finally:
        await close_job(job)


async def close_job(job: Job) -> None:
    for caller in job.callers:
        try:
            await caller.transport.aclose()
        except Exception:  # closing a connection must not hide the run's own outcome
            log.debug("closing a transport failed", exc_info=True)
    if job.cache is not None:
        job.cache.close()
    job.lock.release()
