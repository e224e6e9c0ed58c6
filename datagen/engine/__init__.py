"""The engine: runs a prepared :class:`~datagen.engine.job.Job` to the disk.

Three parts, one job each:

- ``workers``: the worker pool (a fixed number of workers pulling items) and signals;
- ``runner``: one item through the steps (render, call, extract, validate, retry, fan
  out, sample, drop);
- ``recorder``: the run's files, counts and manifest.

:func:`execute` ties them together and returns the :class:`~datagen.result.RunResult`.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from datagen import redact
from datagen.engine.job import Job, RunOptions
from datagen.engine.recorder import RunRecorder
from datagen.engine.runner import ItemRunner
from datagen.engine.workers import WorkerPool
from datagen.errors import DatagenError
from datagen.result import RunResult

log = redact.get_logger("datagen.engine")
__all__ = ["EngineRun", "Job", "RunInterrupted", "RunOptions", "execute"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl+C or SIGTERM: raised after the in-flight items are written (or cancelled) and
    the manifest says ``interrupted``; ``result`` holds what was done. Uncaught, Python
    exits with status 130."""

    def __init__(self, message: str, result: RunResult, signal_number: int | None) -> None:
        super().__init__(message)
        self.result = result
        self.signal = signal_number

    @property
    def exit_code(self) -> int:
        return 143 if self.signal == signal.SIGTERM else 130


def run_salt(job: Job) -> str:
    """The cache salt of a job's requests. With the shared cache on: the config's salt.
    With it off, answers are still kept for this run's own resume (never paid twice), so
    the salt names the run: no other run reuses them."""
    salt = job.options.cache_salt
    return salt if job.manifest_base.get("cache_shared", True) else f"{salt}|run:{job.files.stem}"


async def execute(job: Job) -> RunResult:
    run = EngineRun(job)
    run.begin()
    return run.end(await run.one_pass())


class EngineRun:
    """One run of the engine over a job: :meth:`begin`, one pass over the pool (or, in
    batch mode, one per round, with the same recorder and counts), :meth:`end`."""

    def __init__(self, job: Job, rounds: bool = False) -> None:
        self.job = job
        self.recorder = RunRecorder(job, rounds)
        self.runner = ItemRunner(job, self.recorder, run_salt(job))
        self.interrupts = 0
        self.signal: int | None = None  # the last stop signal received
        self.stop_error: dict[str, str] | None = None  # why a stop that is not a signal
        self.abandoned = False

    def begin(self) -> None:
        self.recorder.write_manifest("running", None)
        self.job.display.start(self.job.total)

    async def one_pass(self) -> DatagenError | None:
        """The pool once through the workers; the error that stopped it, if any (an
        interrupt is counted in ``interrupts``)."""
        job, recorder = self.job, self.recorder

        def skipped(keys: int = 1) -> None:
            recorder.counts.skipped += keys

        job.source.on_skip = skipped  # done positions of a resumed pool, passed over unread
        pool = WorkerPool(job.source, self.runner.run, job.options.concurrency, job.done,
                          job.options.shutdown_timeout, skipped)
        failure: DatagenError | None = None
        ticker = asyncio.ensure_future(_tick(recorder))
        try:
            await pool.run()
        except DatagenError as exc:
            failure = exc
        except BaseException as exc:  # cancellation, or a bug: the files stay valid
            self.abandon(exc)
            raise
        finally:
            ticker.cancel()
            self.runner.shared.close()  # no shared request outlives the pass
            self.interrupts += pool.interrupts
            self.signal = pool.signal if pool.signal is not None else self.signal
        return failure

    def abandon(self, exc: BaseException) -> None:
        """A bug or a cancellation outside a pass: the files closed, the manifest says
        ``interrupted``; the caller raises ``exc`` on."""
        if not self.abandoned:
            self.abandoned = True
            _finish(self.job, self.recorder, "interrupted", _error_of(exc))

    def end(self, failure: DatagenError | None) -> RunResult:
        """Close the files, write the final manifest; return the result, or raise the
        error that stopped the run (or :class:`RunInterrupted`)."""
        job, recorder = self.job, self.recorder
        self.runner.rejections.release()
        stopped = self.interrupts or self.stop_error is not None
        status = "failed" if failure else "interrupted" if stopped else "completed"
        error = _error_of(failure) if failure else self.stop_error
        manifest, closing = _finish(job, recorder, status, error)
        failure = failure or closing
        result = RunResult(recorder.ordered_results(), job.files, manifest)
        if failure is not None:
            failure.result = result  # type: ignore[attr-defined]
            raise failure
        if stopped:
            why = self.stop_error["message"] + "; " if self.stop_error else ""
            raise RunInterrupted(
                f"interrupted: {why}{recorder.counts.succeeded} records written to "
                f"{job.files.results}; resume=True continues the run", result, self.signal)
        return result


async def _tick(recorder: RunRecorder) -> None:
    """The display's counters once a second, also while nothing finishes (a Retry-After
    pause says why the run waits, and until when)."""
    while True:
        await asyncio.sleep(1.0)
        recorder.show_counters(force=True)
        recorder.job.display.update(recorder.counts.succeeded,
                                    recorder.counts.failed + recorder.counts.dropped)


def _error_of(exc: BaseException) -> dict[str, str]:
    error = {"kind": str(getattr(exc, "kind", type(exc).__name__)),
             "message": redact.redact(str(exc))}
    if isinstance(exc, DatagenError):
        log.error("run stopped: %s", error["message"])
    return error


def _finish(job: Job, recorder: RunRecorder, status: str, error: dict[str, str] | None
            ) -> tuple[dict[str, Any], DatagenError | None]:
    """Close the files and write the final manifest; returns it, and the write error
    closing raised when nothing else had stopped the run."""
    closing: DatagenError | None = None
    try:
        recorder.close()
    except DatagenError as exc:
        log.error("%s", exc)
        if error is None:
            closing, status, error = exc, "failed", _error_of(exc)
    recorder.show_counters(force=True)
    job.display.close(recorder.counts.succeeded, recorder.counts.failed, recorder.summary())
    try:
        manifest = recorder.write_manifest(status, error)
    except DatagenError as exc:
        log.error("the manifest could not be written: %s", exc)
        manifest = recorder.manifest(status, error)
    log.info("run %s: %s", status, recorder.summary())
    return manifest, closing
