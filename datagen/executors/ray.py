"""The ray executor: the same pipeline on a Ray cluster, in shards.

Items are assigned to shards by a hash of their content key (the same shard on every run
and resume); each shard runs the engine as one Ray task over its items and writes its own
part files in the run folder, fenced by a lease so that a stale attempt never appends.
The driver merges the parts into the run's one results file (and failures, dropped,
manifest) as they grow, shows the usual live display, and records shards, attempts and
lost nodes in the manifest. Every endpoint's rate limit is the cluster's, kept by one
named actor. See README, "Running on a cluster".

Modules: ``ray_driver`` (the driver's loop), ``ray_plan`` (the shards of a run),
``ray_runtime`` (Ray: the coordinator actor, the shard task, the shared-folder check),
``ray_shard`` (one attempt, on a worker), ``ray_merge`` (the parts into the run's files),
``ray_board`` (attempts and their counters).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from datagen.engine.job import Job
from datagen.errors import ConfigError
from datagen.executors.local import close_job
from datagen.result import RunResult
from datagen.runlog import RunLog

RAY_MISSING = ('executor "ray" needs Ray, which is not installed here: '
               'pip install "datagen[ray]"')


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING)


class RayExecutor:
    """Run a prepared job on a Ray cluster (``pipeline.run(pool, executor=RayExecutor())``).

    - ``address``: the cluster (``"auto"``, ``"host:port"``, ``"ray://host:10001"``);
      ``None``: Ray's default (``RAY_ADDRESS``, else a cluster started on this machine).
      A process already attached (``ray.init`` called) runs on that cluster.
    - ``shards``: how many shards (default: the cluster's CPUs; never more than items).
      A resumed run keeps the count it was made with.
    - ``max_retries``: how many times Ray runs a shard again after its worker or node died.
    - ``num_cpus``: CPUs a shard task holds (more for heavy user code).
    - ``init``: more keywords for ``ray.init`` (``runtime_env``, ``namespace``...).
    """

    def __init__(self, address: str | None = None, shards: int | None = None, *,
                 max_retries: int = 3, num_cpus: float = 1.0,
                 init: dict[str, Any] | None = None) -> None:
        require_ray()
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                                   or shards < 1):
            raise ConfigError(f"shards must be a whole number >= 1, got {shards!r}")
        self.address, self.shards = address, shards
        self.max_retries, self.num_cpus = max_retries, num_cpus
        self.init = dict(init or {})

    async def __call__(self, job: Job) -> RunResult:
        from datagen.executors.ray_driver import ClusterRun

        started = False
        try:
            cluster_run = ClusterRun(job, self)
            cluster_run.attach()
            started = True
            with RunLog(job.files.log):
                return await cluster_run.run()
        finally:
            await close_job(job)
            if not started:
                discard_unstarted(job)


def discard_unstarted(job: Job) -> None:
    """A new run that could not start (no cluster to reach): its files are removed, so
    it leaves nothing half-made behind (an empty results file that --resume would pick
    as the newest run)."""
    if job.resumed or len(job.done):
        return
    files = job.files
    if files.results.exists() and files.results.stat().st_size == 0 and \
            not files.manifest.exists():
        for path in (files.results, files.lock, files.log):
            path.unlink(missing_ok=True)
