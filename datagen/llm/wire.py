"""What the fast transports share on the wire: one POST, and a body read without trust.

:func:`post` sends one request (never retried here) and turns every failure below HTTP
(timeout, refused, reset, anything else) into a :class:`CallError`. Whatever a 200 body
holds (not JSON, a list where an object belongs, a token count of ``"n/a"``), the readers
here raise a :class:`CallError` of kind ``malformed_response`` that says what was wrong,
never an AttributeError or TypeError from deep inside the parsing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import orjson

from datagen.llm.errors import CallError
from datagen.llm.http1 import HTTPClient, HTTPError, HTTPTimeout, aiohttp_patched, use_aiohttp
from datagen.redact import redact

_PREVIEW = 120


def open_session(pool_size: int, headers: Mapping[str, str], track_sends: bool = False
                 ) -> Any:
    """The fast transports' HTTP client: datagen's own (:mod:`datagen.llm.http1`), or an
    aiohttp session when aiohttp must see the requests (a cassette recorder or a mock
    patched it, or ``DATAGEN_HTTP_CLIENT=aiohttp``). With ``track_sends`` (the endpoint
    has a rate window), each request tells the window the moment it is written, so one
    that waited on a new connection or on the event loop counts from when it really went
    out. (On aiohttp, a request class, not a TraceConfig: any trace config makes aiohttp
    signal every event of every request, ~0.1 ms of CPU per call.)"""
    if not use_aiohttp():
        from datagen.llm.throttle import mark_sent

        return HTTPClient(pool_size, headers, mark_sent if track_sends else None)
    import aiohttp

    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=pool_size,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    request_class = _tracked_request() if track_sends else aiohttp.ClientRequest
    sent = {k: v for k, v in headers.items()  # the length is the body's, always
            if k.lower() not in ("content-length", "transfer-encoding")}
    return aiohttp.ClientSession(connector=connector, headers=sent,
                                 request_class=request_class)


def session_for(session: Any, pool_size: int, headers: Mapping[str, str],
                track_sends: bool = False) -> Any:
    """``session`` if it can serve the next request (open, of this event loop, of the
    kind wanted now: aiohttp while it is patched, datagen's own otherwise), else a new
    one (the old one closed, when it belongs to this loop)."""
    if session is not None and not session.closed:
        if isinstance(session, HTTPClient):
            if session.loop is asyncio.get_running_loop() and not aiohttp_patched():
                return session  # (the environment's choice was read when it was made)
            if session.loop is asyncio.get_running_loop():
                _close_later(session)
        elif getattr(session, "_loop", None) is not asyncio.get_running_loop():
            pass  # an aiohttp session of an earlier event loop: it cannot serve this one
        elif use_aiohttp():
            return session
        else:
            _close_later(session)
    return open_session(pool_size, headers, track_sends)


_CLOSING: set[asyncio.Future[Any]] = set()  # held until done (the loop keeps only weak refs)


def _close_later(session: Any) -> None:
    task = asyncio.ensure_future(session.close())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


@lru_cache(maxsize=1)
def _tracked_request() -> Any:
    import aiohttp

    from datagen.llm.throttle import mark_sent

    class TrackedRequest(aiohttp.ClientRequest):
        async def write_bytes(self, *args: Any, **kwargs: Any) -> Any:
            mark_sent()  # the request goes out now (its headers wait for the body; see
            return await super().write_bytes(*args, **kwargs)  # litellm_transport)

    return TrackedRequest


def join_url(base: str, path: str) -> str:
    """``base`` + ``path``, keeping a query of the base at the end (``https://host/v1?key=x``
    + ``/chat/completions`` -> ``https://host/v1/chat/completions?key=x``: gateways and
    Azure-style endpoints put a version or a key there)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


def preview(value: Any) -> str:
    """A short, printable form of a value, for error messages."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "..."


def malformed(what: str) -> CallError:
    return CallError("malformed_response", redact(f"malformed response: {what}"))


def load_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object. A body that is not JSON at all (cut off, an HTML error
    page from a proxy) is a server fault, ``server_error``, as litellm reports it too; a
    JSON body of the wrong shape is ``malformed_response``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CallError("server_error", redact(f"the response is not valid JSON ({exc}): "
                                               f"{preview(raw)}")) from None
    if not isinstance(body, dict):
        raise malformed(f"the body is a JSON {type(body).__name__}, not an object: "
                        f"{preview(body)}")
    return body


def field_of(parent: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``parent[key]`` when it is a ``kind`` (None when absent or null)."""
    value = parent.get(key)
    if value is not None and not isinstance(value, kind):
        raise malformed(f"{where}{key} is a {type(value).__name__}, not a {kind.__name__}: "
                        f"{preview(value)}")
    return value


def token_count(usage: dict[str, Any], key: str, where: str = "usage.") -> int:
    """A token count from a usage object: 0 when absent or null; a whole number >= 0,
    else the response is malformed."""
    value = usage.get(key)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise malformed(f"{where}{key} is not a token count: {preview(value)}")
    return value


async def post(session: Any, url: str, data: bytes, timeout: float,
               headers: Mapping[str, str] | None = None) -> tuple[int, bytes, Any]:
    """One POST with ``session`` (see :func:`open_session`): the status, the body and the
    headers. A redirect is an error naming where it points: an API's POST cannot follow
    one (a client that did would resend it as a GET), and base_url is what to fix."""
    try:
        if isinstance(session, HTTPClient):
            answer = await session.post(url, data, timeout, headers)
        else:
            answer = await _aiohttp_post(session, url, data, timeout, headers)
    except (asyncio.TimeoutError, HTTPTimeout):
        raise CallError("timeout", f"no answer within {timeout:g}s") from None
    except HTTPError as exc:  # refused, reset, closed midway, not HTTP
        raise CallError("connection", redact(str(exc))) from None
    except CallError:
        raise
    except Exception as exc:  # anything else below us (a cassette miss, a proxy hook):
        # an item-level error, as litellm reports it, never a crash of the run
        raise CallError("error", redact(f"{type(exc).__name__}: {exc}")) from None
    status = answer[0]
    if status < 200:  # a final 1xx: the server switched protocols
        raise CallError("connection", f"the server answered {status} (switching "
                        "protocols): not an HTTP/1.1 API")
    if 300 <= status < 400 and status != 304:
        where = answer[2].get("Location") or "(no Location given)"
        raise CallError("not_found", redact(
            f"{status}: the server redirects {_shown(url)} to {where}; set model.base_url "
            "to the address it points to"), status)
    return answer


def _shown(url: str) -> str:
    """``url`` without credentials in it (``https://user:pass@host`` -> ``https://host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))


async def _aiohttp_post(session: Any, url: str, data: bytes, timeout: float,
                        headers: Mapping[str, str] | None) -> tuple[int, bytes, Any]:
    import aiohttp

    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.read(), response.headers
    except aiohttp.ClientError as exc:  # refused, reset, DNS, an answer that is not HTTP
        # (aiohttp reports its parser's complaint as a ClientResponseError "400": the
        # server's status never reaches here, raise_for_status being off)
        raise CallError("connection", redact(f"{type(exc).__name__}: {exc}")) from None
