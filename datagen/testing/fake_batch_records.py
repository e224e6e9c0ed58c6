"""The records behind the fake batch server, with no behaviour of their own: a stored
:class:`StoredFile`, a batch (:class:`Job`) and each request in it (:class:`Task`), the
:class:`Knobs` a batch book reads from its server, and the names shared by the batch
modules (``Provider``, ``ErrorFor``, the ``RUNNING`` and ``ENDED`` statuses). The book
that keeps them is in :mod:`datagen.testing.fake_batch_jobs`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from datagen.testing.fake_replies import FakeReply, Responder

DAY = 24 * 3600
ErrorFor = Callable[[str, dict[str, Any]], "FakeReply | None"]
Provider = Literal["openai", "anthropic"]
RUNNING = ("validating", "in_progress", "finalizing")
ENDED = ("completed", "failed", "expired", "cancelled")


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
    fail_batches: int


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

    def enter(self, status: str, when: float) -> None:
        """Move to ``status`` as of ``when``."""
        self.status = status
        self.at[status] = when

    def stamp(self, status: str) -> int | None:
        return int(self.at[status]) if status in self.at else None
