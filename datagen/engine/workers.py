"""The worker pool: a fixed number of workers pull items from the source, one at a time,
and hand each to the item runner; never one task per item. Signals stop it cleanly.

Faults: a bad item, template or data-pool error, or a call error no retry can fix (401,
404) stops the pool: workers take no new items (in-flight ones finish, or are cancelled
for a fatal call error or a write error) and the error is raised. The first Ctrl+C or
SIGTERM stops taking new items and gives in-flight ones ``shutdown_timeout`` seconds; a
second one cancels them at once. Either way the files stay valid and the run can be
resumed.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable

from datagen.errors import RunAbortedError
from datagen.pool import PoolItem
from datagen.redact import get_logger
from datagen.seen import KeyIndex
from datagen.source import ItemSource

log = get_logger("datagen.engine")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(handler: Callable[[int], None]) -> Callable[[], None]:
    """Call ``handler(sig)`` on Ctrl+C or SIGTERM while the running loop runs (only in
    the main thread, where the loop can take signals); returns the function that undoes
    it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, handler, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not on this loop
            continue

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return restore


class WorkerPool:
    def __init__(self, source: ItemSource, process: Callable[[PoolItem], Awaitable[None]],
                 concurrency: int, done: KeyIndex, shutdown_timeout: float,
                 on_skip: Callable[[], None]) -> None:
        self.source, self.process, self.concurrency = source, process, concurrency
        self.done, self.shutdown_timeout, self.on_skip = done, shutdown_timeout, on_skip
        self.stopping = False
        self.interrupts = 0
        self.signal: int | None = None  # the last stop signal received
        self._workers: list[asyncio.Future[None]] = []

    async def run(self) -> None:
        restore = self._install_signals()
        try:
            await self._work()
        finally:
            restore()

    async def _work(self) -> None:
        self._workers = [asyncio.ensure_future(self._worker())
                         for _ in range(self.concurrency)]
        try:
            pending: set[asyncio.Future[None]] = set(self._workers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                faults = [t.exception() for t in done
                          if not t.cancelled() and t.exception() is not None]
                if not faults:
                    continue
                self.stopping = True
                if isinstance(faults[0], RunAbortedError):
                    for task in pending:  # no retry can help: stop paying now
                        task.cancel()
                # otherwise (a bad item or template, a full disk) the others finish what
                # they hold: those answers are paid for already, and reach the cache
                await asyncio.gather(*pending, return_exceptions=True)
                raise faults[0]  # type: ignore[misc]
        finally:
            # stopping first: a worker whose cancellation was swallowed (asyncio.wait_for
            # on Python < 3.12 loses one that races with completion) still takes no new item
            self.stopping = True
            self._cancel_all()
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def _worker(self) -> None:
        while not self.stopping:
            item = await self.source.next()
            if item is None:
                return
            if self.done and item.key in self.done:
                self.on_skip()
                continue
            await self.process(item)

    # ---- signals ---------------------------------------------------------------------

    def _install_signals(self) -> Callable[[], None]:
        return on_stop_signals(self._on_signal)

    def _on_signal(self, sig: int) -> None:
        self.interrupts += 1
        self.signal = sig
        self.stopping = True
        name = signal.Signals(sig).name
        if self.interrupts == 1:
            log.warning("%s: taking no new items; waiting up to %.0fs for the %d in flight "
                        "(Ctrl+C again to stop at once)", name, self.shutdown_timeout,
                        sum(not w.done() for w in self._workers))
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self._cancel_all)
        else:
            self._cancel_all()

    def _cancel_all(self) -> None:
        for task in self._workers:
            if not task.done():
                task.cancel()
