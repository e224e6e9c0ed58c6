"""Preparing a run: everything checked and opened before the first request, into a
:class:`~datagen.engine.job.Job` the engine runs.

In order: the run's options; the pool (a list or a file is checked whole: a bad item or a
missing template variable stops the run before anything is sent or written); the
providers; the run's files, locked (a new run, or the newest one when resuming: its
fingerprint checked, a torn last line cut, its finished keys indexed); the response
cache; one caller per model; the display.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.config import Settings
from datagen.config.schema import MAX_CONCURRENCY
from datagen.engine.job import Job, RunOptions
from datagen.errors import ConfigError
from datagen.llm import runtime
from datagen.llm.cache import ResponseCache
from datagen.manifest import check_resume, read_manifest
from datagen.plan import Plan
from datagen.pool import ItemSource, Pool, checked_items, open_pool
from datagen.progress import Display, make_display
from datagen.redact import get_logger
from datagen.seen import KeyIndex
from datagen.shards import ShardRun, failure_keys_since, shard_items
from datagen.store import Fence, RunFiles, RunLock, read_index, repair_torn_tail

log = get_logger("datagen.pipeline")
CACHE_FILE = ".datagen_cache.sqlite"


def _version() -> str:
    from datagen import __version__

    return __version__


def check_concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"concurrency_limit must be a whole number >= 1, got {value!r}")
    if value > MAX_CONCURRENCY:
        raise ConfigError(f"concurrency_limit {value} is more than {MAX_CONCURRENCY:,} "
                          "requests in flight, which no provider serves from one process; "
                          "use a smaller value (or a cluster executor)")
    return value


def check_resume_value(value: Any) -> bool | str:
    if value not in (True, False, "force"):
        raise ConfigError(f"resume must be True, False or 'force', got {value!r}")
    return value  # type: ignore[no-any-return]


@dataclass
class OpenedRun:
    files: RunFiles
    lock: RunLock
    done: KeyIndex
    resumed: int  # records already in the results file


def precheck(pool: Pool, plan: Plan) -> None:
    """A list or a file: every item checked before anything is sent, and counted."""
    if pool.reiterable:
        pool.total = sum(1 for _ in checked_items(pool, plan.make_item, plan.check_item))


def open_run(settings: Settings, resume: bool | str, fingerprint: dict[str, Any]
             ) -> OpenedRun:
    """The run's files, locked before any of them is touched."""
    out = settings.output_data
    if resume:
        files = RunFiles.latest(out.output_dir, out.experiment_name, out.need_time_stamp)
        if files is not None:
            lock = RunLock(files.lock).acquire()
            try:
                check_resume(read_manifest(files.manifest), fingerprint, files.results,
                             force=resume == "force")
                for path in (files.results, files.failures, files.dropped):
                    repair_torn_tail(path)
                index = read_index(files.results)
                read_index(files.dropped, into=index.keys)
            except BaseException:
                lock.release()
                raise
            return OpenedRun(files, lock, index.keys, index.lines - index.unparseable)
        log.info("nothing to resume for %s in %s: starting a new run",
                 out.experiment_name, out.output_dir)
    files, lock = RunFiles.create_locked(out.output_dir, out.experiment_name, out.need_time_stamp)
    files.results.touch()
    return OpenedRun(files, lock, KeyIndex(), 0)


