"""Preparing a run: everything checked and opened before the first request, into a
:class:`~datagen.engine.job.Job` the engine runs.

In order: the run's options; the pool (a list or a file is checked whole: a bad item or a
missing template variable stops the run before anything is sent or written); the
providers; the run's files, locked (a new run, or the newest one when resuming: its
fingerprint checked, a torn last line cut, its finished keys indexed); the response
cache; one caller per model; the display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.batch.ledger import OPEN, BatchLedger
from datagen.batch.target import BatchPlan, BatchSettings, batch_target
from datagen.config import Settings
from datagen.config.schema import MAX_CONCURRENCY
from datagen.engine.job import Job, RunOptions
from datagen.errors import ConfigError
from datagen.llm import runtime
from datagen.llm.cache import ResponseCache
from datagen.manifest import check_resume, read_manifest
from datagen.plan import Plan
from datagen.pool import ItemSource, Pool, checked_items, open_pool
from datagen.progress import make_display
from datagen.redact import get_logger
from datagen.seen import KeyIndex
from datagen.store import RunFiles, RunLock, read_index, repair_torn_tail

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
            progress: bool | None) -> Job:
    run = settings.run
    options.concurrency = check_concurrency(run.concurrency_limit if concurrency is None
                                            else concurrency)
    resume = check_resume_value(run.resume if resume is None else resume)
    pool = open_pool(data_pool)
    precheck(pool, plan)
    for name in plan.model_names:
        runtime.check_provider(settings.named_model(name))
    batch_plan = make_batch_plan(settings, plan)  # a model with no batch API: fails here
    opened = open_run(settings, resume, plan.fingerprint)
    try:
        if batch_plan is None:
            refuse_open_batches(opened.files)
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
    return Job(
        plan=plan, steps=plan.runtimes(callers), source=source, total=total,
        files=opened.files, lock=opened.lock, done=opened.done, options=options,
        display=make_display(show, settings.output_data.experiment_name, step_names),
        manifest_base={"datagen_version": _version(),
                       "model": settings.model.model_string(),
                       "extractor": plan.extractor_name, "fingerprint": plan.fingerprint,
                       "resumed": opened.resumed > 0 or len(opened.done) > 0,
                       "cache_shared": run.cache, "config": settings.public_dict()},
        callers=list(callers.values()), cache=cache, resumed=opened.resumed,
        batch_plan=batch_plan)


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
