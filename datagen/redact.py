"""Keep credentials out of everything datagen writes: logs, records, manifests, messages.

Secrets are registered once per pipeline: every credential anywhere in the configuration
(the key of the main model and of every named model, credential-like headers and
``extra_params`` entries at any depth, the user name, password and query values of a
``base_url``) and the provider key variables of the environment, which litellm may read
by itself. :func:`redact` replaces each with a marker; every file datagen writes (records,
failures, manifest, log, debug and meta files, the report) and every message it prints
passes through it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

_MARK = "<redacted>"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_bpattern: re.Pattern[bytes] | None = None
_lock = threading.Lock()
_ENV_NAME = re.compile(r"(API_KEY|_TOKEN|_SECRET|ACCESS_KEY|_KEY)$", re.IGNORECASE)
CREDENTIAL_NAME = re.compile(r"(key|token|secret|auth|passw|credential|signature|sig\b|"
                             r"session|cookie|bearer)", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("EMPTY", "none") would redact ordinary words


def register(secret: str | None) -> None:
    """Treat ``secret`` as a value that must never be written anywhere."""
    global _pattern, _bpattern
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        return
    with _lock:
        variants = {secret, secret.strip()} - _secrets
        variants = {v for v in variants if len(v) >= MIN_SECRET_LENGTH}
        if not variants:
            return
        _secrets.update(variants)
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))
        _bpattern = re.compile(b"|".join(re.escape(s.encode("utf-8")) for s in ordered))


def register_environment() -> None:
    """Register the values of environment variables that look like credentials."""
    for name, value in os.environ.items():
        if _ENV_NAME.search(name):
            register(value)


def register_url(url: str | None) -> None:
    """A URL's user name, password and query values (``?key=...``)."""
    if not url:
        return
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    for value in (parts.username, parts.password):
        if value:
            register(value)
            register(unquote(value))
    for _, value in parse_qsl(parts.query, keep_blank_values=False):
        register(value)
    if parts.query:
        for raw in parts.query.split("&"):  # the encoded form, as it appears in the URL
            register(raw.partition("=")[2])


def register_credentials(data: Any, name: str = "") -> None:
    """Every value under a credential-like name (key, token, secret, auth...) at any
    depth of ``data``; every URL-looking string's user info and query."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            register_credentials(value, str(key))
        return
    if isinstance(data, (list, tuple)):
        for value in data:
            register_credentials(value, name)
        return
    if isinstance(data, str):
        if CREDENTIAL_NAME.search(name):
            register(data)
            register(data.removeprefix("Bearer ").strip())
        if "://" in data:
            register_url(data)


def register_model(model: Mapping[str, Any]) -> None:
    """The credentials of one model's settings (a dict, secrets in plain text)."""
    register_credentials(model.get("api_key"), "api_key")
    register_url(model.get("base_url"))
    register_credentials(model.get("headers") or {}, "headers")
    register_credentials(model.get("extra_params") or {}, "extra_params")


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``<redacted>``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(_MARK, text)


def redact_bytes(data: bytes) -> bytes:
    """``redact`` for bytes (JSONL lines), without decoding them."""
    pattern = _bpattern
    if pattern is None or not data:
        return data
    return pattern.sub(_MARK.encode(), data)


def secrets() -> Iterable[str]:
    """The registered secrets (for the test kit's cassette scrubber)."""
    return tuple(_secrets)


class RedactingFilter(logging.Filter):
    """Redacts a log record's message before any handler sees it (the run's log file,
    a user's own stderr handler, pytest's capture)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pattern is not None:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """A datagen logger whose records are redacted at the source (a filter on a logger
    applies to its own records only, so every datagen logger gets one)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
