"""An endpoint's rate limits as its response headers state them -> :class:`RateLimitInfo`.

Two dialects:

- Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}``; a reset is an RFC 3339 time (``2026-11-22T10:15:00Z``).
- OpenAI (and the servers that copy it): ``x-ratelimit-{limit,remaining,reset}-
  {requests,tokens}``; a reset is a duration (``1s``, ``6m0s``, ``20ms``).

Headers are informative, never trusted: a value that cannot be read is None, never an
error. Names are looked up as written here (lower case): pass aiohttp's headers (case
insensitive) or a dict with lower-case names.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import lru_cache

from datagen.llm.types import RateLimitInfo

# RateLimitInfo field prefix -> the header's name for it
_ANTHROPIC_LIMITS = {"requests": "requests", "tokens": "tokens",
                     "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
_OPENAI_LIMITS = ("requests", "tokens")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(\.\d+)?([Zz]|[+-]\d\d:?\d\d)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number == number and abs(number) != float("inf") else None


@lru_cache(maxsize=256)
def rfc3339_timestamp(value: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (no offset: UTC), or None."""
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    day, clock, fraction, offset = match.groups()
    if offset is None or offset in ("Z", "z"):
        offset = "+00:00"
    elif ":" not in offset:
        offset = f"{offset[:3]}:{offset[3:]}"
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}{offset}")
    except ValueError:
        return None
    return moment.astimezone(timezone.utc).timestamp() + (float(fraction) if fraction else 0.0)


@lru_cache(maxsize=256)
def duration_seconds(value: str) -> float | None:
    """Seconds in a Go-style duration (``1s``, ``6m0s``, ``1h2m3.5s``, ``20ms``) or a plain
    number of seconds, or None."""
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, position = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            return None
        total += float(part.group(1)) * _UNIT_S[part.group(2)]
        position = part.end()
    return total if position == len(text) and position > 0 else None


def _until(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    when = rfc3339_timestamp(value)
    return None if when is None else max(0.0, when - now)


def _info(fields: dict[str, int | float | None]) -> RateLimitInfo | None:
    if all(v is None for v in fields.values()):
        return None
    return RateLimitInfo(**fields)  # type: ignore[arg-type]


def from_anthropic_headers(headers: Mapping[str, str] | None, now: float | None = None
                           ) -> RateLimitInfo | None:
    """Anthropic's ``anthropic-ratelimit-*`` headers, or None when there are none.
    ``now`` (seconds since the epoch) is when the response was read: the default is now."""
    if not headers or ("anthropic-ratelimit-requests-remaining" not in headers
                       and "anthropic-ratelimit-tokens-remaining" not in headers
                       and "anthropic-ratelimit-input-tokens-remaining" not in headers):
        return None
    now = time.time() if now is None else now
    fields: dict[str, int | float | None] = {}
    for field, name in _ANTHROPIC_LIMITS.items():
        prefix = f"anthropic-ratelimit-{name}-"
        fields[f"{field}_limit"] = _count(headers.get(prefix + "limit"))
        fields[f"{field}_remaining"] = _count(headers.get(prefix + "remaining"))
        fields[f"{field}_reset_s"] = _until(headers.get(prefix + "reset"), now)
    return _info(fields)


def from_openai_headers(headers: Mapping[str, str] | None) -> RateLimitInfo | None:
    """OpenAI's ``x-ratelimit-*`` headers, or None when there are none."""
    if not headers or ("x-ratelimit-remaining-requests" not in headers
                       and "x-ratelimit-remaining-tokens" not in headers):
        return None  # the common case of a server that sends none: one lookup
    fields: dict[str, int | float | None] = {}
    for field in _OPENAI_LIMITS:
        reset = headers.get(f"x-ratelimit-reset-{field}")
        fields[f"{field}_limit"] = _count(headers.get(f"x-ratelimit-limit-{field}"))
        fields[f"{field}_remaining"] = _count(headers.get(f"x-ratelimit-remaining-{field}"))
        fields[f"{field}_reset_s"] = None if reset is None else duration_seconds(reset)
    return _info(fields)
