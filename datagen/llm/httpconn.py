"""One keep-alive HTTP/1.1 connection of datagen's client (:mod:`datagen.llm.http1`): an
asyncio protocol that feeds what arrives to httptools' parser and hands the finished
answer (status, decoded body, headers) to the request waiting on it."""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from datagen.llm.http1 import _Pool


class HTTPError(Exception):
    """Below HTTP: the connection failed, was lost, or the answer was not HTTP."""


class HTTPTimeout(HTTPError):
    pass


class Headers(dict[str, str]):
    """Response headers by lower-case name (a repeated one: its values joined by ", ")."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


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
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.begun = False  # a response has started arriving
        self.keep_alive = False  # the last answer leaves the connection open
        self.until_eof = False  # no Content-Length, not chunked: the body ends at EOF

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
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
        self._reset()
        self.begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        names = {name.lower() for name, _ in self.headers}
        self.until_eof = b"content-length" not in names and \
            b"transfer-encoding" not in names and self.status >= 200 and \
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
        headers = Headers()
        for raw_name, raw_value in self.headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            before = dict.get(headers, name)
            dict.__setitem__(headers, name, value if before is None else f"{before}, {value}")
        body = b"".join(self.body)
        try:
            body = _decoded(body, dict.get(headers, "content-encoding"))
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
        return not self.lost and self.transport is not None and \
            not self.transport.is_closing() and self.keep_alive

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


def _decoded(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity" or not body:
        return body
    if encoding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:  # raw deflate, without the zlib header (some servers)
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise zlib.error(f"unsupported content-encoding {encoding!r}")
