"""How a fake batch moves along its timeline: :class:`Timeline` brings a
:class:`~datagen.testing.fake_batch_records.Job` to where the fake clock says it is
(validating, in progress, finalizing, cancelling, ended), answers its requests in order,
each exactly once (a provider rejection, ``error_for``, ``error_rate`` or the responder),
and writes its results once when it ends. It holds no lock: the batch book calls it under
its own (see :mod:`datagen.testing.fake_batch_jobs`).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol

import orjson

from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_counts import BatchCounts
from datagen.testing.fake_batch_records import Job, Knobs, StoredFile, Task
from datagen.testing.fake_replies import FakeReply

log = logging.getLogger(__name__)


class Shelf(Protocol):
    """Where a timeline reads the time and stores a batch's output files (the book)."""

    def now(self) -> float: ...

    def add_file(self, filename: str, purpose: str, data: bytes) -> StoredFile: ...


class Timeline:
    """Moves batches along (see the module docstring); ``seed`` seeds ``error_rate``."""

    def __init__(self, knobs: Knobs, counts: BatchCounts, shelf: Shelf, seed: int = 0
                 ) -> None:
        self.knobs = knobs
        self.counts = counts
        self.shelf = shelf
        self.rng = random.Random(seed)

    def touch(self, job: Job) -> None:
        """Move the batch to where the clock says it is (no-op once it has ended)."""
        now = self.shelf.now()
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

    def _validated(self, job: Job) -> None:
        if job.errors:
            self._end(job, "failed", job.ready_at)
        else:
            job.enter("in_progress", job.ready_at)

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
            job.enter("finalizing", job.due_at)

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
        self.counts.answered(task)
        usage = task.reply.get("usage") if isinstance(task.reply, dict) else None
        if task.kind == "succeeded" and isinstance(usage, dict):
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
                self.counts.note(f"requests_{kind}")
        job.enter(status, when)
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
            job.output_file_id = self.shelf.add_file(f"{job.id}_output.jsonl",
                                                     "batch_output", _jsonl(lines[True])).id
        if lines[False]:
            job.error_file_id = self.shelf.add_file(f"{job.id}_error.jsonl",
                                                    "batch_output", _jsonl(lines[False])).id


def _jsonl(lines: Any) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)