def prepare(settings: Settings, plan: Plan, data_pool: Any, *, concurrency: int | None,
            resume: bool | str | None, options: RunOptions, step_names: list[str],
            progress: bool | None, shard_origin: Callable[..., Job] | None = None) -> Job:
    run = settings.run
    options.concurrency = check_concurrency(run.concurrency_limit if concurrency is None
                                            else concurrency)
    resume = check_resume_value(run.resume if resume is None else resume)
    pool = open_pool(data_pool)
    precheck(pool, plan)
    for name in plan.model_names:
        runtime.check_provider(settings.named_model(name))
    opened = open_run(settings, resume, plan.fingerprint)
    try:
        cache = ResponseCache(run.cache_path or Path(settings.output_data.output_dir)
                              / CACHE_FILE)
        callers = {name: runtime.make_caller(settings.named_model(name),
                                             options.concurrency, cache)
                   for name in plan.model_names}
    except BaseException:
        opened.lock.release()
        raise
    if not run.cache and not opened.resumed and not len(opened.done):
        for caller in callers.values():  # a new run's own answers cannot be stored yet
            caller.lookup = False
    total = pool.total * run.samples if pool.total is not None else None
    if total is not None:  # never more workers than items
        options.concurrency = max(1, min(options.concurrency, total))
    show = run.progress if progress is None else progress
    source = ItemSource(pool, plan.make_item, None if pool.reiterable else plan.check_item,
                        samples=run.samples)
    base = manifest_base(settings, plan, resumed=opened.resumed > 0 or len(opened.done) > 0)
    # a cluster run (datagen.executors.ray) makes each shard's job where the shard runs:
    # from the pipeline folder again (shard_origin, set by load_folder), or from this plan
    shard_options = dataclasses.replace(options, collect=False, on_record=None,
                                        progress_callback=None)
    make_shard = functools.partial(shard_origin, shard_options, base) if shard_origin \
        else functools.partial(prepare_shard, settings, plan, shard_options, base)
    return Job(
        plan=plan, steps=plan.runtimes(callers), source=source, total=total,
        files=opened.files, lock=opened.lock, done=opened.done, options=options,
        display=make_display(show, settings.output_data.experiment_name, step_names),
        manifest_base=base, callers=list(callers.values()), cache=cache,
        resumed=opened.resumed, make_shard=make_shard)


def manifest_base(settings: Settings, plan: Plan, resumed: bool) -> dict[str, Any]:
    return {"datagen_version": _version(), "model": settings.model.model_string(),
            "extractor": plan.extractor_name, "fingerprint": plan.fingerprint,
            "resumed": resumed, "cache_shared": settings.run.cache,
            "config": settings.public_dict()}


def prepare_shard(settings: Settings, plan: Plan, options: RunOptions,
                  base: dict[str, Any], *, shard: ShardRun, epoch: int, display: Display,
                  fence: Fence) -> Job:
    """The job of one attempt of one shard of a cluster run, made on the worker that runs
    it (after taking the shard's lease: ``fence``): the shard's items, its part files
    resumed (what they hold is done, and so are this run's failures when a retry runs),
    its response cache, callers whose limits are the cluster's (see
    ``datagen.llm.cluster``). Everything was checked by the driver already."""
    from datagen.manifest import describe_changes
    from datagen.pipeline import register_secrets

    register_secrets(settings)  # this process's redactor knows the credentials too
    changes = describe_changes(base["fingerprint"], plan.fingerprint)
    if changes:
        raise ConfigError("the pipeline rebuilt on this worker is not the driver's: "
                          + "; ".join(changes) + ". Every node must see the same pipeline "
                          "folder (and prompts); do not edit them during a run.")
    files = shard.files
    for path in (files.results, files.failures, files.dropped):
        repair_torn_tail(path)
    index = read_index(files.results)
    read_index(files.dropped, into=index.keys)
    failure_keys_since(files.failures, shard.failures_from, index.keys)
    cache = ResponseCache(shard.cache)
    callers = {name: runtime.make_caller(settings.named_model(name), shard.concurrency, cache)
               for name in plan.model_names}
    if not settings.run.cache and epoch == 1 and not index.lines:
        for caller in callers.values():  # the shard's first attempt: nothing stored yet
            caller.lookup = False
    pool = Pool(shard_items(shard, plan.make_item), None, reiterable=False, indexed=True)
    return Job(
        plan=plan, steps=plan.runtimes(callers),
        source=ItemSource(pool, plan.make_item, None, samples=settings.run.samples),
        total=None, files=files, lock=RunLock(files.lock),  # never taken: the lease fences
        done=index.keys, options=dataclasses.replace(options, concurrency=shard.concurrency),
        display=display, manifest_base={**base, "shard": {
            "index": shard.index, "count": shard.count, "epoch": epoch}},
        callers=list(callers.values()), cache=cache,
        resumed=index.lines - index.unparseable, fence=fence)
