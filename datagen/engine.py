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
import dataclasses
import inspect
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import redact
from datagen.cache import request_key
from datagen.errors import DatagenError, RunAbortedError, a_type
from datagen.llm.caller import Caller, CallStats
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion
from datagen.pool import ItemSource, PoolItem
from datagen.progress import Display
from datagen.steps import CallEvent, call_user_function, validation_reason
from datagen.store import JsonlSink, RunFiles, dumps_line, iso_now, write_manifest

log = logging.getLogger("datagen.engine")
ExtractFunction = Callable[[str], Any]


@dataclass
class StepRuntime:
    """A step made ready to run: its model's caller and how to build its requests."""

    name: str
    caller: Caller
    render: Callable[[ItemState, dict[str, Any], str],
                     tuple[list[dict[str, str]] | None, str | None]]
    build_request: Callable[[list[dict[str, str]] | None, str | None], ChatRequest]
    extract: ExtractFunction | None = None
    validate: Callable[..., Any] | None = None
    input_processor: Callable[..., Any] | None = None
    max_retries: int = 0
    one_to_many: bool = False


@dataclass
class ItemState:
    """One item (or one fan-out child) on its way through the steps."""

    item: PoolItem
    key: str
    context: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, dict[str, Any]] = field(default_factory=dict)
    fanout: tuple[int, ...] = ()

    def child(self, i: int, step: str, element: Any) -> ItemState:
        trace = {name: dict(t) for name, t in self.trace.items()}
        trace[step] = {**trace.get(step, {}), "output": element, "fanout_index": i}
        return ItemState(self.item, f"{self.key}/{i}", self.context,
                         {**self.outputs, step: element}, trace, (*self.fanout, i))


class StepFailed(Exception):
    def __init__(self, kind: str, message: str, attempts: int,
                 completion: Completion | None) -> None:
        super().__init__(message)
        self.kind, self.message, self.attempts, self.completion = (kind, message, attempts,
                                                                   completion)


def step_trace(completion: Completion, attempts: int, retries: int) -> dict[str, Any]:
    return {"raw_response": completion.text, "model": completion.model,
            "finish_reason": completion.finish_reason, "usage": completion.usage.as_dict(),
            "latency_s": round(completion.latency_s, 4), "attempts": attempts,
            "validation_retries": retries, "cached": attempts == 0}


def write_debug(folder: Path, event: CallEvent) -> None:
    """One JSON file per call: the full input and output, secrets redacted."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{event.step}-{event.key.replace('/', '_')}-{time.time_ns()}.json"
    data = redact.redact(dumps_line(dataclasses.asdict(event)).decode())
    (folder / name).write_text(data)


@dataclass
class RunContext:
    """What one run shares between its workers and does not change while it runs."""

    steps: list[StepRuntime]
    make_record: Callable[[ItemState], dict[str, Any]]
    make_failure: Callable[[ItemState, str, dict[str, Any]], dict[str, Any]]
    check_item: Callable[[PoolItem], None]
    files: RunFiles
    results_sink: JsonlSink
    failures_sink: JsonlSink
    display: Display
    prechecked: bool
    collect: bool = True
    done_keys: set[str] = field(default_factory=set)
    cache_salt: str = ""
    shutdown_timeout: float = 30.0
    fatal_message: Callable[[CallError, str], str] = lambda err, model: str(err)
    manifest_base: dict[str, Any] = field(default_factory=dict)
    on_record: Callable[[dict[str, Any]], Any] | None = None  # sync or async
    observers: dict[str, list[Callable[[CallEvent], Any]]] = field(default_factory=dict)
    debug_dir: Path | None = None
    meta_sink: JsonlSink | None = None
    progress_callback: Callable[[str, float, str], Any] | None = None


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # already in the results file of the run being resumed
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0
    validation_retries: Counter[str] = field(default_factory=Counter)
    step_done: Counter[str] = field(default_factory=Counter)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl+C: raised after the in-flight items are written (or cancelled) and the
    manifest says ``interrupted``; uncaught, Python exits with status 130."""


