"""The response cache: SQLite in WAL mode, keyed by the identity of the whole request.

The key is :func:`~datagen.llm.types.request_identity`: a hash of the canonical request
as sent (endpoint, model, mode, messages or prompt, every parameter, the output
constraint) minus credentials, plus a salt. A hit sends nothing and takes no rate-limit
budget. Entries are stored the moment a response arrives, before it is parsed or written
to the results file, so a run killed in between pays for nothing twice when it resumes.
An answer that extraction or validation rejected is removed (:meth:`reject`), so asking
again gets a fresh one.

Answers are committed together, one transaction every COMMIT_DELAY_S (5 ms) or
COMMIT_BATCH answers (group commit): a transaction per answer costs ~22 us of CPU, a
sixth of a whole fast-path call; a writer thread costs as much again in contention for
the interpreter. Answers not yet committed are served from memory, so the cache never
misses what it was given; a kill -9 can lose at most the last 5 ms of answers to the
cache (not to the results: a record written holds its answer). A longer delay (50 ms was
tried: ~5 us an answer instead of ~10) lost a step's answers to a kill that came while
the next step's requests were in flight, and they were paid again on resume.

Fresh samples at temperature > 0: set ``run.cache_salt`` to a new value; identical items
repeated in one pool and ``samples=N`` are told apart automatically. The answer to a
request for several choices (``n``, samples sharing one request) is stored whole, every
choice with it; a sample whose choice was rejected marks only its own
(:meth:`ResponseCache.reject_choice`).

A cluster run caches in one file per shard and shard count (one writer per file). So that
no answer is paid twice when the count changes, or a run alternates between one process
and a cluster, a cache also reads its family (:func:`cache_family`: the configured file
and every shard file of another count) when it misses: a hit there is copied into its own
file. A rejected answer is then kept as a tombstone rather than deleted, so the family's
copy of it is not served again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import OutputError
from datagen.llm.types import Choice, Completion, Usage
from datagen.redact import get_logger, redact_bytes
from datagen.seen import KeyIndex

log = get_logger("datagen.llm")
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
)
"""
_DELETE = None  # a pending value that means "remove this key"
_TOMBSTONE = b"-"  # a rejected answer, with a family to read: their copy is not served
_REJECTED = object()
COMMIT_DELAY_S = 0.005
OPEN_RETRY_S = 30.0
COMMIT_BATCH = 2048
# pages the WAL may hold before it is copied into the file (SQLite's default: 1000): the
# keys are hashes, so every commit touches pages all over the table, and copying them back
# every 4 MB doubled the cost of an answer
WAL_CHECKPOINT_PAGES = 10_000


