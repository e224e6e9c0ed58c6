"""The state behind the fake batch server: files, batches and the fake clock.

No HTTP here. :class:`BatchBook` owns every file and batch (a
:class:`~datagen.testing.fake_batch_records.Job`) under one lock, with the counters
(:class:`~datagen.testing.fake_batch_counts.BatchCounts`), and moves a job along its
timeline (:class:`~datagen.testing.fake_batch_timeline.Timeline`) only when someone looks
at it (:meth:`BatchBook.touch`), at the time its delays say, so a test that moves the fake
clock (:meth:`BatchBook.advance`) never sleeps. Requests are answered in order as the batch
progresses, each exactly once; when a batch ends its result files are written once and
never change. The records (``Job``, ``Task``, ``StoredFile``, ``Knobs``...) are importable
from here too. See ``fake_batch_server`` for the knobs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_counts import COUNTS, BatchCounts
from datagen.testing.fake_batch_records import (
    DAY,
    ENDED,
    RUNNING,
    ErrorFor,
    Job,
    Knobs,
    Provider,
    StoredFile,
    Task,
)  # fmt: skip
from datagen.testing.fake_batch_timeline import Timeline

__all__ = ["COUNTS", "DAY", "ENDED", "RUNNING", "BatchBook", "ErrorFor", "Job", "Knobs",
           "Provider", "StoredFile", "Task"]


class BatchBook:
    """Every file and batch of one fake server, under one lock (re-entrant)."""

    def __init__(self, knobs: Knobs, seed: int = 0) -> None:
        self.knobs = knobs
        self.lock = threading.RLock()
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self.offset = 0.0
        self.counters = BatchCounts()
        self.timeline = Timeline(knobs, self.counters, self, seed)

    def reset_counters(self) -> None:
        with self.lock:
            self.counters.reset()

    def note(self, count: str, key: str | None = None) -> None:
        """Count one event (and, for downloads, which file or batch it was)."""
        with self.lock:
            self.counters.note(count, key)

    def stats(self) -> dict[str, Any]:
        """Every counter, JSON-ready. Observes only: it never moves a batch."""
        with self.lock:
            return {**self.counters.stats(),
                    "batches": {job.id: job.status for job in self.jobs.values()}}

    # ---- clock -------------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.offset += seconds

    # ---- files -------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        with self.lock:
            stored = StoredFile(shapes.new_id("file-"), filename, purpose, data, self.now())
            self.files[stored.id] = stored
            if purpose != "batch_output":
                self.counters.note("files_uploaded")
                self.counters.counts["bytes_uploaded"] += len(data)
            return stored

    def delete_file(self, file_id: str) -> bool:
        with self.lock:
            if self.files.pop(file_id, None) is None:
                return False
            self.counters.note("files_deleted")
            return True

    def read_file(self, file_id: str) -> bytes | None:
        with self.lock:
            stored = self.files.get(file_id)
            if stored is not None:
                self.counters.note("downloads", file_id)
            return stored.data if stored is not None else None

    # ---- batches -----------------------------------------------------------------------

    def new_job(self, provider: Provider, endpoint: str, tasks: list[Task],
                **fields: Any) -> Job:
        """A new batch; its timeline is fixed now from the knobs' current values."""
        with self.lock:
            k, now = self.knobs, self.now()
            prefix = "batch_" if provider == "openai" else "msgbatch_"
            ready = now + k.validation_delay
            job = Job(shapes.new_id(prefix), provider, endpoint, tasks, now, ready,
                      max(ready, now + k.completion_delay),
                      now + (k.expire_after if k.expire_after is not None else DAY),
                      k.finalize_delay, k.cancel_delay, **fields)
            job.at["validating"] = now
            self.jobs[job.id] = job
            self.counters.created(tasks)
            return job

    def job(self, job_id: str, provider: Provider, poll: bool = False) -> Job | None:
        """The batch, brought up to date; None if there is no such batch of this provider."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.provider != provider:
                return None
            if poll:
                self.counters.polled(job_id)
            self.touch(job)
            return job

    def listing(self, provider: Provider) -> list[Job]:
        """This provider's batches, newest first, each brought up to date."""
        with self.lock:
            self.counters.note("lists")
            jobs = [job for job in self.jobs.values() if job.provider == provider]
            for job in jobs:
                self.touch(job)
            return jobs[::-1]

    def take_failure(self) -> bool:
        """Use up one of the knobs' ``fail_batches``: True when this new batch is to fail."""
        with self.lock:
            if self.knobs.fail_batches <= 0:
                return False
            self.knobs.fail_batches -= 1
            return True

    def delete_job(self, job: Job) -> None:
        with self.lock:
            del self.jobs[job.id]
            self.counters.note("batches_deleted")

    def cancel(self, job: Job) -> bool:
        """Start cancelling; False once it is too late (OpenAI: finalizing; ended).

        Anthropic shows no "finalizing": a cancel then ends the batch with nothing canceled.
        """
        with self.lock:
            self.counters.cancelled(job.id)
            self.touch(job)
            if job.status == "cancelling":
                return True
            late = job.ended or (job.status == "finalizing" and job.provider == "openai")
            if late:
                return False
            job.enter("cancelling", self.now())
            return True

    def touch(self, job: Job) -> None:
        """Move the batch to where the clock says it is (no-op once it has ended)."""
        with self.lock:
            self.timeline.touch(job)

    # ---- manual control ----------------------------------------------------------------

    def finish(self, job_id: str) -> str:
        """End the batch now, as if every delay had passed; returns its final status."""
        with self.lock:
            job = self.jobs[job_id]
            self.touch(job)
            now = self.now()
            job.ready_at, job.due_at = min(job.ready_at, now), min(job.due_at, now)
            job.finalize_delay = job.cancel_delay = 0.0
            self.touch(job)
            return job.status

    def expire(self, job_id: str) -> str:
        """Expire a running batch now (``expire_done_fraction`` of it answered)."""
        with self.lock:
            job = self.jobs[job_id]
            self.touch(job)
            now = self.now()
            job.ready_at = min(job.ready_at, now)
            if job.status in ("validating", "in_progress"):
                job.expires_at = min(job.expires_at, now)
                job.due_at = max(job.due_at, now + 1)
            self.touch(job)
            return job.status
