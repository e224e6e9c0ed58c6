"""One keep-alive HTTP/1.1 connection of datagen's client (:mod:`datagen.llm.http1`): an
asyncio protocol that feeds what arrives to httptools' parser and hands the finished
answer (status, decoded body, headers) to the request waiting on it."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from datagen.llm.http1 import _Pool


class HTTPError(Exception):
    """Below HTTP: the connection failed, was lost, or the answer was not HTTP."""


class HTTPTimeout(HTTPError):
    pass


class Headers(Mapping[str, str]):
    """Response headers, looked up by name in any case (a name sent twice: its first
    value). Kept as the bytes that arrived, each decoded when it is read: a provider
    sends ~20 headers and a call reads two or three."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict[bytes, bytes] | None = None) -> None:
        self._raw = raw if raw is not None else {}

    @staticmethod
    def _name(key: str) -> bytes:
        return key.lower().encode("latin-1", "replace")

    def __getitem__(self, key: str) -> str:
        return _text(self._raw[self._name(key)])

    def get(self, key: str, default: Any = None) -> Any:
        value = self._raw.get(self._name(key))
        return default if value is None else _text(value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._name(key) in self._raw

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:  # HTTP's own charset
        return value.decode("latin-1")


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes, Headers]] | None = None
        self.deadline = 0.0
        self.timeout = 0.0
        self.lost = False
        self.counted = False  # holds one of its pool's places
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.begun = False  # a response has started arriving
        self.keep_alive = False  # the last answer leaves the connection open
        self.until_eof = False  # no Content-Length, not chunked: the body ends at EOF

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for (a second answer to one
            self.close()  # request): the connection can no longer be trusted
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HTTPError("the server switched protocols (101): not an HTTP/1.1 API"))
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(f"the server's answer is not valid HTTP/1.1: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.waiter is not None and not self.waiter.done():
            if self.begun and self.until_eof and exc is None:
                self.on_message_complete()  # its body ended with the connection
            else:
                why = f": {exc}" if exc else ""
                what = "in the middle of the answer" if self.begun else "before answering"
                self._fail(HTTPError(f"the server closed the connection {what}{why}"))

    # ---- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter is None:  # a second answer to one request, in the same packet
            self.close()
        self._reset()
        self.begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # a name given twice keeps its first value, as aiohttp's headers.get() reads it
        # (joined, a Retry-After sent twice would read "2, 2": no number at all)
        self.headers.setdefault(name.lower(), value)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.until_eof = b"content-length" not in self.headers and \
            b"transfer-encoding" not in self.headers and self.status >= 200 and \
            self.status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # 1xx: an interim answer (103 Early Hints): the real one follows
            return
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        headers = Headers(self.headers)
        body = b"".join(self.body)
        self.begun = False  # (a failure from here on is before the next answer)
        try:
            body = _decoded(body, headers.get("content-encoding"))
        except zlib.error as exc:
            waiter.set_exception(HTTPError(f"the server's compressed body is broken: {exc}"))
            return
        waiter.set_result((self.status, body, headers))

    # ---- ours -------------------------------------------------------------------------

    def _fail(self, exc: HTTPError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def timed_out(self) -> None:
        self._fail(HTTPTimeout(f"no answer within {self.timeout:g}s"))

    def reusable(self) -> bool:
        """Open, kept alive by the server, and with nothing of the last request still
        unsent (a server may answer before it read the whole body, then close)."""
        return not self.lost and self.transport is not None and \
            not self.transport.is_closing() and self.keep_alive and \
            not self.transport.get_write_buffer_size()

    def close(self) -> None:
        """At once: abort(), not close(). close() waits to send what is still buffered
        (a server that stopped reading: forever) or for TLS's goodbye (up to 30 s), and
        the connection's place in the pool comes free only when it is gone; the rest of
        a request given up must not reach the server either."""
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


def _decoded(body: bytes, encoding: str | None) -> bytes:
    """The body without its content-encoding: every gzip member (RFC 1952 allows several
    in a row), and nothing cut short or left over (zlib.decompress alone returns the first
    member and ignores what follows: a wrong answer, quietly)."""
    encoding = encoding.strip().lower() if encoding else encoding
    if not encoding or encoding == "identity" or not body:
        return body
    if encoding == "gzip":
        parts = []
        while body:
            data, body = _inflate(body, 16 + zlib.MAX_WBITS)
            parts.append(data)
        return b"".join(parts)
    if encoding == "deflate":
        try:
            data, rest = _inflate(body, zlib.MAX_WBITS)
        except zlib.error:  # raw deflate, without the zlib header (some servers)
            data, rest = _inflate(body, -zlib.MAX_WBITS)
        if rest:
            raise zlib.error(f"{len(rest)} bytes after the end of the deflate stream")
        return data
    raise zlib.error(f"unsupported content-encoding {encoding!r}")


def _inflate(body: bytes, wbits: int) -> tuple[bytes, bytes]:
    """One compressed stream from the start of ``body``: its data and what follows it."""
    stream = zlib.decompressobj(wbits)
    data = stream.decompress(body)
    if not stream.eof:
        raise zlib.error("the compressed body is cut short")
    return data, stream.unused_data
