"""Calling the user's functions (extractors, validators, input processors, on_record)
so that none of them can hang or crash a run.

- A sync function runs on a worker thread, off the event loop: a blocking one cannot
  freeze the run, and Ctrl+C keeps working.
- Every call has a timeout (``run.user_code_timeout``); a timeout or an exception is a
  :class:`UserCodeError` with the function's name, which the engine records as that
  item's failure (``error.function`` in the failures file).
- datagen's own extractors (:class:`datagen.extract.Extractor`) are trusted: they run
  inline, so the hot path pays no thread hand-off for them.

The worker threads are daemon threads of a pool written here, not a
``concurrent.futures.ThreadPoolExecutor``: that one joins its threads at interpreter exit,
so a user function stuck forever would keep the process from ever exiting after Ctrl+C.
A thread whose call timed out is abandoned (Python cannot kill it) and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from datagen.errors import DatagenError

MAX_THREADS = 32


class UserCodeError(DatagenError):
    """A user function raised or timed out; ``kind`` is the role it plays (extraction,
    validation, input_processor, on_record). ``rejects``: it said the answer is wrong (an
    ExtractionError, e.g. "no <draft> block"), as opposed to a fault of the code itself
    (any other exception, a timeout), after which the answer may be fine."""

    def __init__(self, kind: str, message: str, function: str,
                 rejects: bool = False) -> None:
        super().__init__(message)
        self.kind, self.message, self.function = kind, message, function
        self.rejects = rejects


def function_name(fn: Any) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__qualname__", None) or \
        getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


@lru_cache(maxsize=512)
def _arity(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` takes (None: any number). Cached: it runs for
    every item, and inspect.signature costs more than the call."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return max(1, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


def arguments(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """As many of ``args`` as ``fn`` takes."""
    try:
        arity = _arity(fn)
    except TypeError:  # an unhashable callable: work it out every time
        arity = _arity.__wrapped__(fn)
    return args if arity is None else args[:arity]


def is_trusted(fn: Any) -> bool:
    """datagen's own extractors: pure, fast, and safe to run on the event loop."""
    return bool(getattr(fn, "datagen_builtin", False))


def is_async(fn: Any) -> bool:
    call = type(fn).__dict__.get("__call__")  # an object whose __call__ is async
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


class _DaemonPool:
    """A few daemon threads running sync user functions for the event loop."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._idle == 0 and self._threads < MAX_THREADS:
                self._threads += 1
                threading.Thread(target=self._work, name="datagen-user-code",
                                 daemon=True).start()
            else:
                self._idle = max(0, self._idle - 1)
        self._jobs.put((loop, future, fn, args))
        return future

    def abandon(self) -> None:
        """A thread is stuck in a call that timed out: let a new one take its place."""
        with self._lock:
            self._threads -= 1

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._jobs.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            # its loop closed (the run ended; a call that timed out came back late): nobody
            # waits for it, and the thread goes on to serve the next one
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)
            with self._lock:
                self._idle += 1


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out or cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_POOL = _DaemonPool()


async def _with_timeout(awaitable: Any, timeout: float | None) -> Any:
    """``await awaitable`` with a timeout. ``asyncio.timeout`` where it exists (3.11+):
    ``wait_for`` before 3.12 loses a cancellation that races with the awaited thing
    finishing, and a lost cancellation keeps a stopped run going."""
    scope = getattr(asyncio, "timeout", None)
    if scope is None:  # Python 3.10
        return await asyncio.wait_for(awaitable, timeout)
    async with scope(timeout):
        return await awaitable


async def call_user(fn: Callable[..., Any], *args: Any, kind: str,
                    timeout: float | None) -> Any:
    """Call a user's function (sync or async, with as many of ``args`` as it takes) with
    a timeout; a timeout or an exception raises :class:`UserCodeError`."""
    args = arguments(fn, args)
    name = function_name(fn)
    try:
        if is_trusted(fn):
            return fn(*args)
        if is_async(fn):
            return await _with_timeout(fn(*args), timeout)
        future = _POOL.submit(asyncio.get_running_loop(), fn, args)
        try:
            result = await _with_timeout(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            _POOL.abandon()
            raise
        if inspect.isawaitable(result):  # a sync callable that returned a coroutine
            result = await _with_timeout(result, timeout)
        return result
    except asyncio.TimeoutError:
        raise UserCodeError(kind, f"the {kind} function {name} did not return within "
                            f"{timeout:g} s (run.user_code_timeout)", name) from None
    except UserCodeError:
        raise
    except DatagenError as exc:  # e.g. ExtractionError: the function's own message
        raise UserCodeError(kind, str(exc), name, rejects=True) from None
    except Exception as exc:
        raise UserCodeError(kind, f"{type(exc).__name__}: {exc}", name) from None
