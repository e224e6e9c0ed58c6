"""The counters of the fake batch server: :class:`BatchCounts` counts files, batches,
polls, cancels, downloads and requests, and per ``custom_id`` and per body hash how often
each request was submitted and succeeded, so a test can prove nothing was paid twice. It
holds no lock: the batch book's lock guards it (see :mod:`datagen.testing.fake_batch_jobs`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from datagen.testing.fake_batch_records import Task
from datagen.testing.fake_replies import body_hash

COUNTS = ("files_uploaded", "bytes_uploaded", "files_deleted", "batches_created",
          "batches_rejected", "batches_deleted", "cancels", "polls", "lists", "downloads",
          "requests_submitted", "requests_answered", "requests_succeeded", "requests_errored",
          "requests_expired", "requests_canceled")


class BatchCounts:
    """Every counter of one fake batch server (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Every counter back to zero."""
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTS, 0))
        self.polls: Counter[str] = Counter()
        self.cancels: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()
        self.custom_id_submitted: Counter[str] = Counter()
        self.custom_id_succeeded: Counter[str] = Counter()
        self.body_submitted: Counter[str] = Counter()
        self.body_succeeded: Counter[str] = Counter()

    def note(self, count: str, key: str | None = None) -> None:
        """Count one event (and, for downloads, which file or batch it was)."""
        self.counts[count] += 1
        if key is not None and count == "downloads":
            self.downloads[key] += 1

    def polled(self, job_id: str) -> None:
        self.polls[job_id] += 1
        self.counts["polls"] += 1

    def cancelled(self, job_id: str) -> None:
        self.counts["cancels"] += 1
        self.cancels[job_id] += 1

    def created(self, tasks: list[Task]) -> None:
        """A batch of ``tasks`` was created."""
        self.counts["batches_created"] += 1
        self.counts["requests_submitted"] += len(tasks)
        for task in tasks:
            self.custom_id_submitted[task.custom_id] += 1
            self.body_submitted[body_hash(task.body)] += 1

    def answered(self, task: Task) -> None:
        """``task`` was answered (its ``kind`` is succeeded or errored)."""
        self.counts["requests_answered"] += 1
        self.counts[f"requests_{task.kind}"] += 1
        if task.kind == "succeeded":
            self.custom_id_succeeded[task.custom_id] += 1
            self.body_succeeded[body_hash(task.body)] += 1

    def stats(self) -> dict[str, Any]:
        """Every counter, JSON-ready."""
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
                "bodies_succeeded_twice": _twice(self.body_succeeded)}


def _twice(counter: Counter[str]) -> list[str]:
    return sorted(key for key, count in counter.items() if count > 1)
