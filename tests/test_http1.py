"""datagen's own HTTP/1.1 client (datagen/llm/http1.py) against servers that answer in
every way HTTP allows, and badly: the same outcome as through aiohttp, every time.

Each case runs through ``wire.post`` with both clients (``DATAGEN_HTTP_CLIENT``), so a
difference in what either makes of an answer (a status, a body, an error kind) fails here.
The servers are raw asyncio servers on 127.0.0.1 speaking bytes, so nothing between the
test and the client smooths an answer over.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from datagen.llm import http1, wire
from datagen.llm.errors import CallError
from datagen.llm.http1 import HTTPClient, use_aiohttp

CLIENTS = ["datagen", "aiohttp"]
DATA = Path(__file__).parent / "data"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]],
                   Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """One request off the connection: method, target, headers (lower case), body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), value.strip())
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return {"method": method, "target": target, "headers": headers, "body": body,
            "raw_head": head}


def response(status: int = 200, body: bytes = b'{"ok": true}',
             headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Server:
    """Answers each request with ``handler``; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[dict[str, Any]] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, tls: ssl.SSLContext | None = None) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                await self.handler(reader, writer, request)
                if writer.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def answer(data: bytes, close: bool = False) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: dict[str, Any]) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()
    return handle


def answer_after(delay: float) -> Handler:
    """A plain 200, ``delay`` seconds after each request."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: dict[str, Any]) -> None:
        await asyncio.sleep(delay)
        writer.write(response())
        await writer.drain()
    return handle


@pytest.fixture(params=CLIENTS)
def client_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATAGEN_HTTP_CLIENT", request.param)
    return str(request.param)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        servers.append(await Server(handler).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.stop()


async def post(url: str, body: bytes = b'{"q": 1}', timeout: float = 5.0,
               headers: dict[str, str] | None = None, limit: int = 8,
               client_headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    session = wire.open_session(limit, client_headers or {"Content-Type": "application/json"})
    try:
        return await wire.post(session, url, body, timeout, headers)
    finally:
        await session.close()


async def kind_of(coro: Awaitable[Any]) -> CallError:
    with pytest.raises(CallError) as caught:
        await coro
    return caught.value


def test_which_client() -> None:
    assert not use_aiohttp()


async def test_the_chosen_client_is_used(client_kind: str) -> None:
    session = wire.open_session(4, {})
    try:
        assert isinstance(session, HTTPClient) == (client_kind == "datagen")
    finally:
        await session.close()


async def test_a_cassette_recorder_gets_aiohttp(tmp_path: Path) -> None:
    """vcrpy replaces aiohttp's request method while a cassette is in use: the transports
    must go through aiohttp then, or the cassette would never see a request."""
    import vcr

    assert not use_aiohttp()
    with vcr.VCR(record_mode="none").use_cassette(str(tmp_path / "c.yaml")):
        assert use_aiohttp()
    assert not use_aiohttp()


@pytest.mark.parametrize("method", ["_request", "post"])
async def test_a_mock_of_aiohttp_gets_aiohttp(monkeypatch: pytest.MonkeyPatch,
                                             method: str) -> None:
    from unittest import mock

    import aiohttp

    assert not use_aiohttp()
    monkeypatch.setattr(aiohttp.ClientSession, method, mock.AsyncMock())
    assert use_aiohttp()


async def test_plain_answers_keep_one_connection(client_kind: str, serve: Any) -> None:
    server = await serve(answer(response(body=b'{"a": 1}', headers={"X-Thing": "y"})))
    session = wire.open_session(8, {"Content-Type": "application/json",
                                    "Authorization": "Bearer sk-1"})
    try:
        for _ in range(5):
            status, body, headers = await wire.post(session, server.url("/v1/x?key=1"),
                                                    b'{"q": 2}', 5.0)
            assert (status, body, headers.get("x-thing"), headers.get("X-Thing")) == \
                (200, b'{"a": 1}', "y", "y")
    finally:
        await session.close()
    assert server.connections == 1
    first = server.requests[0]
    assert (first["method"], first["target"], first["body"]) == ("POST", "/v1/x?key=1",
                                                                 b'{"q": 2}')
    assert first["headers"]["authorization"] == "Bearer sk-1"
    assert first["headers"]["host"] == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("shape", ["chunked", "gzip", "deflate", "raw-deflate", "eof",
                                   "interim", "split"])
async def test_every_body_shape_reads_the_same(client_kind: str, serve: Any,
                                               shape: str) -> None:
    payload = b'{"choices": [{"message": {"content": "' + b"x" * 3000 + b'"}}]}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: dict[str, Any]) -> None:
        if shape == "chunked":
            chunks = [payload[i:i + 700] for i in range(0, len(payload), 700)]
            data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            writer.write(response(body=data, headers={"Transfer-Encoding": "chunked"},
                                  length=False))
        elif shape in ("gzip", "deflate", "raw-deflate"):
            if shape == "gzip":
                packed = gzip.compress(payload)
            elif shape == "deflate":
                packed = zlib.compress(payload)
            else:
                squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
                packed = squeeze.compress(payload) + squeeze.flush()
            encoding = "gzip" if shape == "gzip" else "deflate"
            writer.write(response(body=packed, headers={"Content-Encoding": encoding}))
        elif shape == "eof":  # no length, not chunked: the body is what comes until EOF
            writer.write(response(body=payload, length=False))
            await writer.drain()
            writer.close()
            return
        elif shape == "interim":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + response(
                body=payload))
        else:  # the answer arrives a few bytes at a time
            data = response(body=payload)
            for i in range(0, len(data), 97):
                writer.write(data[i:i + 97])
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()

    server = await serve(handle)
    for _ in range(2):  # and again, on the same connection where it stays open
        status, body, _ = await post(server.url())
        assert (status, body) == (200, payload)


@pytest.mark.parametrize("shape", ["two-members", "trailing-garbage", "cut-short"])
async def test_gzip_bodies_whole_or_refused(client_kind: str, serve: Any, shape: str,
                                            request: pytest.FixtureRequest) -> None:
    """Every gzip member is read (RFC 1952 allows several); bytes after the last one, or
    a member cut short, make the answer a connection error, never part of it."""
    whole = b'{"text": "' + b"word " * 200 + b'"}'
    body = {"two-members": gzip.compress(whole[:40]) + gzip.compress(whole[40:]),
            "trailing-garbage": gzip.compress(whole) + b"GARBAGE",
            "cut-short": gzip.compress(whole)[:-6]}[shape]
    if shape == "cut-short" and client_kind == "aiohttp":  # runs, and must fail
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "aiohttp returns what a cut-short gzip body held, as if it were whole")))
    server = await serve(answer(response(body=body, headers={"Content-Encoding": "gzip"})))
    if shape == "two-members":
        assert (await post(server.url()))[1] == whole
    else:
        err = await kind_of(post(server.url()))
        assert err.kind == "connection"


