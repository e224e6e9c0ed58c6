"""Serving an aiohttp app from a background thread on 127.0.0.1: :class:`ThreadedServer`
runs the app on an event loop of its own in a daemon thread, so sync and async tests can
use a fake server alike, and gives it ``start``, ``stop`` and the context-manager protocol.
It knows no API: a subclass adds its routes in :meth:`ThreadedServer.install` (the fake
OpenAI server in :mod:`datagen.testing.fake_server`, and every fake built on it, do).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, TypeVar

S = TypeVar("S", bound="ThreadedServer")


class ThreadedServer:
    """An aiohttp app on ``host:port`` served from a thread; ``port=0`` picks a free port
    (``port`` holds the real one once started)."""

    label = "HTTP"  # in messages and the thread's name
    client_max_size = 64 * 1024 * 1024  # the largest request body accepted, in bytes

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the fake server listens on 127.0.0.1 only")
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def install(self, app: Any) -> None:
        """Add every route to ``app`` (an ``aiohttp.web.Application``): a subclass's job."""

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=self.client_max_size)
        self.install(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server: Any = site._server  # aiohttp keeps the listening sockets there
        sockets = server.sockets if server is not None else []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() in the calling thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self: S) -> S:
        self._thread = threading.Thread(target=self._thread_main,
                                        name=f"fake-{self.label.lower()}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the fake {self.label} server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the fake {self.label} server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
