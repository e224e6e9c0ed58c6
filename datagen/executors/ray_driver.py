"""The driver of a cluster run: shards planned (their count fixed for the run, finished
ones skipped on resume), the run folder checked from every node, a pool that is not a
file spilled to the shards' inputs, one Ray task per shard (retried by Ray when its worker
or node dies), the shards' part files merged into the run's files as they grow, the live
display fed by the shards' reports, and the manifest."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import ray as _ray

from datagen.engine import RunInterrupted
from datagen.engine.job import Job
from datagen.errors import ConfigError, DatagenError, RunAbortedError
from datagen.executors import ray_runtime as rt
from datagen.executors.ray_board import shard_states
from datagen.executors.ray_merge import Merger
from datagen.executors.ray_plan import ShardPlan
from datagen.executors.ray_report import LiveView, input_order, run_manifest, summary
from datagen.executors.ray_tasks import ShardTasks
from datagen.redact import get_logger, redact
from datagen.result import RunResult
from datagen.store import iso_now, write_json
from datagen.usercode import UserCodeError, call_user

log = get_logger("datagen.pipeline")
ray: Any = _ray  # typed loosely: Ray's own annotations are partial
TICK_S = 0.5


class ClusterRun:
    def __init__(self, job: Job, executor: Any) -> None:
        self.job, self.ex = job, executor
        self.started_at, self.t0 = iso_now(), time.monotonic()
        self.plan = ShardPlan(job, executor.shards)
        self.merger: Merger | None = None
        self.attempts: list[dict[str, Any]] = []
        self.budget: dict[str, Any] = {}
        self.failure: DatagenError | None = None
        self.records: list[dict[str, Any]] = []
        self.callback_errors = 0
        self.tasks: ShardTasks | None = None
        self.completed: list[tuple[int, int]] = []
        self.nodes: list[str] = []
        self.view = LiveView(job)

    def attach(self) -> None:
        """Before anything is written: the run may go to a cluster, which is reachable."""
        if self.job.make_shard is None:
            raise ConfigError("this job cannot run on a cluster: it was not made by "
                              "pipeline.prepare() (it has no make_shard)")
        self.plan.check()
        rt.connect(self.ex.address, self.ex.init)

    async def run(self) -> RunResult:
        job, plan = self.job, self.plan
        plan.open(rt.cluster_cpus())
        self.nodes = rt.check_shared_folder(plan.layout.folder, plan.shared_files())
        await plan.prepare_inputs()
        self.merger = Merger(job.files, plan.layout, plan.count,
                             job.options.fsync_interval)
        self.merger.rebuild()
        write_json(job.files.manifest, self.manifest("running", None))
        try:
            shipped = ray.put(job.make_shard)
        except Exception as exc:
            raise ConfigError(
                f"the pipeline cannot be sent to the cluster's workers: {exc}. Its "
                "functions (extractors, validators, observers) must be picklable: define "
                "them at the top level of your script or of a module every node can "
                "import, or run a pipeline folder") from exc
        coordinator = rt.start_coordinator(f"datagen-{job.files.stem}-{id(self):x}")
        tasks = self.tasks = ShardTasks(plan, self.ex, shipped, coordinator)
        tasks.shutdown_timeout = job.options.shutdown_timeout
        try:
            for shard in plan.to_run:
                tasks.launch(shard)
            job.display.start(job.total if job.total is not None else plan.total)
            await self._loop(tasks, coordinator)
        except BaseException as exc:
            tasks.cancel(force=True)
            self.failure = self.failure or (exc if isinstance(exc, DatagenError) else None)
            self._finish("interrupted" if self.failure is None else "failed")
            raise
        finally:
            ray.kill(coordinator)
        return self._finish(None)

    # ---- the loop --------------------------------------------------------------------

    async def _loop(self, tasks: ShardTasks, coordinator: Any) -> None:
        restore = tasks.install_signals()
        try:
            while tasks.pending:
                for ref, shard in tasks.ready():
                    if self._outcome(ref, shard).get("status") == "stale":
                        tasks.stale(shard)
                await self._tick(coordinator)
                tasks.abandon_lost(self.attempts)
                if tasks.pending:
                    await asyncio.sleep(TICK_S)
            await self._tick(coordinator, final=True)
        finally:
            restore()

    def _outcome(self, ref: Any, shard: int) -> dict[str, Any]:
        try:
            outcome: dict[str, Any] = ray.get(ref)
        except (ray.exceptions.TaskCancelledError, KeyboardInterrupt):
            return {"status": "interrupted"}
        except ray.exceptions.RayError as exc:
            if not self.interrupted:
                message = redact(str(exc).strip().splitlines()[-1][:500])
                self.failure = self.failure or DatagenError(
                    f"shard {shard} could not finish: its attempts failed "
                    f"{self.ex.max_retries + 1} times, the last one with: {message}. "
                    "The other shards went on; resume the run to finish it")
            return {"status": "failed"}
        if outcome.get("status") == "completed":
            self.completed.append((shard, outcome["attempt"]))  # marked after the next tail
        elif outcome.get("fatal") and self.failure is None:
            error = outcome["error"]
            self.failure = RunAbortedError(error["message"], error["kind"]) \
                if error["type"] == "RunAbortedError" else DatagenError(error["message"])
            assert self.tasks is not None
            self.tasks.cancel(force=False)  # no retry can help: stop paying now
        return outcome

    async def _tick(self, coordinator: Any, final: bool = False) -> None:
        assert self.merger is not None
        lines = self.merger.tail(final)
        await self._records(lines)
        failed = self.merger.streams["failures"].new_by_part
        for shard, epoch in self.completed:  # the tail above read all it wrote
            self.plan.finished(shard, epoch, clean=failed[shard] == 0)
        self.completed.clear()
        try:
            self.attempts, self.budget = await asyncio.wait_for(
                coordinator.view.remote(), timeout=10)
        except Exception:  # the view is for the display; the files are the truth
            log.debug("the coordinator did not answer", exc_info=True)
        self._show()

    async def _records(self, lines: list[bytes]) -> None:
        options = self.job.options
        if not (options.collect or options.on_record):
            return
        for line in lines:
            record = orjson.loads(line)
            if options.collect:
                self.records.append(record)
            if options.on_record is not None:
                try:
                    await call_user(options.on_record, record, kind="on_record",
                                    timeout=options.user_code_timeout)
                except UserCodeError as exc:
                    self.callback_errors += 1
                    log.warning("on_record failed for %s: %s", record.get("key"), exc.message)

    def _show(self) -> None:
        assert self.merger is not None
        notes = [shard_states(self.attempts, self.plan.count, len(self.plan.skipped))]
        self.view.show(self.merger, self.attempts, notes)

    @property
    def interrupted(self) -> bool:
        return self.tasks is not None and self.tasks.interrupts > 0

    # ---- the end ---------------------------------------------------------------------

    def _finish(self, status: str | None) -> RunResult:
        job, merger = self.job, self.merger
        if merger is not None:
            merger.close()
        if status is None:
            status = "failed" if self.failure else "interrupted" if self.interrupted else \
                "completed"
        error = None
        if self.failure is not None:
            error = {"kind": str(getattr(self.failure, "kind", type(self.failure).__name__)),
                     "message": redact(str(self.failure))}
            log.error("run stopped: %s", error["message"])
        manifest = self.manifest(status, error)
        write_json(job.files.manifest, manifest)
        done = merger.count("results") if merger else 0
        failed = (merger.count("failures") + merger.count("dropped")) if merger else 0
        job.display.close(done, failed, summary(manifest))
        log.info("run %s: %s", status, summary(manifest))
        result = RunResult(sorted(self.records, key=input_order), job.files, manifest)
        if self.failure is not None:
            self.failure.result = result  # type: ignore[attr-defined]
            raise self.failure
        if self.interrupted:
            assert self.tasks is not None
            raise RunInterrupted(
                f"interrupted: {manifest['counts']['succeeded']} records written to "
                f"{job.files.results}; resume=True continues the run", result,
                self.tasks.signal)
        return result

    def manifest(self, status: str, error: dict[str, str] | None) -> dict[str, Any]:
        assert self.merger is not None
        cluster = {"executor": "ray", "shards": self.plan.count, "nodes": self.nodes,
                   "shard_folder": str(self.plan.layout.folder),
                   "skipped_finished_shards": self.plan.skipped, "budget": self.budget,
                   "abandoned_attempts": self.tasks.abandoned if self.tasks else []}
        return run_manifest(self.job, self.merger, self.attempts, status=status, error=error,
                            started_at=self.started_at, elapsed=time.monotonic() - self.t0,
                            callback_errors=self.callback_errors, cluster=cluster)