@pytest.mark.parametrize(("script", "kind"), [
    (b"", "connection"),  # closed before answering
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut", "connection"),  # midway
    (b"SSH-2.0-OpenSSH_9.6\r\n", "connection"),  # not HTTP at all
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Encoding: gzip\r\n\r\nnope",
     "connection"),  # a compressed body that is not
])
async def test_broken_answers_are_connection_errors(client_kind: str, serve: Any,
                                                    script: bytes, kind: str) -> None:
    server = await serve(answer(script, close=True))
    err = await kind_of(post(server.url()))
    assert err.kind == kind and err.retryable


@pytest.mark.parametrize("apart", [False, True])
async def test_a_second_answer_to_one_request_is_never_the_next_ones(
        client_kind: str, serve: Any, apart: bool, request: pytest.FixtureRequest) -> None:
    """A server that answers one request twice (together, or the extra one later): the
    next request must get its own answer, never the stale extra."""
    count = 0

    async def twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    asked: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        first = response(body=b'{"n": %d}' % count)
        extra = response(body=b'{"n": "stale"}')
        writer.write(first if apart else first + extra)
        await writer.drain()
        if apart:
            await asyncio.sleep(0.05)
            writer.write(extra)
            await writer.drain()

    if apart and client_kind == "aiohttp":  # runs, and must fail: if aiohttp mends it, see
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "aiohttp hands the stale extra answer to the next request (aiohttp 3.14): one "
            "reason the fast transports use their own client")))
    server = await serve(twice)
    session = wire.open_session(4, {})
    try:
        first = await wire.post(session, server.url(), b"{}", 5.0)
        await asyncio.sleep(0.1)
        second = await wire.post(session, server.url(), b"{}", 5.0)
    finally:
        await session.close()
    assert first[1] == b'{"n": 1}' and second[1] == b'{"n": 2}'


