"""The response cache: SQLite in WAL mode, keyed by the identity of the whole request.

The key is :func:`~datagen.llm.types.request_identity`: a hash of the canonical request
as sent (endpoint, model, mode, messages or prompt, every parameter, the output
constraint) minus credentials, plus a salt. A hit sends nothing and takes no rate-limit
budget. Entries are stored the moment a response arrives, before it is parsed or written
to the results file, so a run killed in between pays for nothing twice when it resumes.
An answer that extraction or validation rejected is removed (:meth:`reject`), so asking
again gets a fresh one.

Writes go through a writer thread that commits what arrived together in one transaction
(group commit): a commit of its own per answer costs ~22 us of the event loop's CPU, a
sixth of a whole fast-path call; the writer takes them off the loop and commits within
milliseconds. Answers not yet committed are served from memory, so the cache never
misses what it was given.

Fresh samples at temperature > 0: set ``run.cache_salt`` to a new value; identical items
repeated in one pool and ``samples=N`` are told apart automatically.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import OutputError
from datagen.llm.types import Completion, Usage
from datagen.redact import get_logger, redact_bytes

log = get_logger("datagen.llm")
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
)
"""
_DELETE = None  # a pending value that means "remove this key"


class ResponseCache:
    """A small key -> completion store. Safe to share between runs and processes.

    Two connections: the event loop reads with one, the writer thread writes with the
    other (WAL lets them work at once), so a read never waits for a commit.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # the two dicts below
        self._pending: dict[str, bytes | None] = {}  # given, not yet being written
        self._writing: dict[str, bytes | None] = {}  # being committed now
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.error: OutputError | None = None  # the writer's failure, raised at next use
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._reader = self._connect()
            self._reader.execute(SCHEMA)
            self._writer_db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(
                f"cannot open the response cache {self.path}: {exc}. Set run.cache_path to "
                "a writable file."
            ) from None
        self._writer = threading.Thread(target=self._write_loop, name="datagen-cache",
                                        daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def get(self, key: str) -> Completion | None:
        self._raise_writer_error()
        with self._lock:
            for given in (self._pending, self._writing):
                if key in given:
                    value = given[key]
                    return None if value is _DELETE else _decode(value)
        with self._read_lock:
            try:
                row = self._reader.execute("SELECT value FROM responses WHERE key = ?",
                                           (key,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from None
        return None if row is None else _decode(row[0])

    def put(self, key: str, completion: Completion) -> None:
        self._raise_writer_error()
        value = redact_bytes(orjson.dumps({  # a secret echoed in an answer stays out too
            "text": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens, "model": completion.model,
        }))
        with self._lock:
            self._pending[key] = value
        self._wake.set()

    def reject(self, key: str) -> None:
        """Forget an answer that extraction or validation rejected: asking again must get
        a new one, not this one replayed."""
        with self._lock:
            self._pending[key] = _DELETE
        self._wake.set()

    def flush(self) -> None:
        """Commit everything given so far (the writer does it within milliseconds)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                self._writing = batch
            try:
                self._commit(batch)
            finally:
                with self._lock:
                    if self.error is not None:  # still served from memory
                        self._pending = {**batch, **self._pending}
                    self._writing = {}
        self._raise_writer_error()

    def _write_loop(self) -> None:
        while not self._closed:
            self._wake.wait(0.5)
            self._wake.clear()
            time.sleep(0.001)  # let answers arriving together share one commit
            try:
                self.flush()
            except OutputError:
                return  # kept in self.error, raised to the run at its next use

    def _commit(self, batch: dict[str, bytes | None]) -> None:
        """Write ``batch`` in one transaction (with the write lock held)."""
        if not batch or self.error is not None:
            return
        now = time.time()
        rows = [(k, v, now) for k, v in batch.items() if v is not _DELETE]
        gone = [(k,) for k, v in batch.items() if v is _DELETE]
        db = self._writer_db
        try:
            db.execute("BEGIN")
            if rows:
                db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", rows)
            if gone:
                db.executemany("DELETE FROM responses WHERE key = ?", gone)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.error = self._error("write", exc)
            log.error("%s", self.error)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed", exc_info=True)

    def _raise_writer_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _error(self, what: str, exc: sqlite3.Error) -> OutputError:
        error = OutputError(f"cannot {what} the response cache {self.path}: {exc}")
        error.kind = "write_error"  # type: ignore[attr-defined]
        return error

    def close(self) -> None:
        """Commit what is left and close (a write error here is logged, and raised)."""
        self._closed = True
        self._wake.set()
        self._writer.join(5)
        try:
            self.flush()
        finally:
            with self._read_lock, self._write_lock:
                self._reader.close()
                self._writer_db.close()


def _decode(raw: Any) -> Completion:
    data: dict[str, Any] = orjson.loads(raw)
    return Completion(
        text=data["text"], finish_reason=data.get("finish_reason"),
        usage=Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0))),
        model=data.get("model", ""), latency_s=0.0,
    )
