"""A lean HTTP/1.1 client for the fast transports: keep-alive connections pooled per
origin, one write per request, the response parsed by httptools (llhttp, the C parser
uvicorn uses: status line, headers, Content-Length and chunked bodies).

Written by hand because no library does this job cheaply: aiohttp's ``ClientSession``
spends ~90 us of CPU on every request beyond the socket work (request and response
objects, header multidicts, cookie jar, tracing signals, a timer per request), which was
the larger part of a whole fast-path call at 0 ms latency (measured against the fake
server: datagen's OpenAI transport on aiohttp 143 us of CPU per call, on this client 57 us;
``python -m benchmarks.hotpath``).
httpx and the openai SDK cost more than aiohttp. Parsing, the part that must be exactly
right, is httptools'; what is here is the pool, the framing of one POST, and timeouts.

What it does, as the aiohttp session it replaces did: TLS with the system's trust store
(``ssl.create_default_context()``), gzip and deflate bodies, a total timeout per request
(including the connection), a connection the server closes (``Connection: close``,
keep-alive expiry) never reused. What it does not: cookies, proxies, HTTP/2, redirects (a
3xx is returned as it is; :func:`datagen.llm.wire.post` makes it an error naming where
the server points). Whenever aiohttp itself has been patched (vcrpy's cassettes,
aioresponses, a mock of ``ClientSession._request`` or ``.post``), or
``DATAGEN_HTTP_CLIENT=aiohttp`` is set, the transports use an aiohttp
session instead, so those tools see every request (:func:`use_aiohttp`).

Timeouts are checked by one watchdog per client, every tenth of the shortest timeout in
flight (at least every 50 ms, at most every second), instead of a timer per request: a
request times out at most that much late.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import sys
import types
from collections import deque
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

from datagen.llm.httpconn import Connection, Headers, HTTPError, HTTPTimeout

__all__ = ["HTTPClient", "HTTPError", "HTTPTimeout", "Headers", "aiohttp_patched",
           "use_aiohttp"]
USER_AGENT = "datagen"
_CRLF = b"\r\n"


def use_aiohttp() -> bool:
    """True when requests must go through aiohttp: asked for by the environment, or
    aiohttp's request method was replaced (a cassette recorder or a mock is listening)."""
    if os.environ.get("DATAGEN_HTTP_CLIENT", "").strip().lower() == "aiohttp":
        return True
    return aiohttp_patched()


_PLAIN: list[Any] = []  # aiohttp's own methods, once seen unpatched


def aiohttp_patched() -> bool:
    """Whether aiohttp's request methods (``ClientSession._request``, which vcrpy and
    aioresponses replace, and ``ClientSession.post``) are not aiohttp's own (checked
    before every request: one identity test once the plain methods were seen)."""
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is None:  # not even imported: nobody patched it
        return False
    session = getattr(aiohttp, "ClientSession", None)
    methods = (getattr(session, "_request", None), getattr(session, "post", None))
    if _PLAIN and methods[0] is _PLAIN[0] and methods[1] is _PLAIN[1]:
        return False
    patched = not all(_aiohttp_own(method) for method in methods)
    if not patched:
        _PLAIN[:] = list(methods)
    return patched


def _aiohttp_own(method: Any) -> bool:
    code = getattr(method, "__code__", None)  # a wrapper has its own; a mock, a fake one
    return type(code) is types.CodeType and \
        os.path.basename(os.path.dirname(code.co_filename)) == "aiohttp"