async def test_a_connection_lost_before_its_request_fails_fast_and_frees_its_place(
        serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server closes a new connection (or sends bytes unasked) in the moment between
    the connect and the request: the request fails as a connection error at once, not at
    its timeout, and its place in the pool is free again. (The moment is made here by
    running the protocol's connection_lost before the connect returns: with a real
    server it happens when the event loop runs the close before the waiting task.)"""
    server = await serve(answer(response()))
    loop = asyncio.get_running_loop()
    real = loop.create_connection

    async def spoiled(factory: Any, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await real(factory, *args, **kwargs)
        transport.close()
        protocol.connection_lost(None)
        return transport, protocol

    monkeypatch.setattr(loop, "create_connection", spoiled)
    client = HTTPClient(1, {})
    try:
        for _ in range(2):  # a leaked place would make the second wait out its timeout
            started = loop.time()
            with pytest.raises(http1.HTTPError, match="closed the connection"):
                await client.post(server.url(), b"{}", 5.0)
            assert loop.time() - started < 2.0
        assert next(iter(client._pools.values())).open == 0
    finally:
        await client.close()


async def test_a_waiter_cancelled_as_its_turn_came_passes_the_turn_on(serve: Any) -> None:
    """Limit 1: A holds the connection, B and C wait. A finishes (its connection goes to
    B), and B is cancelled before it runs: C must get the connection now, not wait out
    its timeout behind a turn nobody took. (Python 3.11's wait_for lets B keep a turn
    that came with its cancellation, so there this cannot go wrong; 3.12's lets the
    cancellation win, and the turn must be passed on.)"""
    server = await serve(answer_after(0.05))
    client = HTTPClient(1, {})
    loop = asyncio.get_running_loop()
    try:
        a = asyncio.ensure_future(client.post(server.url(), b"{}", 30.0))
        await asyncio.sleep(0.01)
        b = asyncio.ensure_future(client.post(server.url(), b"{}", 30.0))
        c = asyncio.ensure_future(client.post(server.url(), b"{}", 30.0))
        await asyncio.sleep(0.01)
        pool = next(iter(client._pools.values()))
        turn = pool.waiters[0]
        turn.add_done_callback(lambda _: b.cancel())  # B's turn came: B is cancelled
        assert (await a)[0] == 200
        started = loop.time()
        assert (await asyncio.wait_for(c, 10.0))[0] == 200
        assert loop.time() - started < 2.0
        assert b.cancelled() or (b.done() and b.result()[0] == 200)  # (3.11's wait_for may
        # let a task whose turn came keep it, cancelled or not: either way, nothing stuck)
    finally:
        await client.close()


async def test_a_server_that_never_answers_times_out(client_kind: str, serve: Any) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    server = await serve(hang)
    loop = asyncio.get_running_loop()
    started = loop.time()
    err = await kind_of(post(server.url(), timeout=0.3))
    assert err.kind == "timeout" and err.retryable
    assert loop.time() - started < 3.0


async def test_nothing_listening_is_a_connection_error(client_kind: str) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    err = await kind_of(post(f"http://127.0.0.1:{port}/v1/chat/completions"))
    assert err.kind == "connection"


async def test_a_redirect_is_an_error_naming_where(client_kind: str, serve: Any) -> None:
    server = await serve(answer(response(301, b"", {"Location": "https://elsewhere/v1"})))
    err = await kind_of(post(server.url().replace("http://", "http://bob:s3cret@")))
    assert "s3cret" not in err.message and f"http://127.0.0.1:{server.port}/v1" in err.message
    assert err.kind == "not_found" and err.fatal and err.status == 301
    assert "https://elsewhere/v1" in err.message and "base_url" in err.message
    assert len(server.requests) == 1  # not followed


async def test_a_closing_server_gets_a_new_connection_each_time(client_kind: str,
                                                                serve: Any) -> None:
    server = await serve(answer(response(headers={"Connection": "close"}), close=True))
    session = wire.open_session(4, {})
    try:
        for _ in range(3):
            assert (await wire.post(session, server.url(), b"{}", 5.0))[0] == 200
    finally:
        await session.close()
    assert server.connections == 3


async def test_no_more_connections_than_the_limit(client_kind: str, serve: Any) -> None:
    server = await serve(answer_after(0.02))
    session = wire.open_session(3, {})
    try:
        answers = await asyncio.gather(*(wire.post(session, server.url(), b"{}", 10.0)
                                         for _ in range(20)))
    finally:
        await session.close()
    assert [a[0] for a in answers] == [200] * 20
    assert server.most_open <= 3 and len(server.requests) == 20


async def test_a_request_header_replaces_the_clients(client_kind: str, serve: Any) -> None:
    server = await serve(answer(response()))
    await post(server.url(), headers={"x-api-key": "request"},
               client_headers={"X-Api-Key": "client", "anthropic-version": "2023-06-01"})
    raw = server.requests[0]["raw_head"].lower()
    assert raw.count(b"x-api-key") == 1 and b"x-api-key: request" in raw
    assert b"anthropic-version: 2023-06-01" in raw


async def test_framing_headers_are_the_clients_own(client_kind: str, serve: Any) -> None:
    """A Host given in the config (a gateway routing by name) replaces the URL's; a
    Content-Length given is not sent twice."""
    server = await serve(answer(response()))
    await post(server.url(), b"12345", client_headers={"Host": "gateway.local",
                                                       "Content-Length": "99"})
    raw = server.requests[0]["raw_head"].lower()
    assert raw.count(b"host:") == 1 and b"host: gateway.local" in raw
    assert raw.count(b"content-length") == 1 and server.requests[0]["body"] == b"12345"


async def test_closing_the_client_stops_what_waits_for_a_place(serve: Any) -> None:
    server = await serve(answer_after(0.2))
    client = HTTPClient(1, {})
    tasks = [asyncio.ensure_future(client.post(server.url(), b"{}", 5.0)) for _ in range(3)]
    await asyncio.sleep(0.05)  # one in flight, two waiting for the one place
    await client.close()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, http1.HTTPError) and "closed" in str(o) for o in outcomes)
    await asyncio.sleep(0.3)
    assert len(server.requests) == 1 and server.open_now == 0


async def test_a_task_cancelled_as_its_turn_comes_sends_nothing(client_kind: str,
                                                                  serve: Any) -> None:
    """Limit 1: A holds the connection, B waits for it; A's task cancels B in the very
    step it gets its answer (the connection goes to B then). B must end cancelled with
    nothing sent (through asyncio.wait_for, Python 3.11 let it go on and send)."""
    server = await serve(answer_after(0.05))
    session = wire.open_session(1, {})
    b: asyncio.Future[Any] | None = None

    async def first() -> int:
        status = (await wire.post(session, server.url(), b"{}", 5.0))[0]
        assert b is not None
        b.cancel()
        return int(status)

    try:
        a = asyncio.ensure_future(first())
        await asyncio.sleep(0.01)
        b = asyncio.ensure_future(wire.post(session, server.url(), b"{}", 5.0))
        await asyncio.sleep(0.01)
        assert await a == 200
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.sleep(0.1)
        assert len(server.requests) == 1
        assert (await wire.post(session, server.url(), b"{}", 5.0))[0] == 200
    finally:
        await session.close()


async def test_an_answer_before_the_body_was_read_leaves_the_connection(
        client_kind: str) -> None:
    """A server answers 413 after reading only the head of a 4 MB request, then closes:
    the connection, its body still unsent, is not reused, and the next request gets its
    own answer."""
    async def serve_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                          ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"x-big" in head.lower():
            writer.write(response(413, b'{"error": {"message": "too large"}}'))
            await writer.drain()
            writer.close()
            return
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(response())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve_early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
    session = wire.open_session(4, {})
    try:
        big = await wire.post(session, url, b"x" * (4 << 20), 5.0, {"X-Big": "1"})
        small = await wire.post(session, url, b"{}", 5.0)
    finally:
        await session.close()
        server.close()
    assert (big[0], small[0]) == (413, 200)


async def test_a_header_sent_twice_reads_as_its_first_value(client_kind: str,
                                                            serve: Any) -> None:
    """Retry-After twice ("2", then "9") reads as 2 seconds through either client (joined,
    "2, 9" was no number at all); a case-shouting Content-Encoding still decodes."""
    data = b"Retry-After: 2\r\nretry-after: 9\r\nContent-Encoding: GZIP\r\n"
    packed = gzip.compress(b'{"x": 1}')
    server = await serve(answer(b"HTTP/1.1 200 OK\r\n" + data + b"Content-Length: %d\r\n\r\n"
                                % len(packed) + packed))
    status, body, headers = await post(server.url())
    from datagen.llm.errors import parse_retry_after

    assert (status, body, parse_retry_after(headers)) == (200, b'{"x": 1}', 2.0)


async def test_a_switch_of_protocols_is_a_connection_error(client_kind: str,
                                                           serve: Any) -> None:
    server = await serve(answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                b"Connection: Upgrade\r\n\r\n\x00\x00\x12", close=True))
    err = await kind_of(post(server.url()))
    assert err.kind == "connection"


async def test_a_request_given_up_frees_its_place_at_once() -> None:
    """A server that accepts and never reads: a 48 MB request times out, and its pool
    place (limit 1) is free for the next request at once (the connection is aborted, not
    closed: a close would wait forever to send the rest of the body)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []

    async def accept() -> None:
        while True:
            held.append((await loop.sock_accept(listener))[0])  # never read

    acceptor = asyncio.ensure_future(accept())
    client = HTTPClient(1, {})
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/x"
    try:
        with pytest.raises(http1.HTTPTimeout):
            await client.post(url, b"x" * (48 << 20), 0.3)
        await asyncio.sleep(0.05)
        assert next(iter(client._pools.values())).open == 0
        with pytest.raises(http1.HTTPTimeout) as second:  # its own timeout, not a place's
            await client.post(url, b"{}", 0.3)
        assert "waiting for a connection" not in str(second.value)
    finally:
        acceptor.cancel()
        await client.close()
        for sock in held:
            sock.close()
        listener.close()


async def test_credentials_in_the_url_are_basic_auth(client_kind: str, serve: Any) -> None:
    """``https://user:pass@host/v1`` (a server behind basic auth) sends them as Basic
    auth, as aiohttp does; never in the Host header or the request line."""
    import base64

    server = await serve(answer(response()))
    url = server.url().replace("http://", "http://bob:s%40cret@")
    await post(url, client_headers={})
    raw = server.requests[0]["raw_head"]
    assert server.requests[0]["headers"]["authorization"] == \
        "Basic " + base64.b64encode(b"bob:s@cret").decode()
    assert b"bob" not in raw.split(b"\r\n", 1)[0] and \
        server.requests[0]["headers"]["host"] == f"127.0.0.1:{server.port}"


async def test_a_header_with_a_line_break_is_refused(client_kind: str, serve: Any) -> None:
    server = await serve(answer(response()))
    session = wire.open_session(1, {})
    try:
        for _ in range(3):  # and it keeps no place of the pool (limit 1) for itself
            err = await kind_of(wire.post(session, server.url(), b"{}", 2.0,
                                          {"X-Bad": "a\r\nInjected: yes"}))
            assert err.kind == "error" and not server.requests
        assert (await wire.post(session, server.url(), b"{}", 2.0))[0] == 200
    finally:
        await session.close()


async def test_a_cancelled_request_frees_its_connection(serve: Any) -> None:
    server = await serve(answer_after(0.3))
    client = HTTPClient(1, {})
    try:
        task = asyncio.ensure_future(client.post(server.url(), b"{}", 5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the one place in the pool is free again, on a new connection (the old one's
        # answer would arrive out of turn)
        status, _, _ = await client.post(server.url(), b"{}", 5.0)
    finally:
        await client.close()
    assert status == 200 and server.connections == 2


async def test_tls_with_a_trusted_certificate(client_kind: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS through the system trust store (here pointed at a test certificate by
    SSL_CERT_FILE); an untrusted certificate is a connection error, never ignored.
    (tests/data holds a self-signed certificate for 127.0.0.1, made for this test only.
    aiohttp reads the trust store once, when it is imported: the trusted half is ours.)"""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(DATA / "tls_127001.pem", DATA / "tls_127001.key")
    server = await Server(answer(response(body=b'{"tls": 1}'))).start(tls)
    try:
        err = await kind_of(post(server.url(scheme="https")))
        assert err.kind == "connection" and "certificate" in err.message.lower()
        if client_kind == "aiohttp":
            return
        monkeypatch.setenv("SSL_CERT_FILE", str(DATA / "tls_127001.pem"))
        status, body, _ = await post(server.url(scheme="https"))
        assert (status, body) == (200, b'{"tls": 1}')
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_new_event_loop_gets_new_connections(kind: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """A transport outlives one asyncio.run (a pipeline run twice): its client belongs to
    the first loop, and the second run must not touch those connections."""
    async def once(session: Any, server: Server) -> Any:
        session = wire.session_for(session, 4, {})
        assert (await wire.post(session, server.url(), b"{}", 5.0))[0] == 200
        return session

    async def both() -> None:
        server = await Server(answer(response())).start()
        try:
            first = await once(None, server)
            assert wire.session_for(first, 4, {}) is first
            await first.close()
        finally:
            await server.stop()

    monkeypatch.setenv("DATAGEN_HTTP_CLIENT", kind)
    asyncio.run(both())

    async def again(old: Any) -> None:  # the first loop's client, in a second loop
        server = await Server(answer(response())).start()
        try:
            fresh = await once(old, server)
            assert fresh is not old
            await fresh.close()
        finally:
            await server.stop()

    if kind == "datagen":
        held: list[Any] = []

        async def keep() -> None:
            server = await Server(answer(response())).start()
            try:
                held.append(await once(None, server))
            finally:
                await server.stop()

        asyncio.run(keep())
        asyncio.run(again(held[0]))
    else:  # an aiohttp session left open by a loop that ended (a stand-in: a real one
        # would be reported unclosed at exit)
        import types

        ended = asyncio.new_event_loop()
        ended.close()
        asyncio.run(again(types.SimpleNamespace(closed=False, _loop=ended)))

    async def later() -> None:
        server = await Server(answer(response())).start()
        old = HTTPClient(4, {})
        await old.close()
        try:
            fresh = wire.session_for(old, 4, {})
            assert fresh is not old
            assert (await wire.post(fresh, server.url(), b"{}", 5.0))[0] == 200
            await fresh.close()
        finally:
            await server.stop()

    asyncio.run(later())


def test_urls_frame_as_http_wants() -> None:
    assert http1._target("https://api.openai.com/v1/chat/completions") == (
        "https", "api.openai.com", 443, b"/v1/chat/completions", b"api.openai.com", b"")
    assert http1._target("http://[::1]:8080/v1/x?api-version=2024") == (
        "http", "::1", 8080, b"/v1/x?api-version=2024", b"[::1]:8080", b"")
    with pytest.raises(http1.HTTPError):
        http1._target("ftp://host/x")
