"""What the fake servers answer with: a :class:`FakeReply` (status, body, headers, delay),
the :class:`FaultPlan` that injects seeded faults (429, 500, 529, hangs, malformed, empty
and truncated replies), and the pure helpers that build and read OpenAI-shaped bodies
(``completion_body``, ``choices_body``, ``error_body``, ``echo_draft``,
``last_user_message``, ``body_hash``).
No HTTP and no server state here; :mod:`datagen.testing.fake_server` re-exports every name.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class FakeReply:
    """A full reply: use it from a responder to send an error status or custom headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[dict[str, Any]], "str | FakeReply"]


@dataclass
class FaultPlan:
    """Faults injected before the responder is asked, each with its probability.

    ``retry_after``: the Retry-After header sent with a 429 (None: no header). A hang
    sleeps ``hang_seconds`` before answering, longer than any sane client timeout. The
    draw is seeded, so a plan replays the same faults for the same order of requests.
    """

    rate_429: float = 0.0
    retry_after: str | None = "1"
    rate_500: float = 0.0
    rate_529: float = 0.0  # Anthropic's "overloaded"
    rate_hang: float = 0.0
    hang_seconds: float = 30.0
    rate_malformed: float = 0.0
    rate_empty: float = 0.0
    rate_length: float = 0.0
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        import random

        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self) -> str | None:
        """The fault for the next request ("429", "500", "529", "hang", "malformed",
        "empty", "length"), counted in ``injected``; None for no fault."""
        with self._lock:
            roll = self._rng.random()
        for kind, rate in (("429", self.rate_429), ("500", self.rate_500),
                           ("529", self.rate_529), ("hang", self.rate_hang),
                           ("malformed", self.rate_malformed), ("empty", self.rate_empty),
                           ("length", self.rate_length)):
            if roll < rate:
                with self._lock:
                    self.injected[kind] += 1
                return kind
            roll -= rate
        return None

    def draw(self, body: dict[str, Any], text: Callable[[], str]) -> FakeReply | None:
        """The next fault as an OpenAI-shaped reply, or None."""
        kind = self.pick()
        return None if kind is None else self._reply(kind, body, text)

    def _reply(self, kind: str, body: dict[str, Any], text: Callable[[], str]) -> FakeReply:
        if kind == "429":
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return FakeReply(status=429, headers=headers)
        if kind in ("500", "529"):
            return FakeReply(status=int(kind))
        if kind == "hang":
            return FakeReply(body=completion_body(body, text()), delay=self.hang_seconds)
        if kind == "malformed":
            return FakeReply(body=b'{"id": "chatcmpl-fake", "choices": [{"mess')
        if kind == "empty":
            reply = completion_body(body, "")
            reply["choices"] = []
            return FakeReply(body=reply)
        full = text()
        return FakeReply(body=completion_body(body, full[: max(1, len(full) // 2)], "length"))


def last_user_message(body: dict[str, Any]) -> str:
    """The last user message of a chat body (JSON for non-text content), else its prompt."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else orjson.dumps(content).decode()
    return str(body.get("prompt", ""))


def echo_draft(body: dict[str, Any]) -> str:
    """The default reply: the user message, wrapped in <draft> tags."""
    return f"<draft>{last_user_message(body)}</draft>"


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-shaped error body for ``status``."""
    kinds = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 429: "rate_limit_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "code": status}}


def completion_body(body: dict[str, Any], text: str, finish_reason: str = "stop"
                    ) -> dict[str, Any]:
    """An OpenAI chat completion answering ``body`` with ``text``, with word-count usage."""
    prompt_tokens = sum(len(str(m.get("content", "")).split())
                        for m in body.get("messages") or []) or 1
    completion_tokens = max(1, len(text.split()))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", "fake-model"),
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def choices_body(body: dict[str, Any], texts: list[str], finish_reason: str = "stop"
                 ) -> dict[str, Any]:
    """An OpenAI chat completion with one choice per text (a request with ``n``): the
    prompt counted once in its usage, the completion tokens of every choice added up."""
    reply = completion_body(body, texts[0], finish_reason)
    reply["choices"] = [{"index": i, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text}}
                        for i, text in enumerate(texts)]
    usage = reply["usage"]
    usage["completion_tokens"] = sum(max(1, len(text.split())) for text in texts)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return reply


def choices_asked(body: dict[str, Any]) -> int:
    """The ``n`` of a request body (1 when absent or not a whole number above 1)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def body_hash(body: dict[str, Any]) -> str:
    """A short, key-order-independent hash of a request body (to count repeats)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
