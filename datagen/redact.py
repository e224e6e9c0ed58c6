"""Keep API keys out of everything datagen writes: logs, records, manifests, messages.

Secrets are registered once (the configured api_key, and the provider key variables of
the environment, which litellm may read by itself); :func:`redact` replaces each with a
marker. It is applied to every log line written to the run's log file and to every error
message that reaches a file.
"""

from __future__ import annotations

import os
import re

_MARK = "<redacted>"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_ENV_NAME = re.compile(r"(API_KEY|_TOKEN|_SECRET|ACCESS_KEY|_KEY)$", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("EMPTY", "none") would redact ordinary words


def register(secret: str | None) -> None:
    """Treat ``secret`` as a value that must never be written anywhere."""
    global _pattern
    if not secret or len(secret) < MIN_SECRET_LENGTH or secret in _secrets:
        return
    _secrets.add(secret)
    ordered = sorted(_secrets, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def register_environment() -> None:
    """Register the values of environment variables that look like credentials."""
    for name, value in os.environ.items():
        if _ENV_NAME.search(name):
            register(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``<redacted>``."""
    if _pattern is None or not text:
        return text
    return _pattern.sub(_MARK, text)
