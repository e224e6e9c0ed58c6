"""This round's request files: each batch step's deferred requests streamed to disk as
they come (one line each, in the provider's shape), split at the provider's limits
(requests and bytes per batch), each part a batch in the ledger with every custom_id ->
request identity, step and item recorded before the file is uploaded.

custom_ids read ``dg-<run token>-<batch seq>-<n>``: unique across the run's every batch
(a request sent again after an error or expiry gets a new one), and telling on sight
which run and batch a line belongs to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from datagen.batch.api import BatchAPI
from datagen.batch.ledger import BatchLedger
from datagen.batch.target import BatchTarget
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest
from datagen.seen import KeyIndex

ROWS_PER_COMMIT = 1000


def file_name(token: str, seq: int) -> str:
    """The name a batch's request file has on disk and at the provider."""
    return f"datagen-{token}-{seq}.jsonl"


def tag(token: str, seq: int) -> str:
    """What a batch's metadata carries (OpenAI), to find it again after a lost create."""
    return f"{token}-{seq}"


@dataclass
class Part:
    """One request file being written: a batch in the ledger, state ``preparing``."""

    seq: int
    path: Path
    fh: IO[bytes]
    count: int = 0
    size: int = 0
    rows: list[tuple[str, int, str, str, str, str | None]] = field(default_factory=list)


class RequestFiles:
    """The parts of one round (see the module docstring)."""

    def __init__(self, ledger: BatchLedger, folder: Path) -> None:
        self.ledger, self.folder = ledger, folder
        self.token = ledger.token()
        self.parts: dict[tuple[str, str], Part] = {}
        self.added = KeyIndex()
        self.requests = 0
        self.prepared: list[int] = []

    def has(self, key: str) -> bool:
        """Was a request of this identity taken into this round already?"""
        return key in self.added

    def add(self, step: str, api: BatchAPI, target: BatchTarget, request: ChatRequest,
            key: str, item: str) -> None:
        """Write one request into its step's current part (a new part when it would pass
        a limit); raises CallError when it cannot go into a batch at all."""
        endpoint = api.endpoint(request)
        part = self.parts.get((step, endpoint))
        if part is None:
            part = self._open(step, api, target, endpoint)
        line = api.line(f"dg-{self.token}-{part.seq}-{part.count}", endpoint, request)
        if part.count and (part.count >= target.max_requests
                           or part.size + len(line) > target.max_bytes):
            self._close(part)
            part = self._open(step, api, target, endpoint)
            line = api.line(f"dg-{self.token}-{part.seq}-{part.count}", endpoint, request)
        if len(line) > target.max_bytes:
            raise CallError("bad_request", f"the request is {len(line):,} bytes: more than a "
                            f"batch request file may hold ({target.max_bytes:,} bytes)")
        part.fh.write(line)
        part.rows.append((f"dg-{self.token}-{part.seq}-{part.count}", part.seq, key, step,
                          item, request.prefill))
        part.count += 1
        part.size += len(line)
        self.added.add(key)
        self.requests += 1
        if len(part.rows) >= ROWS_PER_COMMIT:
            self._commit(part)

    def _open(self, step: str, api: BatchAPI, target: BatchTarget, endpoint: str) -> Part:
        self.folder.mkdir(parents=True, exist_ok=True)
        seq = self.ledger.new_batch(step, api.api, endpoint, target.model, target.describe())
        path = self.folder / file_name(self.token, seq)
        self.ledger.update(seq, path=str(path))
        part = Part(seq, path, open(path, "wb"))  # noqa: SIM115 - closed in _close
        self.parts[(step, endpoint)] = part
        return part

    def _commit(self, part: Part) -> None:
        if part.rows:
            self.ledger.add_requests(part.rows)
            part.rows = []

    def _close(self, part: Part) -> None:
        """The part complete: its file synced, its rows committed, then ``prepared``
        (or discarded when it holds nothing)."""
        self.parts = {k: p for k, p in self.parts.items() if p is not part}
        part.fh.flush()
        os.fsync(part.fh.fileno())
        part.fh.close()
        self._commit(part)
        if part.count == 0:
            part.path.unlink(missing_ok=True)
            self.ledger.discard(part.seq)
            return
        self.ledger.update(part.seq, state="prepared", requests=part.count, bytes=part.size)
        self.prepared.append(part.seq)

    def finish(self) -> list[int]:
        """Close every part; the batches this round prepared."""
        for part in list(self.parts.values()):
            self._close(part)
        return self.prepared
