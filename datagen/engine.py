"""The engine: a fixed pool of workers that carries each item from the pool to the disk.

The path of one item (DESIGN.md): pull from the pool (shape checked, key assigned) ->
skip it if its key is already in the results file -> render the prompt -> cache? ->
throttle -> call -> retry -> extract -> one line appended to results (or failures) ->
display. ``concurrency`` workers pull one item at a time, so records stream to disk from
the first second and memory holds only the items in flight, never one task per item.

Faults: a bad item, template or data-pool error, or a call error no retry can fix (401,
404) stops the run: workers take no new items (in-flight ones finish, or are cancelled
for a fatal call error) and the error is raised. Everything else is an item fault: a line
in the failures file, and the run goes on. The first Ctrl+C stops taking new items and
gives in-flight ones ``shutdown_timeout`` seconds; a second one cancels them at once.
Either way the files stay valid and the run can be resumed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datagen import redact
from datagen.cache import request_key
from datagen.errors import DatagenError, RunAbortedError, a_type
from datagen.llm.caller import Caller
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion
from datagen.pool import ItemSource, PoolItem
from datagen.progress import Display
from datagen.prompts import ChatPrompt
from datagen.store import JsonlSink, RunFiles, dumps_line, iso_now, write_manifest

log = logging.getLogger("datagen.engine")
ExtractFunction = Callable[[str], Any]


@dataclass
class RunContext:
    """What one run shares between its workers and does not change while it runs."""

    prompt: ChatPrompt
    extractor: ExtractFunction | None
    caller: Caller
    build_request: Callable[[list[dict[str, str]]], ChatRequest]
    files: RunFiles
    results_sink: JsonlSink
    failures_sink: JsonlSink
    display: Display
    prechecked: bool
    collect: bool = True
    done_keys: set[str] = field(default_factory=set)
    cache_salt: str = ""
    shutdown_timeout: float = 30.0
    fatal_message: Callable[[CallError], str] = str
    manifest_base: dict[str, Any] = field(default_factory=dict)
    on_record: Callable[[dict[str, Any]], Any] | None = None  # sync or async


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # already in the results file of the run being resumed
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl+C: raised after the in-flight items are written (or cancelled) and the
    manifest says ``interrupted``; uncaught, Python exits with status 130."""


