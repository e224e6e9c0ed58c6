"""Every failure of a call, from any transport, mapped to one :class:`CallError`.

The kind decides what happens next:

================== ======== ========================================================
kind               retried? effect
================== ======== ========================================================
rate_limit         yes      Retry-After honoured (seconds or HTTP date)
timeout            yes      exponential backoff with jitter
connection         yes      exponential backoff with jitter
server_error       yes      exponential backoff with jitter (5xx, Anthropic's 529)
empty_response     yes      a 200 with no choices / no text
malformed_response yes      a 200 whose body cannot be read: not JSON, a field of
                            the wrong type, a token count that is not a number
bad_request        no       the item fails with the provider's message (400, 413, 422;
                            any status whose body is a validation error of the request)
context_window     no       the item fails: the prompt is too long for the model
content_filter     no       the item fails: the provider refused the content
auth               no       the run stops: invalid API key (401), no access (403), billing
not_found          no       the run stops: the model or endpoint does not exist (404)
error              no       the item fails: anything else
================== ======== ========================================================

``CallError.rate_limits`` carries the endpoint's limits when the failed response stated
them in its headers (a 429 usually does).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from datagen.errors import DatagenError

if TYPE_CHECKING:
    from datagen.llm.types import RateLimitInfo

RETRYABLE = frozenset({"rate_limit", "timeout", "connection", "server_error", "empty_response",
                       "malformed_response"})
FATAL = frozenset({"auth", "not_found"})

# Error types and codes providers put in an error body (OpenAI's ``code``/``type``,
# Anthropic's ``error.type``) -> kind. Used where the status alone says too little, or
# where there is no error status at all (a 200 whose body is an error).
ERROR_TYPE_KINDS: dict[str, str] = {
    "invalid_request_error": "bad_request",
    "request_too_large": "bad_request",  # Anthropic 413
    "authentication_error": "auth",
    "invalid_api_key": "auth",
    "permission_error": "auth",
    "billing_error": "auth",  # Anthropic 402: no call will pass until billing is fixed
    "not_found_error": "not_found",
    "model_not_found": "not_found",
    "rate_limit_error": "rate_limit",
    "rate_limit_exceeded": "rate_limit",
    "api_error": "server_error",  # Anthropic 500
    "server_error": "server_error",
    "overloaded_error": "server_error",  # Anthropic 529
    "timeout_error": "timeout",  # Anthropic 504
    "context_length_exceeded": "context_window",
    "content_filter": "content_filter",
    "content_policy_violation": "content_filter",
}


class CallError(DatagenError):
    """A failed call, classified. ``retry_after`` is in seconds, from the provider."""

    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: float | None = None,
                 rate_limits: RateLimitInfo | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.rate_limits = rate_limits
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
    lowered: dict[str, Any] = {}
    for name, value in headers.items():  # a name sent twice: its first value, whichever
        lowered.setdefault(str(name).lower(), value)  # client read the headers
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


# What a server's validation of the request body says (pydantic, FastAPI): llama.cpp's
# server answers a field it does not take with a 500 whose body is such an error
_INVALID_REQUEST = re.compile(
    r"\b\d+ validation errors?\b|Input should be |Extra inputs are not permitted|"
    r"Field required|extra fields not permitted|\(['\"]body['\"], |\[['\"]body['\"], ")


def invalid_request(kind: str, status: int | None, message: str) -> str:
    """``bad_request`` for a 4xx/5xx whose message is a validation error of the request
    (asking again cannot help), else ``kind``."""
    if kind in ("server_error", "error") and status is not None and status >= 400 and \
            _INVALID_REQUEST.search(message):
        return "bad_request"
    return kind


def kind_for_error_type(name: object) -> str | None:
    """The kind of a provider's error type or code (``"rate_limit_error"``), or None
    when it is not one datagen knows."""
    return ERROR_TYPE_KINDS.get(name) if isinstance(name, str) else None
