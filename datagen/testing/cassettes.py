"""Record and replay a pipeline's HTTP traffic with vcrpy, with no secret on disk.

- Requests match on method, path and body (not host or port), so a cassette recorded
  against one server replays anywhere, and concurrent requests each get their own answer
  instead of the answers in recording order.
- Credential headers are dropped before a cassette is written; secrets datagen knows of
  are scrubbed from request and response bodies too.
- Replay mode is ``none``: a request the cassette lacks fails at once, it never reaches
  the network. Run with ``max_retries=0`` so a miss is reported on the first attempt; the
  failure's message begins with how to re-record (``DATAGEN_RECORD=1``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from datagen.redact import redact

SECRET_HEADERS = (
    "authorization", "api-key", "x-api-key", "anthropic-api-key", "x-goog-api-key",
    "openai-organization", "openai-project", "cookie", "set-cookie", "proxy-authorization",
)  # fmt: skip
SECRET_QUERY = ("key", "api_key", "api-key", "token")
MATCH_ON = ("method", "path", "body")
RECORD_ENV = "DATAGEN_RECORD"


def recording_requested() -> bool:
    """True when ``DATAGEN_RECORD=1``: cassettes are (re)written from live traffic."""
    return os.environ.get(RECORD_ENV, "") not in ("", "0", "false", "False")


def _scrub_request(request: Any) -> Any:
    for name in list(getattr(request, "headers", {}) or {}):
        value = request.headers[name]
        if isinstance(value, str):  # a credential in a header of any name
            request.headers[name] = redact(value)
    body = request.body
    if isinstance(body, bytes):
        request.body = redact(body.decode("utf-8", "replace")).encode("utf-8")
    elif isinstance(body, str):
        request.body = redact(body)
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    body = response.get("body", {})
    raw = body.get("string")
    if isinstance(raw, bytes):
        body["string"] = redact(raw.decode("utf-8", "replace")).encode("utf-8")
    for name in list(response.get("headers", {})):
        if name.lower() in SECRET_HEADERS:
            del response["headers"][name]
    return response


def miss_hint(cassette: Any, reason: str | None = None) -> str:
    """What a replay without the request's answer means, and how to (re-)record."""
    path = getattr(cassette, "_path", None) or "the cassette"
    how = f"{RECORD_ENV}=1 pytest ... (with a server answering at the test's base_url)"
    if reason == "cassette_not_found":
        return f"there is no cassette at {path} yet. Record it: {how}"
    if reason == "already_played":
        return (f"{path} holds this request, but its answer was played already (the test "
                f"sends it more often than when it was recorded). Re-record it: {how}")
    return (f"this request is not in {path}: the prompt, the model or a parameter changed "
            f"since it was recorded. Re-record it: {how}")


@lru_cache(maxsize=1)
def _install_miss_hint() -> None:
    """vcrpy's "can't overwrite existing cassette" error, raised for a request a cassette
    lacks, reaches the user wrapped as a connection error: make it say first how datagen
    re-records (vcrpy's own text, about its record modes, follows)."""
    import importlib

    from vcr.errors import CannotOverwriteExistingCassetteException as Miss

    class CassetteMiss(Miss):  # type: ignore[misc]  # vcrpy has no type hints
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            first = str(self.args[0]) if self.args else ""
            hint = miss_hint(self.cassette, getattr(self, "reason", None))
            self.args: tuple[str, ...] = (f"{hint}\n{first}",)

    for name in ("vcr.stubs", "vcr.stubs.aiohttp_stubs", "vcr.stubs.httpx_stubs"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # that client is not installed: nothing of it to patch
            continue
        if getattr(module, "CannotOverwriteExistingCassetteException", None) is Miss:
            module.CannotOverwriteExistingCassetteException = CassetteMiss  # type: ignore[attr-defined]


def make_vcr(cassette_dir: str | Path, record: bool | None = None) -> Any:
    """A configured ``vcr.VCR``. ``record`` defaults to :func:`recording_requested`."""
    try:
        import vcr
    except ImportError:
        raise ImportError(
            "cassettes need vcrpy: pip install 'datagen[dev]' (or pip install vcrpy)"
        ) from None
    record = recording_requested() if record is None else record
    _install_miss_hint()
    return vcr.VCR(
        cassette_library_dir=str(cassette_dir),
        record_mode="all" if record else "none",
        match_on=MATCH_ON,
        filter_headers=list(SECRET_HEADERS),
        filter_query_parameters=list(SECRET_QUERY),
        before_record_request=_scrub_request,
        before_record_response=_scrub_response,
        decode_compressed_response=True,
    )