class _Pool:
    """The connections to one origin: at most ``limit`` open, the idle ones reused."""

    def __init__(self, client: HTTPClient, scheme: str, host: str, port: int) -> None:
        self.client, self.scheme, self.host, self.port = client, scheme, host, port
        self.idle: list[Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def forget(self, conn: Connection) -> None:
        """A connection was closed: no longer idle, and its place is free."""
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake()

    def _wake(self) -> None:
        """A connection came back or a place came free: the longest waiter tries again."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def take(self, deadline: float, timeout: float) -> Connection:
        """A connection for one request: an idle one, else a new one while there is a
        place, else the next one given back. Waits end at ``deadline``; a cancellation
        always wins (asyncio.wait_for, on Python 3.10 and 3.11, lets a task cancelled
        as its wait ended go on and send: it is not used here)."""
        loop = self.client.loop
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.reusable():
                    return conn
                conn.close()
            if self.open < self.client.limit:
                break
            waiter = loop.create_future()
            self.waiters.append(waiter)
            alarm = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake()  # the turn handed to us, unused: the next waiter's
                elif waiter in self.waiters:
                    self.waiters.remove(waiter)
                if isinstance(exc, HTTPTimeout):
                    raise HTTPTimeout(f"no answer within {timeout:g}s (waiting for a "
                                      "connection)") from None
                raise
            finally:
                alarm.cancel()
            if self.client.closed:
                raise HTTPError("the HTTP client was closed")
        self.open += 1
        try:
            conn = await self._connect(deadline, timeout)
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        if conn.lost or self.client.closed:  # closed (or it sent something unasked)
            conn.close()  # before we could use it, or the client closed meanwhile
            self.open -= 1
            self._wake()
            raise HTTPError("the HTTP client was closed" if self.client.closed else
                            f"{self.host}:{self.port} closed the connection at once")
        conn.counted = True
        return conn

    async def _connect(self, deadline: float, timeout: float) -> Connection:
        loop = self.client.loop
        task = asyncio.ensure_future(loop.create_connection(
            lambda: Connection(self), self.host, self.port,
            ssl=self.client.tls() if self.scheme == "https" else None,
            server_hostname=self.host if self.scheme == "https" else None))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        except BaseException:  # cancelled: the connection, if it still comes, is closed
            _abandon(task)
            raise
        if not done:
            _abandon(task)
            raise HTTPTimeout(f"no answer within {timeout:g}s (connecting to "
                              f"{self.host}:{self.port})")
        try:
            _, conn = task.result()
        except (OSError, ValueError) as exc:  # refused, DNS, TLS (ssl.SSLError)
            raise HTTPError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def give_back(self, conn: Connection) -> None:
        if conn.reusable() and not self.client.closed:
            self.idle.append(conn)
            self._wake()
        else:
            conn.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(HTTPTimeout("waiting for a connection"))


def _abandon(task: asyncio.Future[Any]) -> None:
    """Give up a connect: cancelled, and closed should it complete all the same."""
    task.cancel()

    def close(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result()[0].close()

    task.add_done_callback(close)


@lru_cache(maxsize=256)
def _target(url: str) -> tuple[str, str, int, bytes, bytes, bytes]:
    """scheme, host, port, the request target (path and query), the Host header, and the
    Authorization line of credentials in the URL (``https://user:pass@host/v1``: Basic
    auth, as aiohttp sent them; b"" without)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise HTTPError(f"not an http(s) URL: {url}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    auth = b""
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = b"Authorization: Basic " + base64.b64encode(pair.encode()) + _CRLF
    return (scheme, host, port, target.encode("latin-1"),
            (shown if port == default else f"{shown}:{port}").encode("latin-1"), auth)


_FRAMING = {"host", "content-length", "transfer-encoding"}  # the client writes these


def _host_of(headers: Mapping[str, str]) -> bytes | None:
    """A Host header the caller gave (a gateway routing by name), else None."""
    for name, value in headers.items():
        if name.lower() == "host":
            return str(value).encode("latin-1")
    return None


def _header_lines(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if name.lower() in _FRAMING:
            continue
        text = f"{name}: {value}"
        if "\r" in text or "\n" in text:
            raise ValueError(f"the header {name!r} holds a line break")
        lines.append(text.encode("latin-1"))
    return b"".join(line + _CRLF for line in lines)


class HTTPClient:
    """POSTs over pooled keep-alive connections, ``limit`` at most per origin. One per
    transport and event loop (a new loop starts with new connections)."""

    def __init__(self, limit: int, headers: Mapping[str, str],
                 on_send: Callable[[], None] | None = None) -> None:
        self.limit = max(1, limit)
        self._headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate",
                         **headers}
        self._fixed = _header_lines(self._headers)
        self._host = _host_of(self._headers)
        self.on_send = on_send
        self.closed = False
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._tls: ssl.SSLContext | None = None
        self._inflight: set[Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = 1.0

    def tls(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def post(self, url: str, body: bytes, timeout: float,
                   headers: Mapping[str, str] | None = None) -> tuple[int, bytes, Headers]:
        """One POST: the status, the (decoded) body, the headers. Raises HTTPError."""
        if self.closed:
            raise HTTPError("the HTTP client is closed")
        scheme, host, port, target, host_header, auth = _target(url)
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            pool = self._pools[scheme, host, port] = _Pool(self, scheme, host, port)
        lines = self._fixed if not headers else self._merged(headers)  # (may refuse them:
        host_header = (_host_of(headers) if headers else None) or self._host or host_header
        if auth and b"\nauthorization:" not in b"\n" + lines.lower():  # the URL's user
            lines += auth
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            target, host_header, lines, len(body))  # before a connection is taken)
        loop = self.loop
        deadline = loop.time() + timeout
        conn = await pool.take(deadline, timeout)
        waiter = conn.waiter = loop.create_future()
        conn.deadline = deadline
        self._watch(conn, timeout)
        try:
            if self.on_send is not None:
                self.on_send()
            assert conn.transport is not None
            conn.transport.write(head + body)
            result: tuple[int, bytes, Headers] = await waiter
        except BaseException:
            conn.close()  # a request cut off midway: the connection is in no known state
            raise
        finally:
            self._inflight.discard(conn)
        pool.give_back(conn)
        return result

    def _merged(self, headers: Mapping[str, str]) -> bytes:
        """The client's headers with this request's (a name given again: this one)."""
        names = {name.lower() for name in headers}
        return _header_lines({**{k: v for k, v in self._headers.items()
                                 if k.lower() not in names}, **headers})

    def _watch(self, conn: Connection, timeout: float) -> None:
        self._inflight.add(conn)
        conn.timeout = timeout
        tick = min(1.0, max(0.05, timeout / 10))
        if self._watchdog is None or tick < self._tick:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._tick = tick
            self._watchdog = self.loop.call_later(tick, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self._inflight if c.deadline <= now]:
            self._inflight.discard(conn)
            conn.timed_out()
        self._watchdog = None
        if self._inflight:
            self._watchdog = self.loop.call_later(self._tick, self._check)
        else:
            self._tick = 1.0

    async def close(self) -> None:
        self.closed = True
        if self.loop.is_closed():  # its connections went with their loop
            self._pools.clear()
            self._inflight.clear()
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        for conn in list(self._inflight):
            conn._fail(HTTPError("the HTTP client was closed"))
        for pool in self._pools.values():  # those waiting for a place: told, they stop
            for waiter in pool.waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._pools.clear()
