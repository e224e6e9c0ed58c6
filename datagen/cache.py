"""Per-request response cache: SQLite in WAL mode, keyed by the canonical request.

The key is a hash of everything that shapes a response: the model, every message (system
prompt included), every sampling parameter, the response format or grammar, and a salt.
A hit sends nothing and takes no rate-limit budget. Entries are written as soon as a
response arrives, before it is parsed or written to the results file, so a run killed in
between pays for nothing twice when it resumes.

Fresh samples at temperature > 0: set ``run.cache_salt`` to a new value (or change the
seed); identical items repeated in one pool are told apart automatically, so ``[item] * 10``
gives ten samples.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import OutputError
from datagen.llm.types import ChatRequest, Completion, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created REAL NOT NULL
)
"""


def request_key(request: ChatRequest, salt: str = "") -> str:
    """A hash of the canonical request: model, messages, parameters, salt."""
    canonical = orjson.dumps(
        {"model": request.model, "messages": request.messages, "params": request.params,
         "salt": salt},
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
        default=repr,
    )
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    """A small key -> completion store. Safe to share between runs and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
        except sqlite3.Error as exc:
            raise OutputError(
                f"cannot open the response cache {self.path}: {exc}. Set run.cache_path to "
                "a writable file, or cache=False."
            ) from None

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?",
                                   (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
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
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                             (key, value, time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()
