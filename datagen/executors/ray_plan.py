"""The shards of a cluster run, planned by the driver: how many (fixed for the run, kept in
``shards.json`` with each shard's input digest and whether it finished), each shard's
input (a JSONL pool read by the shards themselves; any other pool spilled to one file per
shard), and which shards a resumed run skips (finished, with the same input) or resumes.

On resume the driver first takes the lease of every shard it will run (fencing any
attempt of the run that was killed: see :mod:`datagen.lease`) and cuts torn last lines,
so the part files it merges hold whole lines that nothing stale will add to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from datagen.engine.job import Job
from datagen.errors import ConfigError
from datagen.lease import ShardLease, read_epoch
from datagen.llm.cache import cache_family
from datagen.redact import get_logger
from datagen.shards import ShardLayout, ShardRun, cache_path, file_digest, spill
from datagen.store import repair_torn_tail, write_json

log = get_logger("datagen.pipeline")


class ShardPlan:
    def __init__(self, job: Job, wanted: int | None) -> None:
        self.job, self.wanted = job, wanted
        self.layout = ShardLayout.of(job.files)
        self.count = 0
        self.previous: dict[str, Any] | None = None
        self.spilled = False
        self.items: list[int | None] = []
        self.skipped: list[int] = []
        self.to_run: list[int] = []
        self.offsets: list[int] = []
        self.total: int | None = job.total
        self.meta: dict[str, Any] = {}

    def check(self) -> None:
        """Before anything else: a run made in one process is not resumed on a cluster."""
        job = self.job
        try:
            self.previous = orjson.loads(self.layout.meta.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self.previous = None
        if self.previous is None and (job.resumed or len(job.done)):
            raise ConfigError(
                f"{job.files.results} was made by a run in one process (it has no "
                f"{self.layout.folder.name} folder): resume it without executor='ray' "
                "(--executor local), or start a new run on the cluster")

    def open(self, cpus: int) -> None:
        """The shard count: the resumed run's own, else the one asked for, else the
        cluster's CPUs (never more shards than items)."""
        job = self.job
        if self.previous is not None:
            self.count = int(self.previous["count"])
            if self.wanted and self.wanted != self.count:
                log.warning("%s was made with %d shards: resuming it with %d (an item's "
                            "shard depends on the count), not %d", job.files.results,
                            self.count, self.count, self.wanted)
            return
        count = self.wanted or max(1, cpus)
        self.count = max(1, min(count, job.total)) if job.total else count

    def shared_files(self) -> list[Path]:
        source = self.job.source.pool.source
        return [source] if isinstance(source, Path) else []

    async def prepare_inputs(self) -> None:
        job, n = self.job, self.count
        pool = job.source.pool
        if isinstance(pool.source, Path):
            digests, self.items = [file_digest(pool.source)] * n, [None] * n
        else:
            check = None if pool.reiterable else job.plan.check_item
            spilled = await spill(pool, job.plan.make_item, check, self.layout, n)
            digests, self.items, self.spilled = spilled.digests, list(spilled.counts), True
            samples = int(job.manifest_base["config"]["run"].get("samples", 1))
            self.total = sum(spilled.counts) * samples
        old = (self.previous or {}).get("shards") or [{}] * n
        shards = []
        for i in range(n):
            done = old[i].get("finished") and old[i].get("digest") == digests[i] and \
                read_epoch(self.layout.lease(i)) == old[i].get("epoch")
            if self.items[i] == 0 or done:
                self.skipped.append(i)
            else:
                self.to_run.append(i)
            shards.append({"digest": digests[i], "items": self.items[i],
                           "finished": bool(done) or self.items[i] == 0,
                           "epoch": old[i].get("epoch", 0)})
        self.meta = {"count": n, "source": "spill" if self.spilled else str(pool.source),
                     "shards": shards}
        if self.previous is not None:
            self._fence()
        self.offsets = [self._size(self.layout.part(i).failures) for i in range(n)]
        self.layout.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.layout.meta, self.meta)

    def _fence(self) -> None:
        """Resuming: no attempt of the killed run may append any more."""
        for i in self.to_run:
            lease = ShardLease(self.layout.lease(i))
            lease.take()
            try:
                part = self.layout.part(i)
                for path in (part.results, part.failures, part.dropped, part.meta):
                    repair_torn_tail(path)
            finally:
                lease.release()

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def run_of(self, i: int) -> ShardRun:
        job = self.job
        concurrency = job.options.concurrency
        if self.items[i] is not None:
            samples = int(job.manifest_base["config"]["run"].get("samples", 1))
            concurrency = max(1, min(concurrency, int(self.items[i] or 1) * samples))
        source = self.layout.input(i) if self.spilled else Path(job.source.pool.source)
        configured = job.cache.path if job.cache is not None else \
            job.files.results.with_name(".datagen_cache.sqlite")
        mine = f"-of-{self.count}{configured.suffix}"
        family = tuple(path for path in cache_family(configured)
                       if not path.name.endswith(mine))
        return ShardRun(index=i, count=self.count, files=self.layout.part(i),
                        lease=self.layout.lease(i), source=source, spilled=self.spilled,
                        cache=cache_path(configured, i, self.count), concurrency=concurrency,
                        failures_from=self.offsets[i], cache_family=family)

    def finished(self, i: int, epoch: int, clean: bool) -> None:
        """Shard ``i`` completed (``clean``: no item of it failed in this run, so a
        resumed run has nothing to retry there and skips it)."""
        self.meta["shards"][i].update(finished=clean, epoch=epoch)
        write_json(self.layout.meta, self.meta)
