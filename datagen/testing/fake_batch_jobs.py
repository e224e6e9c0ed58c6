"""The state behind the fake batch server: files, batches, the fake clock and the counters.

No HTTP here. A batch is a :class:`Job`; :class:`BatchBook` owns every job and file and
moves a job along its timeline only when someone looks at it (:meth:`BatchBook.touch`), at
the time its delays say, so a test that moves the fake clock (:meth:`BatchBook.advance`)
never sleeps. Requests are answered in order as the batch progresses, each exactly once;
when a batch ends its result files are written once and never change. See
``fake_batch_server`` for the knobs.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_server import FakeReply, Responder, body_hash

log = logging.getLogger(__name__)

DAY = 24 * 3600
ErrorFor = Callable[[str, dict[str, Any]], "FakeReply | None"]
Provider = Literal["openai", "anthropic"]
RUNNING = ("validating", "in_progress", "finalizing")
ENDED = ("completed", "failed", "expired", "cancelled")
COUNTS = ("files_uploaded", "bytes_uploaded", "files_deleted", "batches_created",
          "batches_rejected", "batches_deleted", "cancels", "polls", "lists", "downloads",
          "requests_submitted", "requests_answered", "requests_succeeded", "requests_errored",
          "requests_expired", "requests_canceled")


class Knobs(Protocol):
    """What a BatchBook reads from its server (see FakeBatchServer for each meaning)."""

    responder: Responder
    completion_delay: float
    validation_delay: float
    finalize_delay: float
    cancel_delay: float
    error_rate: float
    error_for: ErrorFor | None
    expire_after: float | None
    expire_done_fraction: float


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: float

    def to_openai(self) -> dict[str, Any]:
        expires = int(self.created_at) + 30 * DAY if self.purpose == "batch" else None
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": int(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": expires}


@dataclass
class Task:
    """One request in a batch. ``problem``: the provider rejects it (a 400, no responder)."""

    custom_id: str
    body: dict[str, Any]  # as sent: an OpenAI body or Anthropic params
    chat: dict[str, Any]  # what the responder sees (OpenAI-style)
    problem: str | None = None
    kind: str = ""  # "" until done, then succeeded | errored | expired | canceled
    status: int = 0
    reply: Any = None
    request_id: str = ""


@dataclass
class Job:
    """One batch, provider-neutral; ``at`` maps each status entered to when."""

    id: str
    provider: Provider
    endpoint: str
    tasks: list[Task]
    created: float
    ready_at: float  # validation ends
    due_at: float  # every request answered
    expires_at: float
    finalize_delay: float
    cancel_delay: float
    input_file_id: str | None = None
    metadata: dict[str, Any] | None = None
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    status: str = "validating"
    at: dict[str, float] = field(default_factory=dict)
    done: int = 0  # tasks[:done] are answered
    tally: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes | None = None  # Anthropic's results JSONL, written once at the end

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def stamp(self, status: str) -> int | None:
        return int(self.at[status]) if status in self.at else None


class BatchBook:
    """Every file and batch of one fake server, under one lock (re-entrant)."""

    def __init__(self, knobs: Knobs, seed: int = 0) -> None:
        self.knobs = knobs
        self.lock = threading.RLock()
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self.offset = 0.0
        self.rng = random.Random(seed)
        self.reset_counters()

    def reset_counters(self) -> None:
        with self.lock:
            self.counts: Counter[str] = Counter(dict.fromkeys(COUNTS, 0))
            self.polls: Counter[str] = Counter()
            self.cancels: Counter[str] = Counter()
            self.downloads: Counter[str] = Counter()
            self.custom_id_submitted: Counter[str] = Counter()
            self.custom_id_succeeded: Counter[str] = Counter()
            self.body_submitted: Counter[str] = Counter()
            self.body_succeeded: Counter[str] = Counter()

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
                self.counts["files_uploaded"] += 1
                self.counts["bytes_uploaded"] += len(data)
            return stored

    def delete_file(self, file_id: str) -> bool:
        with self.lock:
            if self.files.pop(file_id, None) is None:
                return False
            self.counts["files_deleted"] += 1
            return True

    def read_file(self, file_id: str) -> bytes | None:
        with self.lock:
            stored = self.files.get(file_id)
            if stored is not None:
                self.note("downloads", file_id)
            return stored.data if stored is not None else None

    def note(self, count: str, key: str | None = None) -> None:
        """Count one event (and, for downloads, which file or batch it was)."""
        with self.lock:
            self.counts[count] += 1
            if key is not None and count == "downloads":
                self.downloads[key] += 1

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
            self.counts["batches_created"] += 1
            self.counts["requests_submitted"] += len(tasks)
            for task in tasks:
                self.custom_id_submitted[task.custom_id] += 1
                self.body_submitted[body_hash(task.body)] += 1
            return job

    def job(self, job_id: str, provider: Provider, poll: bool = False) -> Job | None:
        """The batch, brought up to date; None if there is no such batch of this provider."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.provider != provider:
                return None
            if poll:
                self.polls[job_id] += 1
                self.counts["polls"] += 1
            self.touch(job)
            return job

    def listing(self, provider: Provider) -> list[Job]:
        """This provider's batches, newest first, each brought up to date."""
        with self.lock:
            self.counts["lists"] += 1
            jobs = [job for job in self.jobs.values() if job.provider == provider]
            for job in jobs:
                self.touch(job)
            return jobs[::-1]

    def delete_job(self, job: Job) -> None:
        with self.lock:
            del self.jobs[job.id]
            self.counts["batches_deleted"] += 1

    def cancel(self, job: Job) -> bool:
        """Start cancelling; False once it is too late (OpenAI: finalizing; ended).

        Anthropic shows no "finalizing": a cancel then ends the batch with nothing canceled.
        """
        with self.lock:
            self.counts["cancels"] += 1
            self.cancels[job.id] += 1
            self.touch(job)
            if job.status == "cancelling":
                return True
            late = job.ended or (job.status == "finalizing" and job.provider == "openai")
            if late:
                return False
            self._enter(job, "cancelling", self.now())
            return True

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

    # ---- the timeline ------------------------------------------------------------------

    def touch(self, job: Job) -> None:
        """Move the batch to where the clock says it is (no-op once it has ended)."""
        with self.lock:
            now = self.now()
            if job.status == "validating" and now >= job.ready_at:
                self._validated(job)
            if job.status == "in_progress":
                self._progress(job, now)
            end = job.at.get("finalizing", 0.0) + job.finalize_delay
            if job.status == "finalizing" and now >= end:
                self._end(job, "completed", end)
            end = job.at.get("cancelling", 0.0) + job.cancel_delay
            if job.status == "cancelling" and now >= end:
                self._end(job, "cancelled", end)

    def _enter(self, job: Job, status: str, when: float) -> None:
        job.status = status
        job.at[status] = when

    def _validated(self, job: Job) -> None:
        if job.errors:
            self._end(job, "failed", job.ready_at)
        else:
            self._enter(job, "in_progress", job.ready_at)

    def _progress(self, job: Job, now: float) -> None:
        if job.expires_at < job.due_at and now >= job.expires_at:
            share = int(len(job.tasks) * self.knobs.expire_done_fraction)
            self._answer_upto(job, share)
            self._end(job, "expired", job.expires_at)
            return
        start = job.at["in_progress"]
        span = job.due_at - start
        share = len(job.tasks) if now >= job.due_at or span <= 0 else int(
            len(job.tasks) * (now - start) / span)
        self._answer_upto(job, share)
        if now >= job.due_at:
            self._enter(job, "finalizing", job.due_at)

    def _answer_upto(self, job: Job, count: int) -> None:
        while job.done < min(count, len(job.tasks)):
            self._answer(job, job.tasks[job.done])
            job.done += 1

    def _answer(self, job: Job, task: Task) -> None:
        reply = self._ask(task)
        if job.provider == "openai":
            task.status, task.reply = shapes.openai_reply(job.endpoint, task.chat, reply)
        else:
            task.status, task.reply = shapes.anthropic_reply(task.chat, reply)
        task.kind = "succeeded" if task.status < 300 else "errored"
        task.request_id = shapes.new_id("req_")
        job.tally[task.kind] += 1
        self.counts["requests_answered"] += 1
        self.counts[f"requests_{task.kind}"] += 1
        if task.kind == "succeeded":
            self.custom_id_succeeded[task.custom_id] += 1
            self.body_succeeded[body_hash(task.body)] += 1
            usage = task.reply.get("usage") if isinstance(task.reply, dict) else None
            if isinstance(usage, dict):
                job.tokens["input"] += int(usage.get("prompt_tokens", 0))
                job.tokens["output"] += int(usage.get("completion_tokens", 0))

    def _ask(self, task: Task) -> str | FakeReply:
        """The request's answer: a provider rejection, error_for, error_rate, responder."""
        if task.problem is not None:
            return FakeReply(status=400, body=shapes.openai_error(400, task.problem))
        k = self.knobs
        if k.error_for is not None:
            chosen = k.error_for(task.custom_id, task.chat)
            if chosen is not None:
                return chosen
        if k.error_rate and self.rng.random() < k.error_rate:
            return FakeReply(status=500, body=shapes.openai_error(
                500, "The server had an error while processing your request."))
        try:
            return k.responder(task.chat)
        except Exception as exc:  # a broken responder is one failed request, not a stuck batch
            log.exception("the responder raised for custom_id %s", task.custom_id)
            return FakeReply(status=500, body=shapes.openai_error(500, f"responder raised: {exc}"))

    def _end(self, job: Job, status: str, when: float) -> None:
        kind = {"expired": "expired", "cancelled": "canceled"}.get(status)
        if kind is not None:
            for task in job.tasks[job.done:]:
                task.kind = kind
                job.tally[kind] += 1
                self.counts[f"requests_{kind}"] += 1
        self._enter(job, status, when)
        if job.provider == "anthropic":
            job.results = _jsonl(shapes.anthropic_line(t.custom_id, t.kind, t.reply)
                                 for t in job.tasks)
        elif status != "failed":
            self._write_openai_files(job)

    def _write_openai_files(self, job: Job) -> None:
        lines: dict[bool, list[dict[str, Any]]] = {True: [], False: []}  # succeeded?
        for task in job.tasks:
            lines[task.kind == "succeeded"].append(shapes.openai_line(
                task.custom_id, task.kind, task.status, task.reply, task.request_id))
        if lines[True]:
            job.output_file_id = self.add_file(f"{job.id}_output.jsonl", "batch_output",
                                               _jsonl(lines[True])).id
        if lines[False]:
            job.error_file_id = self.add_file(f"{job.id}_error.jsonl", "batch_output",
                                              _jsonl(lines[False])).id

    # ---- counters ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Every counter, JSON-ready. Observes only: it never moves a batch."""
        with self.lock:
            return {**self.counts,
                    "polls_per_batch": dict(self.polls),
                    "cancels_per_batch": dict(self.cancels),
                    "downloads_per_id": dict(self.downloads),
                    "custom_id_submitted": dict(self.custom_id_submitted),
                    "custom_id_succeeded": dict(self.custom_id_succeeded),
                    "body_submitted": dict(self.body_submitted),
                    "body_succeeded": dict(self.body_succeeded),
                    "submitted_twice": _twice(self.custom_id_submitted),
                    "succeeded_twice": _twice(self.custom_id_succeeded),
                    "bodies_submitted_twice": _twice(self.body_submitted),
                    "bodies_succeeded_twice": _twice(self.body_succeeded),
                    "batches": {job.id: job.status for job in self.jobs.values()}}


def _twice(counter: Counter[str]) -> list[str]:
    return sorted(key for key, count in counter.items() if count > 1)


def _jsonl(lines: Any) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)