class Engine:
    def __init__(self, ctx: RunContext, source: ItemSource) -> None:
        self.ctx = ctx
        self.source = source
        self.counts = Counts()
        self.results: dict[int, dict[str, Any]] = {}
        self.stopping = False
        self.interrupts = 0
        self._workers: list[asyncio.Future[None]] = []
        self._started_at = iso_now()
        self._t0 = time.monotonic()

    # ---- the run ---------------------------------------------------------------------

    async def run(self, concurrency: int, total: int | None) -> None:
        status, error = "running", None
        self.write_manifest(status, None)
        self.ctx.display.start(total)
        restore = self._install_sigint()
        try:
            await self._work(concurrency)
            status = "interrupted" if self.interrupts else "completed"
        except DatagenError as exc:
            status = "failed"
            error = {"kind": getattr(exc, "kind", type(exc).__name__),
                     "message": redact.redact(str(exc))}
            log.error("run stopped: %s", error["message"])
            raise
        except BaseException as exc:  # cancellation, or a bug: the files stay valid
            status = "interrupted"
            error = {"kind": type(exc).__name__, "message": redact.redact(str(exc))}
            raise
        finally:
            restore()
            self.ctx.results_sink.close()
            self.ctx.failures_sink.close()
            self.ctx.display.close(self.counts.succeeded, self.counts.failed, self.summary())
            self.write_manifest(status, error)
            log.info("run %s: %s", status, self.summary())
        if self.interrupts:
            raise RunInterrupted(
                f"interrupted: {self.counts.succeeded} records written to "
                f"{self.ctx.files.results}; resume=True continues the run"
            )

    async def _work(self, concurrency: int) -> None:
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(concurrency)]
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
                # otherwise (a bad item or template) the others finish what they hold
                await asyncio.gather(*pending, return_exceptions=True)
                raise faults[0]  # type: ignore[misc]
        finally:
            for task in self._workers:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)

    # ---- Ctrl+C ----------------------------------------------------------------------

    def _install_sigint(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError):  # not on this platform / loop
            return lambda: None

        def restore() -> None:
            loop.remove_signal_handler(signal.SIGINT)

        return restore

    def _on_sigint(self) -> None:
        self.interrupts += 1
        self.stopping = True
        if self.interrupts == 1:
            log.warning("interrupted: taking no new items; waiting up to %.0fs for the %d in "
                        "flight (Ctrl+C again to stop at once)", self.ctx.shutdown_timeout,
                        sum(not w.done() for w in self._workers))
            asyncio.get_running_loop().call_later(self.ctx.shutdown_timeout, self._cancel_all)
        else:
            self._cancel_all()

    def _cancel_all(self) -> None:
        for task in self._workers:
            if not task.done():
                task.cancel()

    # ---- one item --------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self.stopping:
            item = await self.source.next()
            if item is None:
                return
            if item.key in self.ctx.done_keys:
                self.counts.skipped += 1
                continue
            if not self.ctx.prechecked:
                self.ctx.prompt.check(item.user_kwargs, item.system_kwargs, f"item {item.index}")
            await self._process(item)

    async def _process(self, item: PoolItem) -> None:
        ctx = self.ctx
        messages = ctx.prompt.messages(item.user_kwargs, item.system_kwargs,
                                       f"item {item.index}")
        request = ctx.build_request(messages)
        cache_key = (request_key(request, f"{ctx.cache_salt}|{item.occurrence}")
                     if ctx.caller.cache is not None else None)
        try:
            completion, attempts = await ctx.caller.call(request, cache_key)
        except CallError as err:
            if err.fatal:
                raise RunAbortedError(ctx.fatal_message(err), err.kind) from None
            self._fail(item, err.kind, err.message, err.attempts)
            return
        try:
            output: Any = completion.text
            if ctx.extractor is not None:
                output = ctx.extractor(completion.text)
                if inspect.isawaitable(output):
                    output = await output
        except Exception as exc:  # the user's extractor: whatever it raises fails the item
            reason = f"{type(exc).__name__}: {exc}"
            if completion.finish_reason == "length":
                reason += " (the response was cut off at max_tokens: raise max_tokens)"
            self._fail(item, "extraction", reason, attempts, completion)
            return
        record = make_record(item, output, completion, attempts)
        try:
            line = dumps_line(record)
        except TypeError as exc:
            self._fail(item, "serialization",
                       f"the extractor returned {a_type(output)} that cannot be written as "
                       f"JSON ({exc}); return dicts, lists, strings, numbers or a pydantic "
                       "model", attempts, completion)
            return
        ctx.results_sink.write_line(line)
        self.counts.succeeded += 1
        self.counts.latency_total += completion.latency_s
        if ctx.collect:
            self.results[item.index] = record
        ctx.display.update(self.counts.succeeded, self.counts.failed)
        if ctx.on_record is not None:
            returned = ctx.on_record(record)
            if inspect.isawaitable(returned):
                await returned

    def _fail(self, item: PoolItem, kind: str, message: str, attempts: int,
              completion: Completion | None = None) -> None:
        message = redact.redact(message)
        record = base_record(item)
        record["error"] = {"kind": kind, "message": message, "attempts": attempts}
        if completion is not None:
            record["raw_response"] = completion.text
            record["finish_reason"] = completion.finish_reason
        try:
            line = dumps_line(record)
        except TypeError:  # an unserialisable item value: keep what can be kept
            record = {"index": item.index, "key": item.key, "error": record["error"],
                      "user_prompt_kwargs": repr(item.user_kwargs),
                      "system_prompt_kwargs": repr(item.system_kwargs)}
            line = dumps_line(record)
        self.ctx.failures_sink.write_line(line)
        self.counts.failed += 1
        self.counts.failed_by_kind[kind] += 1
        log.warning("item %d failed (%s) after %d attempt(s): %s", item.index, kind, attempts,
                    message[:300])
        self.ctx.display.update(self.counts.succeeded, self.counts.failed)

    # ---- bookkeeping -----------------------------------------------------------------

    def summary(self) -> str:
        c, s = self.counts, self.ctx.caller.stats
        by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(c.failed_by_kind.items()))
        skipped = f", {c.skipped} already done" if c.skipped else ""
        return (f"{c.succeeded} succeeded, {c.failed} failed{f' ({by_kind})' if by_kind else ''}"
                f"{skipped}; {s.requests} requests, {s.retries} retries, {s.rate_limited} "
                f"rate-limited (429), {s.cache_hits} cache hits; "
                f"{s.prompt_tokens} prompt + {s.completion_tokens} completion tokens")

    def write_manifest(self, status: str, error: dict[str, str] | None) -> None:
        c, s = self.counts, self.ctx.caller.stats
        elapsed = time.monotonic() - self._t0
        finished = c.succeeded + c.failed
        manifest = {
            **self.ctx.manifest_base,
            "status": status,
            "error": error,
            "started_at": self._started_at,
            "updated_at": iso_now(),
            "files": {name: str(getattr(self.ctx.files, name))
                      for name in ("results", "failures", "manifest", "log")},
            "counts": {"finished": finished, "succeeded": c.succeeded, "failed": c.failed,
                       "failed_by_kind": dict(c.failed_by_kind), "skipped_done": c.skipped,
                       "results_in_file": len(self.ctx.done_keys) + c.succeeded},
            "calls": {"requests": s.requests, "retries": s.retries,
                      "rate_limited": s.rate_limited, "errors_by_kind": dict(s.errors_by_kind),
                      "cache_hits": s.cache_hits, "cache_misses": s.cache_misses},
            "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                       "total": s.prompt_tokens + s.completion_tokens},
            "timings": {
                "duration_s": round(elapsed, 3),
                "items_per_s": round(finished / elapsed, 3) if elapsed > 0 else None,
                "mean_latency_s": round(c.latency_total / c.succeeded, 4) if c.succeeded
                else None,
            },
        }
        write_manifest(self.ctx.files.manifest, manifest)


def base_record(item: PoolItem) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": item.index,
        "key": item.key,
        "user_prompt_kwargs": item.user_kwargs,
        "system_prompt_kwargs": item.system_kwargs,
    }
    if item.meta:
        record["meta"] = item.meta
    return record


def make_record(item: PoolItem, output: Any, completion: Completion, attempts: int
                ) -> dict[str, Any]:
    return {
        **base_record(item),
        "output": output,
        "raw_response": completion.text,
        "model": completion.model,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage.as_dict(),
        "latency_s": round(completion.latency_s, 4),
        "attempts": attempts,
        "cached": attempts == 0,
    }
