"""The response cache: SQLite in WAL mode, keyed by the identity of the whole request.

The key is :func:`~datagen.llm.types.request_identity`: a hash of the canonical request
as sent (endpoint, model, mode, messages or prompt, every parameter, the output
constraint) minus credentials, plus a salt. A hit sends nothing and takes no rate-limit
budget. Entries are written the moment a response arrives, before it is parsed or written
to the results file, so a run killed in between pays for nothing twice when it resumes.
An answer that extraction or validation rejected is removed (:meth:`reject`), so asking
again gets a fresh one.

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
from datagen.llm.types import ChatRequest, Completion, Usage, request_identity

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
)
"""


class ResponseCache:
    """A small key -> completion store. Safe to share between runs and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(
                f"cannot open the response cache {self.path}: {exc}. Set run.cache_path to "
                "a writable file."
            ) from None

    def key(self, request: ChatRequest, salt: str) -> str:
        return request_identity(request, salt)

    def get(self, key: str) -> Completion | None:
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM responses WHERE key = ?",
                                       (key,)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from None
        if row is None:
            return None
        data: dict[str, Any] = orjson.loads(row[0])
        return Completion(
            text=data["text"], finish_reason=data.get("finish_reason"),
            usage=Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0))),
            model=data.get("model", ""), latency_s=0.0,
        )

    def put(self, key: str, completion: Completion) -> None:
        value = orjson.dumps({
            "text": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens, "model": completion.model,
        })
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                                 (key, value, time.time()))
            except sqlite3.Error as exc:
                raise self._error("write", exc) from None

    def reject(self, key: str) -> None:
        """Forget an answer that extraction or validation rejected: asking again must get
        a new one, not this one replayed."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM responses WHERE key = ?", (key,))
            except sqlite3.Error as exc:
                raise self._error("write", exc) from None

    def _error(self, what: str, exc: sqlite3.Error) -> OutputError:
        return OutputError(f"cannot {what} the response cache {self.path}: {exc}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