class ResponseCache:
    """A small key -> completion store. Safe to share between runs and processes (one
    instance per run and event loop)."""

    def __init__(self, path: str | Path, family: Sequence[Path] = ()) -> None:
        """``family``: other caches of the same answers, read when this one misses."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pending: dict[str, bytes | None] = {}  # given, not yet committed
        self._flush_at: asyncio.TimerHandle | None = None
        self._committed: asyncio.Future[None] | None = None  # see durable()
        self.error: OutputError | None = None  # a failed commit, raised at the next use
        # the keys the file holds, loaded in the background: a miss is then answered from
        # memory (~1 us) instead of a query; until it is loaded, and for keys another
        # process adds meanwhile, the file is asked
        self._known: KeyIndex | None = None
        self._since_load: set[str] | None = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect(schema=True)
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(
                f"cannot open the response cache {self.path}: {exc}. Set run.cache_path to "
                "a writable file."
            ) from None
        threading.Thread(target=self._load_keys, name="datagen-cache-keys", daemon=True).start()
        self._family: list[ResponseCache] = []
        for other in family:
            try:
                if other.resolve() != self.path.resolve() and other.is_file():
                    self._family.append(ResponseCache(other))
            except (OutputError, OSError) as exc:
                log.warning("the response cache %s is not read: %s", other, exc)

    def _load_keys(self) -> None:
        index = KeyIndex()
        try:
            db = self._connect()
            try:
                for (key,) in db.execute("SELECT key FROM responses"):
                    index.add(key)
            finally:
                db.close()
        except sqlite3.Error:
            return  # the file is asked every time
        with self._lock:
            for key in self._since_load or ():
                index.add(key)
            self._known, self._since_load = index, None

    def _connect(self, schema: bool = False) -> sqlite3.Connection:
        return open_db(self.path, schema)

    def get(self, key: str) -> Completion | None:
        found = self._lookup(key)
        if found is None and self._family:
            for other in self._family:
                hit = other._lookup(key)
                if isinstance(hit, Completion):
                    self.put(key, hit)  # this file holds it now: a resume finds it here
                    return hit
        return found if isinstance(found, Completion) else None

    def _lookup(self, key: str) -> Any:
        """This file's answer, None, or _REJECTED (a tombstone)."""
        self._raise_error()
        with self._lock:
            if key in self._pending:
                value = self._pending[key]
                return None if value is _DELETE else _value(value)
            if self._known is not None and key not in self._known:
                return None
            try:
                row = self._db.execute("SELECT value FROM responses WHERE key = ?",
                                       (key,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from None
        return None if row is None else _value(row[0])

    def put(self, key: str, completion: Completion) -> None:
        self._raise_error()
        # a secret echoed in an answer stays out too
        value = redact_bytes(orjson.dumps(_encode(completion)))
        with self._lock:
            self._pending[key] = value
            if self._known is not None:
                self._known.add(key)
            elif self._since_load is not None:
                self._since_load.add(key)
        self._soon()

    def reject_choice(self, key: str, index: int) -> None:
        """Mark choice ``index`` of a several-choice answer rejected: that sample asks
        again on its own (on resume too); the other choices stay good."""
        hit = self.get(key)
        if hit is None or index >= len(hit.choices):
            return
        choices = list(hit.choices)
        choices[index] = replace(choices[index], rejected=True)
        self.put(key, replace(hit, choices=tuple(choices)))

    def reject(self, key: str) -> None:
        """Forget an answer that extraction or validation rejected: asking again must get
        a new one, not this one replayed."""
        with self._lock:
            self._pending[key] = _TOMBSTONE if self._family else _DELETE
            if self._family and self._known is not None:
                self._known.add(key)
            elif self._family and self._since_load is not None:
                self._since_load.add(key)
        self._soon()

    def _soon(self) -> None:
        """Commit within COMMIT_DELAY_S, together with what else arrives meanwhile (one
        transaction per few milliseconds, not per answer), or now when many wait."""
        if len(self._pending) >= COMMIT_BATCH:
            self.flush()
            return
        if self._flush_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: no later, commit now
            self.flush()
            return
        self._flush_at = loop.call_later(COMMIT_DELAY_S, self._timed_flush)

    async def durable(self) -> None:
        """Until every answer given so far is committed (at the next group commit, within
        COMMIT_DELAY_S). A step's answer must be on disk before the next step's request
        goes out: a kill -9 in between otherwise paid for it again on resume."""
        if not self._pending:
            return
        if self._committed is None:
            self._committed = asyncio.get_running_loop().create_future()
        waiter = self._committed
        self._soon()
        await asyncio.shield(waiter)

    def _timed_flush(self) -> None:
        self._flush_at = None
        with contextlib.suppress(OutputError):  # kept in self.error: raised at next use
            self.flush()

    def flush(self) -> None:
        """Commit everything given so far, in one transaction."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        with self._lock:
            batch, self._pending = self._pending, {}
            if batch and self.error is None:
                self._commit(batch)
            if self.error is not None:  # still served from memory
                self._pending = {**batch, **self._pending}
        committed, self._committed = self._committed, None
        if committed is not None and not committed.done():
            committed.set_result(None)  # (a failed commit is raised at the next use)
        self._raise_error()

    def _commit(self, batch: dict[str, bytes | None]) -> None:
        now = time.time()
        rows = [(k, v, now) for k, v in batch.items() if v is not _DELETE]
        gone = [(k,) for k, v in batch.items() if v is _DELETE]
        db = self._db
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

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _error(self, what: str, exc: sqlite3.Error) -> OutputError:
        error = OutputError(f"cannot {what} the response cache {self.path}: {exc}")
        error.kind = "write_error"  # type: ignore[attr-defined]
        return error

    def close(self) -> None:
        """Commit what is left and close (a write error here is raised)."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._db.close()
            for other in self._family:
                with contextlib.suppress(OutputError):
                    other.close()


def open_db(path: Path, schema: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode. Two runs opening one new cache at the same moment
    (two pipelines of one process, or two processes, sharing an output folder): the
    switch to WAL needs the file alone, and SQLite answers "database is locked" at
    once rather than waiting its busy timeout, so the open is tried again (for up to
    OPEN_RETRY_S): one of two such runs failed before it sent anything."""
    deadline = time.monotonic() + OPEN_RETRY_S
    while True:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            if schema:
                db.execute(SCHEMA)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + 0.02 * random.random())
        except BaseException:
            db.close()
            raise


def cache_family(configured: Path) -> list[Path]:
    """The response caches of one configured cache file: the file itself and every cluster
    shard's (``<stem>.shard-<i>-of-<n><suffix>``: see :func:`datagen.shards.cache_path`)."""
    import glob

    pattern = f"{glob.escape(configured.stem)}.shard-*-of-*{glob.escape(configured.suffix)}"
    return [configured, *sorted(configured.parent.glob(pattern))]


def _value(raw: Any) -> Any:
    return _REJECTED if raw == _TOMBSTONE else _decode(raw)


def _encode(completion: Completion) -> dict[str, Any]:
    data: dict[str, Any] = {
        "text": completion.text, "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens, "model": completion.model,
    }
    if completion.choices:  # the whole answer to a request with n > 1: every choice
        data["choices"] = [[c.text, c.finish_reason, c.rejected] for c in completion.choices]
    return data


def _decode(raw: Any) -> Completion:
    data: dict[str, Any] = orjson.loads(raw)
    return Completion(
        text=data["text"], finish_reason=data.get("finish_reason"),
        usage=Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0))),
        model=data.get("model", ""), latency_s=0.0,
        choices=tuple(Choice(text, finish, bool(rejected))
                      for text, finish, rejected in data.get("choices") or ()),
    )
