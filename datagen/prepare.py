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
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from datagen.batch.ledger import OPEN, BatchLedger
from datagen.batch.target import BatchPlan, BatchSettings, batch_target
from datagen.config import Settings
from datagen.config.schema import MAX_CONCURRENCY
from datagen.engine.job import Job, RunOptions
from datagen.errors import ConfigError
from datagen.llm import runtime
from datagen.llm.cache import ResponseCache, cache_family
from datagen.manifest import check_resume, read_manifest
from datagen.plan import Plan
from datagen.pool import Pool, checked_items, open_pool
from datagen.progress import Display, make_display
from datagen.redact import get_logger
from datagen.runindex import Positions, read_done, read_positions, write_positions
from datagen.seen import KeyIndex
from datagen.shards import ShardRun, failure_keys_since, shard_items
from datagen.source import ItemSource
from datagen.store import Fence, RunFiles, RunLock, key_of, repair_torn_tail

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


def precheck(pool: Pool, plan: Plan, samples: int) -> Positions | None:
    """A list or a file: every item checked before anything is sent, counted, and its
    keys noted (to skip the done ones on resume without reading them again)."""
    if not pool.reiterable:
        return None
    positions = Positions(samples)
    for item in checked_items(pool, plan.make_item, plan.check_item):
        positions.add(item)
    positions.done_reset()
    pool.total = len(positions)
    return positions


def resumable(settings: Settings, resume: bool | str) -> RunFiles | None:
    out = settings.output_data
    if not resume:
        return None
    files = RunFiles.latest(out.output_dir, out.experiment_name, out.need_time_stamp)
    if files is None:
        log.info("nothing to resume for %s in %s: starting a new run",
                 out.experiment_name, out.output_dir)
    return files


def open_new(settings: Settings) -> OpenedRun:
    """A new run's files, locked before any of them is touched."""
    out = settings.output_data
    files, lock = RunFiles.create_locked(out.output_dir, out.experiment_name, out.need_time_stamp)
    files.results.touch()
    return OpenedRun(files, lock, KeyIndex(), 0)


def open_resumed(files: RunFiles, resume: bool | str, fingerprint: dict[str, Any]
                 ) -> OpenedRun:
    """The run being resumed, locked: its fingerprint checked, a torn last line cut, its
    finished keys read (from its done index, see :mod:`datagen.runindex`)."""
    lock = RunLock(files.lock).acquire()
    try:
        check_resume(read_manifest(files.manifest), fingerprint, files.results,
                     force=resume == "force")
        for path in (files.results, files.failures, files.dropped):
            repair_torn_tail(path)
        index = read_done(files.results, files.dropped, key_of)
    except BaseException:
        lock.release()
        raise
    return OpenedRun(files, lock, index.keys, index.records)


def fingerprint_digest(plan: Plan) -> str:
    return hashlib.sha256(orjson.dumps(plan.fingerprint, option=orjson.OPT_SORT_KEYS)
                          ).hexdigest()


def open_run(settings: Settings, plan: Plan, pool: Pool, resume: bool | str, samples: int
             ) -> tuple[OpenedRun, bytearray | None, dict[int, int] | None]:
    """The run's files, and which pool positions are still to do (None: all of them).

    A new run checks the pool before it creates a file. A resumed one checks it after
    its lock is taken (a second writer stops before reading anything), unless the pool
    file is the one the run checked before (its index says so, by size and sha256): then
    the done items are skipped without being read.
    """
    existing = resumable(settings, resume)
    if existing is None:
        positions = precheck(pool, plan, samples)
        opened = open_new(settings)
        loaded = False
    else:
        opened = open_resumed(existing, resume, plan.fingerprint)
        try:
            positions = None
            if isinstance(pool.source, Path):
                positions = read_positions(opened.files.results, pool.source, samples,
                                           fingerprint_digest(plan))
            loaded = positions is not None
            if positions is None:
                positions = precheck(pool, plan, samples)
            else:
                pool.total = len(positions)
        except BaseException:
            opened.lock.release()
            raise
    if positions is None:
        return opened, None, None
    if isinstance(pool.source, Path) and not loaded:
        write_positions(opened.files.results, pool.source, positions, fingerprint_digest(plan))
    if not len(opened.done):
        return opened, None, None
    return opened, positions.todo(opened.done), positions.repeats


def prepare(settings: Settings, plan: Plan, data_pool: Any, *, concurrency: int | None,
            resume: bool | str | None, options: RunOptions, step_names: list[str],
            progress: bool | None, shard_origin: Callable[..., Job] | None = None) -> Job:
    run = settings.run
    options.concurrency = check_concurrency(run.concurrency_limit if concurrency is None
                                            else concurrency)
    resume = check_resume_value(run.resume if resume is None else resume)
    pool = open_pool(data_pool)
    plan.check_models()
    batch_plan = make_batch_plan(settings, plan)  # a model with no batch API: fails here
    opened, todo, repeats = open_run(settings, plan, pool, resume, run.samples)
    try:
        if batch_plan is None:
            refuse_open_batches(opened.files)
        cache_file = run.cache_path or Path(settings.output_data.output_dir) / CACHE_FILE
        cache = ResponseCache(cache_file, cache_family(Path(cache_file)) if run.cache else ())
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
                        samples=run.samples, todo=todo, repeats=repeats)
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
        resumed=opened.resumed, make_shard=make_shard, batch_plan=batch_plan)


def manifest_base(settings: Settings, plan: Plan, resumed: bool) -> dict[str, Any]:
    return {"datagen_version": _version(), "model": settings.model.model_string(),
            "extractor": plan.extractor_name, "fingerprint": plan.fingerprint,
            "resumed": resumed, "cache_shared": settings.run.cache,
            "config": settings.public_dict(),
            # where the pipeline lives: `datagen export` finds its mapper there
            "config_file": str(settings.config_path) if settings.config_path else None}


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
    index = read_done(files.results, files.dropped, key_of)
    failure_keys_since(files.failures, shard.failures_from, index.keys)
    cache = ResponseCache(shard.cache, shard.cache_family if settings.run.cache else ())
    callers = {name: runtime.make_caller(settings.named_model(name), shard.concurrency, cache)
               for name in plan.model_names}
    if not settings.run.cache and epoch == 1 and not index.records:
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
        resumed=index.records, fence=fence)


def make_batch_plan(settings: Settings, plan: Plan) -> BatchPlan | None:
    """Each batch step's batch API (ConfigError for a model that has none), or None when
    no step goes through a batch."""
    steps = plan.batch_steps()
    if not steps:
        return None
    knobs = BatchSettings.of(settings.run)
    return BatchPlan({name: batch_target(name, settings.named_model(model), knobs)
                      for name, model in steps.items()}, knobs)


def refuse_open_batches(files: RunFiles) -> None:
    """A batch run resumed online would pay again for what its open batches answer."""
    if not files.batches.exists():
        return
    ledger = BatchLedger(files.batches, readonly=True)
    try:
        waiting = [row.batch_id or f"#{row.seq}" for row in ledger.batches(*OPEN)]
    finally:
        ledger.close()
    if waiting:
        raise ConfigError(
            f"{files.results.name} has {len(waiting)} batch(es) still open at the provider "
            f"({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''}): resume it in "
            "batch mode (datagen run --resume --batch, or run.batch: true) to collect them, "
            f"or cancel them first (datagen cancel {files.results.parent})")
