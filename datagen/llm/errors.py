"""Every failure of a call, from any transport, mapped to one :class:`CallError`.

The kind decides what happens next:

============== ========== ==================================================
kind           retried?   effect
============== ========== ==================================================
rate_limit     yes        Retry-After honoured (seconds or HTTP date)
timeout        yes        exponential backoff with jitter
connection     yes        exponential backoff with jitter
server_error   yes        exponential backoff with jitter (5xx)
empty_response yes        a 200 with no choices / no text
bad_request    no         the item fails with the provider's message (400, 422)
context_window no         the item fails: the prompt is too long for the model
content_filter no         the item fails: the provider refused the content
auth           no         the run stops: invalid API key (401) or no access (403)
not_found      no         the run stops: the model or endpoint does not exist (404)
error          no         the item fails: anything else
============== ========== ==================================================
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

from datagen.errors import DatagenError

RETRYABLE = frozenset({"rate_limit", "timeout", "connection", "server_error", "empty_response"})
FATAL = frozenset({"auth", "not_found"})


class CallError(DatagenError):
    """A failed call, classified. ``retry_after`` is in seconds, from the provider."""

    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1  # set by the caller when retries are given up

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL


def parse_retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds to wait from a Retry-After (seconds or HTTP date) or retry-after-ms header."""
    if not headers:
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except (TypeError, ValueError):
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def kind_for_status(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "rate_limit"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status in (408, 409):
        return "timeout" if status == 408 else "server_error"
    if status >= 500:
        return "server_error"
    if 400 <= status < 500:
        return "bad_request"
    return "error"
