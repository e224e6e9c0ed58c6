"""The batch ledger: batch mode's durable memory, one SQLite file per run
(``<run>_batches.sqlite``, WAL, ``synchronous=FULL``: a commit is on the disk when it
returns).

What is written, and when (each step commits before the next provider call):

- a batch is born ``preparing`` while its request file is written; its requests (custom_id
  -> request identity key, step, item key) are rows of ``requests``;
- ``prepared``: the file is complete and synced, every row committed;
- ``uploading`` (the intent, with the file name the provider will show) -> ``uploaded``
  with the file id the provider returned;
- ``creating`` (the intent, with its time) -> ``submitted`` with the batch id;
- ``ended`` with the provider's final status and counts -> ``collected`` once every
  result is in ``answers`` (and in the response cache) and every request has an outcome;
- ``discarded``: a batch that never reached the provider (a crash while its file was
  being written).

A request's ``outcome`` is empty while it waits; then succeeded, errored, expired,
cancelled or missing (no line in the results). ``answers`` holds, per request identity,
the completion collected or the error that failed it for good; an answer lives here (not
only in the shared response cache, which forgets an answer validation rejected) so every
round replays the same answers.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import OutputError
from datagen.llm.errors import CallError
from datagen.llm.types import Completion, Usage
from datagen.redact import redact, redact_bytes

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, step TEXT NOT NULL, api TEXT NOT NULL,
    endpoint TEXT NOT NULL, model TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, path TEXT, requests INTEGER DEFAULT 0, bytes INTEGER DEFAULT 0,
    file_id TEXT, batch_id TEXT, status TEXT, counts TEXT, output_file_id TEXT,
    error_file_id TEXT, results_url TEXT, intent_at REAL, created_at REAL, ended_at REAL,
    polled_at REAL, tally TEXT, usage TEXT, error TEXT, cleaned INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS requests (
    custom_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, key TEXT NOT NULL, step TEXT,
    item TEXT, prefill TEXT, outcome TEXT);
CREATE INDEX IF NOT EXISTS requests_key ON requests(key);
CREATE INDEX IF NOT EXISTS requests_seq ON requests(seq);
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, completion BLOB, error BLOB, custom_id TEXT);
"""
AT_PROVIDER = ("uploading", "uploaded", "creating", "submitted", "ended")
OPEN = ("prepared", *AT_PROVIDER)  # on their way to the provider, or there


@dataclass
class BatchRow:
    """One batch as the ledger holds it (``counts``, ``tally``, ``usage``, ``target``:
    decoded JSON)."""

    seq: int
    step: str
    api: str
    endpoint: str
    model: str
    target: Any
    state: str
    path: str | None = None
    requests: int = 0
    bytes: int = 0
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    counts: Any = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    intent_at: float | None = None
    created_at: float | None = None
    ended_at: float | None = None
    polled_at: float | None = None
    tally: Any = None
    usage: Any = None
    error: str | None = None
    cleaned: int = 0


JSON_COLUMNS = ("target", "counts", "tally", "usage")
COLUMNS = [f.name for f in fields(BatchRow)]


@dataclass
class RequestRow:
    custom_id: str
    seq: int
    key: str
    step: str
    item: str
    prefill: str | None
    outcome: str | None


def completion_json(completion: Completion) -> bytes:
    """An answer as the ledger keeps it (a secret echoed in it redacted, as the cache)."""
    return redact_bytes(orjson.dumps({
        "text": completion.text, "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens,
        "model": completion.model, "latency_s": completion.latency_s}))


def completion_from(raw: bytes) -> Completion:
    data = orjson.loads(raw)
    return Completion(text=data["text"], finish_reason=data.get("finish_reason"),
                      usage=Usage(int(data.get("prompt_tokens", 0)),
                                  int(data.get("completion_tokens", 0))),
                      model=data.get("model", ""), latency_s=float(data.get("latency_s", 0.0)))


def error_json(err: CallError) -> bytes:
    return orjson.dumps({"kind": err.kind, "message": err.message, "status": err.status,
                         "attempts": err.attempts})


def error_from(raw: bytes) -> CallError:
    data = orjson.loads(raw)
    err = CallError(data["kind"], data["message"], data.get("status"))
    err.attempts = int(data.get("attempts") or 1)
    return err