class Engine:
    def __init__(self, ctx: RunContext, source: ItemSource) -> None:
        self.ctx = ctx
        self.source = source
        self.counts = Counts()
        self.results: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
        self.stopping = False
        self.interrupts = 0
        self._workers: list[asyncio.Future[None]] = []
        self._started_at = iso_now()
        self._t0 = time.monotonic()
        self._pending_callbacks: list[dict[str, Any]] = []
        self._last_report: dict[str, float] = {}
        self._last_counters = 0.0
        self.source_total: int | None = None

    # ---- the run ---------------------------------------------------------------------

    async def run(self, concurrency: int, total: int | None) -> None:
        status, error = "running", None
        self.source_total = total
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
            for step in self.ctx.steps:
                if self.counts.step_done[step.name]:
                    self._emit_progress(step.name)
            self.ctx.results_sink.close()
            self.ctx.failures_sink.close()
            if self.ctx.meta_sink is not None:
                self.ctx.meta_sink.close()
            self._show_counters(force=True)
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
                self.ctx.check_item(item)
            await self._process(item)
            while self._pending_callbacks and self.ctx.on_record is not None:
                returned = self.ctx.on_record(self._pending_callbacks.pop(0))
                if inspect.isawaitable(returned):
                    await returned

    async def _process(self, item: PoolItem) -> None:
        state = ItemState(item=item, key=item.key, context=dict(item.user_kwargs))
        await self._advance(state, 0)

    async def _advance(self, state: ItemState, first: int) -> None:
        """Carry one item (or fan-out child) through steps[first:], then write it."""
        steps = self.ctx.steps
        for position in range(first, len(steps)):
            step = steps[position]
            try:
                output = await self._run_step(step, state)
            except StepFailed as failure:
                self._fail(state, step.name, failure)
                return
            self.counts.step_done[step.name] += 1
            self.ctx.display.step(step.name, self.counts.step_done[step.name])
            self._report_step(step.name)
            if step.one_to_many:
                await self._fan_out(step, state, output, position)
                return
            state.outputs[step.name] = output
        self._write(state)

    async def _fan_out(self, step: StepRuntime, state: ItemState, output: Any,
                       position: int) -> None:
        if not isinstance(output, list):
            self._fail(state, step.name, StepFailed(
                "fanout", f"step '{step.name}' is one_to_many but returned "
                f"{a_type(output)}, not a list", 0, None))
            return
        if not output:
            self._fail(state, step.name, StepFailed(
                "fanout", f"step '{step.name}' returned an empty list: nothing to continue "
                "with", 0, None))
            return
        children = []
        for i, element in enumerate(output):
            child = state.child(i, step.name, element)
            if child.key in self.ctx.done_keys:  # finished in the run being resumed
                self.counts.skipped += 1
                continue
            children.append(self._advance(child, position + 1))
        results = await asyncio.gather(*children, return_exceptions=True)
        for result in results:  # a fatal error in one child stops the run
            if isinstance(result, BaseException):
                raise result

    async def _run_step(self, step: StepRuntime, state: ItemState) -> Any:
        ctx = self.ctx
        where = f"item {state.item.index}" + (f" (key {state.key})" if "/" in state.key else "")
        context = {**state.context, **state.outputs}
        if step.input_processor is not None:
            try:  # the user's function, per item: what it raises fails this item only
                context = await call_user_function(step.input_processor, context)
            except Exception as exc:
                raise StepFailed("input_processor", f"{type(exc).__name__}: {exc}", 0,
                                 None) from None
            if not isinstance(context, Mapping):
                raise StepFailed("input_processor", f"input_processor returned "
                                 f"{a_type(context)}; it must return a dict", 0, None)
        error_message: str | None = None
        retries = 0
        while True:
            messages, prompt = step.render(state, {**context, "error_message": error_message},
                                           where)
            request = step.build_request(messages, prompt)
            salt = f"{ctx.cache_salt}|{state.item.occurrence}" + (f"|v{retries}" if retries
                                                                  else "")
            cache_key = (request_key(request, salt) if step.caller.cache is not None else None)
            event = CallEvent(step.name, state.key, messages, prompt)
            self._observe("before", event)
            try:
                completion, attempts = await step.caller.call(request, cache_key)
            except CallError as err:
                event.error = f"{err.kind}: {err.message}"
                self._observe("after", event)
                if err.fatal:
                    message = ctx.fatal_message(err, request.model)
                    if len(ctx.steps) > 1:
                        message = f"step '{step.name}': {message}"
                    raise RunAbortedError(message, err.kind) from None
                raise StepFailed(err.kind, err.message, err.attempts, None) from None
            event.response, event.usage = completion.text, completion.usage.as_dict()
            event.latency_s, event.cached = completion.latency_s, attempts == 0
            self._observe("after", event)
            kind, reason, output = await self._check(step, completion, context)
            trace = step_trace(completion, attempts, retries)
            trace["messages" if prompt is None else "prompt"] = (messages if prompt is None
                                                                 else prompt)
            if reason is None:
                state.trace[step.name] = {**trace, "output": output}
                if ctx.meta_sink is not None:
                    self._write_meta(step.name, state.key, messages, prompt, completion)
                return output
            if retries >= step.max_retries:
                if completion.finish_reason == "length":
                    reason += " (the response was cut off at max_tokens: raise max_tokens)"
                state.trace[step.name] = trace
                raise StepFailed(kind, reason, attempts, completion)
            retries += 1
            self.counts.validation_retries[step.name] += 1
            error_message = reason
            log.info("step %s, %s: %s failed (%s); retry %d/%d", step.name, where, kind,
                     reason[:200], retries, step.max_retries)

    async def _check(self, step: StepRuntime, completion: Completion,
                     context: Mapping[str, Any]) -> tuple[str, str | None, Any]:
        """(kind, reason or None when it passed, output)."""
        output: Any = completion.text
        if step.extract is not None:
            try:
                output = await call_user_function(step.extract, completion.text)
            except Exception as exc:  # the user's extractor: whatever it raises
                return "extraction", f"{type(exc).__name__}: {exc}", None
        if step.validate is not None:
            try:
                verdict = await call_user_function(step.validate, output, context)
            except Exception as exc:  # a validator that raises has said "invalid"
                return "validation", f"the validator raised {type(exc).__name__}: {exc}", output
            reason = validation_reason(verdict)
            if reason is not None:
                return "validation", reason, output
        return "ok", None, output

    def _write(self, state: ItemState) -> None:
        ctx = self.ctx
        record = ctx.make_record(state)
        try:
            line = dumps_line(record)
        except TypeError as exc:
            last = ctx.steps[-1].name
            value = state.outputs.get(last, state.trace.get(last, {}).get("output"))
            self._fail(state, last, StepFailed(
                "serialization", f"the extractor returned {a_type(value)} that cannot be "
                f"written as JSON ({exc}); return dicts, lists, strings, numbers or a "
                "pydantic model", state.trace.get(last, {}).get("attempts", 0), None))
            return
        ctx.results_sink.write_line(line)
        self.counts.succeeded += 1
        latency = sum(t.get("latency_s", 0.0) for t in state.trace.values())
        self.counts.latency_total += latency
        if ctx.collect:
            self.results[(state.item.index, state.fanout)] = record
        ctx.display.update(self.counts.succeeded, self.counts.failed)
        self._show_counters()
        if ctx.on_record is not None:
            self._pending_callbacks.append(record)

    def _fail(self, state: ItemState, step: str, failure: StepFailed) -> None:
        message = redact.redact(failure.message)
        record = self.ctx.make_failure(state, step, {"kind": failure.kind, "message": message,
                                                     "attempts": failure.attempts})
        if failure.completion is not None:
            record["raw_response"] = failure.completion.text
            record["finish_reason"] = failure.completion.finish_reason
        try:
            line = dumps_line(record)
        except TypeError:  # an unserialisable item value: keep what can be kept
            line = dumps_line({"index": state.item.index, "key": state.key,
                               "error": record["error"], "item": repr(state.context)})
        self.ctx.failures_sink.write_line(line)
        self.counts.failed += 1
        self.counts.failed_by_kind[failure.kind] += 1
        self._show_counters()
        log.warning("item %d (%s) failed at step %s (%s) after %d attempt(s): %s",
                    state.item.index, state.key, step, failure.kind, failure.attempts,
                    message[:300])
        self.ctx.display.update(self.counts.succeeded, self.counts.failed)

    def _write_meta(self, step: str, key: str, messages: list[dict[str, str]] | None,
                    prompt: str | None, completion: Completion) -> None:
        """Meta-datagen: the accepted call as a training example for a model that could
        replace this step."""
        assert self.ctx.meta_sink is not None
        example: dict[str, Any] = {"step": step, "key": key}
        if prompt is None:
            example["messages"] = [*(messages or []),
                                   {"role": "assistant", "content": completion.text}]
        else:
            example.update(prompt=prompt, completion=completion.text)
        self.ctx.meta_sink.write_line(dumps_line(example))

    def _observe(self, phase: str, event: CallEvent) -> None:
        for observer in self.ctx.observers.get(phase, ()):
            try:
                observer(event)
            except Exception:  # an observer must never break a run
                log.exception("a %s-call observer raised; ignored", phase)
        if phase == "after" and self.ctx.debug_dir is not None:
            write_debug(self.ctx.debug_dir, event)

    def _show_counters(self, force: bool = False) -> None:
        """Tokens, cost, calls and failures by kind for the display: at most every 0.25 s,
        so no item pays for adding up the counters of every model."""
        now = time.monotonic()
        if not force and now - self._last_counters < 0.25:
            return
        self._last_counters = now
        s, display = self.stats(), self.ctx.display
        display.usage(s.prompt_tokens + s.completion_tokens, s.cost_usd)
        display.calls(s.requests, s.retries, s.rate_limited, s.cache_hits)
        display.kinds(dict(self.counts.failed_by_kind), dict(s.errors_by_kind))

    def _report_step(self, name: str) -> None:
        callback = self.ctx.progress_callback
        if callback is None:
            return
        now = time.monotonic()
        if now - self._last_report.get(name, 0.0) < 0.5:
            return
        self._last_report[name] = now
        self._emit_progress(name)

    def _emit_progress(self, name: str) -> None:
        callback = self.ctx.progress_callback
        if callback is None:
            return
        done = self.counts.step_done[name]
        total = self.source_total
        fraction = min(1.0, done / total) if total else 0.0
        try:
            callback(name, fraction, f"step {name}: {done} done")
        except Exception:  # a UI hook must never break a run
            log.exception("progress_callback raised; ignored")

    # ---- bookkeeping -----------------------------------------------------------------

    def stats(self) -> CallStats:
        return CallStats.total([step.caller.stats for step in self.ctx.steps])

    def summary(self) -> str:
        c, s = self.counts, self.stats()
        by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(c.failed_by_kind.items()))
        skipped = f", {c.skipped} already done" if c.skipped else ""
        vr = sum(c.validation_retries.values())
        skipped += f", {vr} validation retries" if vr else ""
        return (f"{c.succeeded} succeeded, {c.failed} failed{f' ({by_kind})' if by_kind else ''}"
                f"{skipped}; {s.requests} requests, {s.retries} retries, {s.rate_limited} "
                f"rate-limited (429), {s.cache_hits} cache hits; "
                f"{s.prompt_tokens} prompt + {s.completion_tokens} completion tokens"
                f"{f', ${s.cost_usd:.4f}' if s.cost_usd is not None else ', cost unknown'}")

    def write_manifest(self, status: str, error: dict[str, str] | None) -> None:
        c, s = self.counts, self.stats()
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
            "steps": {step.name: {"done": c.step_done[step.name],
                                  "validation_retries": c.validation_retries[step.name]}
                      for step in self.ctx.steps},
            "calls": {"requests": s.requests, "retries": s.retries,
                      "rate_limited": s.rate_limited, "errors_by_kind": dict(s.errors_by_kind),
                      "cache_hits": s.cache_hits, "cache_misses": s.cache_misses},
            "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                       "total": s.prompt_tokens + s.completion_tokens},
            "cost_usd": round(s.cost_usd, 6) if s.cost_usd is not None else None,
            "timings": {
                "duration_s": round(elapsed, 3),
                "items_per_s": round(finished / elapsed, 3) if elapsed > 0 else None,
                "mean_latency_s": round(c.latency_total / c.succeeded, 4) if c.succeeded
                else None,
            },
        }
        write_manifest(self.ctx.files.manifest, manifest)