class BatchLedger:
    """The ledger of one run (see the module docstring). ``readonly``: for ``datagen
    status``, beside a run that may be writing it."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                          isolation_level=None, timeout=30)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot open the batch ledger {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable commit for everything inside (or none of it)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- meta ----------------------------------------------------------------------------

    def meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def token(self) -> str:
        """This run's token (in every custom_id, file name and batch's metadata), made
        once and kept."""
        token = self.meta("token")
        if token is None:
            import secrets

            token = secrets.token_hex(4)
            self.set_meta("token", token)
        return token

    # ---- batches -------------------------------------------------------------------------

    def new_batch(self, step: str, api: str, endpoint: str, model: str, target: Any) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO batches (step, api, endpoint, model, target, state) "
                "VALUES (?, ?, ?, ?, ?, 'preparing')",
                (step, api, endpoint, model, redact(orjson.dumps(target).decode())))
            return int(cursor.lastrowid or 0)

    def update(self, seq: int, **values: Any) -> None:
        """Set fields of a batch, committed before this returns."""
        with self.transaction() as db:
            self._set(db, seq, values)

    @staticmethod
    def _set(db: sqlite3.Connection, seq: int, values: dict[str, Any]) -> None:
        encoded = {k: (orjson.dumps(v).decode() if k in JSON_COLUMNS and v is not None
                       else v) for k, v in values.items()}
        if isinstance(encoded.get("error"), str):  # a provider's words: never a secret
            encoded["error"] = redact(encoded["error"])
        sets = ", ".join(f"{name} = ?" for name in encoded)
        db.execute(f"UPDATE batches SET {sets} WHERE seq = ?", (*encoded.values(), seq))

    def batch(self, seq: int) -> BatchRow:
        row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM batches WHERE seq = ?",
                              (seq,)).fetchone()
        return _batch_row(row)

    def batches(self, *states: str) -> list[BatchRow]:
        """Batches in any of ``states`` (every batch when none is given), oldest first."""
        query = f"SELECT {', '.join(COLUMNS)} FROM batches"
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
        return [_batch_row(row) for row in self.db.execute(query + " ORDER BY seq", states)]

    def known_batch_ids(self) -> set[str]:
        return {str(r[0]) for r in self.db.execute(
            "SELECT batch_id FROM batches WHERE batch_id IS NOT NULL")}

    def discard(self, seq: int) -> None:
        """A batch that never reached the provider: its requests wait for a new one."""
        with self.transaction() as db:
            db.execute("DELETE FROM requests WHERE seq = ?", (seq,))
            self._set(db, seq, {"state": "discarded", "requests": 0})

    # ---- requests ------------------------------------------------------------------------

    def add_requests(self, rows: list[tuple[str, int, str, str, str, str | None]]) -> None:
        """(custom_id, seq, key, step, item, prefill) rows, in one commit."""
        with self.transaction() as db:
            db.executemany("INSERT INTO requests (custom_id, seq, key, step, item, prefill) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def request(self, custom_id: str) -> RequestRow | None:
        row = self.db.execute("SELECT custom_id, seq, key, step, item, prefill, outcome FROM "
                              "requests WHERE custom_id = ?", (custom_id,)).fetchone()
        return None if row is None else RequestRow(*row)

    def waiting(self, key: str) -> bool:
        """Is a request with this identity in a batch that has not come back yet?"""
        row = self.db.execute(
            "SELECT 1 FROM requests r JOIN batches b ON b.seq = r.seq WHERE r.key = ? AND "
            "r.outcome IS NULL AND b.state != 'discarded' LIMIT 1", (key,)).fetchone()
        return row is not None

    def tries(self, key: str) -> int:
        """How often this request came back unanswered (a cancel by the user not counted)."""
        row = self.db.execute(
            "SELECT count(*) FROM requests WHERE key = ? AND outcome IN "
            "('errored', 'expired', 'missing')", (key,)).fetchone()
        return int(row[0])

    def unresolved(self, seq: int) -> Iterator[RequestRow]:
        """The requests of a batch that have no outcome yet."""
        yield from (RequestRow(*row) for row in self.db.execute(
            "SELECT custom_id, seq, key, step, item, prefill, outcome FROM requests "
            "WHERE seq = ? AND outcome IS NULL", (seq,)).fetchall())

    def settle(self, custom_id: str, outcome: str) -> None:
        """A request's outcome (inside a transaction)."""
        self.db.execute("UPDATE requests SET outcome = ? WHERE custom_id = ?",
                        (outcome, custom_id))

    def tally(self, seq: int) -> dict[str, int]:
        """A batch's requests by outcome ("waiting": none yet)."""
        return {str(outcome or "waiting"): int(count) for outcome, count in self.db.execute(
            "SELECT outcome, count(*) FROM requests WHERE seq = ? GROUP BY outcome", (seq,))}

    # ---- answers -------------------------------------------------------------------------

    def keep_answer(self, key: str, completion: Completion, custom_id: str) -> None:
        """An answer collected (inside a transaction); it replaces an error kept before."""
        self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, NULL, ?)",
                        (key, completion_json(completion), custom_id))

    def keep_error(self, key: str, err: CallError, custom_id: str) -> None:
        """The error that fails this request for good (inside a transaction); never
        replaces an answer."""
        self.db.execute("INSERT OR IGNORE INTO answers VALUES (?, NULL, ?, ?)",
                        (key, error_json(err), custom_id))

    def answer(self, key: str) -> Completion | CallError | None:
        """The answer collected for this request identity, the error that failed it for
        good, or None."""
        row = self.db.execute("SELECT completion, error FROM answers WHERE key = ?",
                              (key,)).fetchone()
        if row is None:
            return None
        return completion_from(row[0]) if row[0] is not None else error_from(row[1])


def _batch_row(row: Any) -> BatchRow:
    values = dict(zip(COLUMNS, row, strict=True))
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = orjson.loads(values[name])
    return BatchRow(**values)
