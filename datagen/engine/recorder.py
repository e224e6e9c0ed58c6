"""The run recorder: every outcome of an item goes to its file here (results, failures,
dropped, meta, debug), counted once, shown on the display, and summed up in the manifest,
which is built in this one place."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from datagen import redact
from datagen.engine.job import Job
from datagen.errors import a_type
from datagen.llm.caller import CallStats
from datagen.llm.types import Completion
from datagen.manifest import build_manifest
from datagen.plan import ItemState, StepRuntime
from datagen.runindex import DROPPED, RESULTS, DoneLog, done_path
from datagen.seen import KeyIndex
from datagen.steps import CallEvent
from datagen.store import Fence, JsonlSink, RunFiles, dumps_line, iso_now, write_json

log = redact.get_logger("datagen.engine")
EARLY_ITEMS = 5  # the first items finished: when all failed alike, the summary says why


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    dropped: int = 0
    skipped: int = 0  # already done in the run being resumed
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    dropped_by_step: Counter[str] = field(default_factory=Counter)
    failed_by_step: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0
    validation_retries: Counter[str] = field(default_factory=Counter)
    step_done: Counter[str] = field(default_factory=Counter)
    callback_errors: int = 0
    deferred: int = 0  # batch mode: items waiting for this round's batch
    failed_again: int = 0  # batch mode resumed: failures already in the file, not rewritten

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.dropped


def hints_for(early: list[tuple[str, str]], steps: list[StepRuntime]) -> list[str]:
    """What to change when a run's first items all failed the same way: now, when
    extraction failed and the extractor's format constraint was not sent."""
    unsent = {s.name: s.unsent_constraint for s in steps if s.unsent_constraint}
    if not early or any(outcome != "extraction" or step not in unsent
                        for outcome, step in early):
        return []
    names = ", ".join(sorted({str(unsent[step]) for _, step in early}))
    first = "the only item" if len(early) == 1 else f"all of the first {len(early)} items"
    return [f"{first} failed extraction ({names}), and the extractor's format constraint "
            "(its grammar or JSON schema) was not sent to this server: set "
            "model.constrain_output: true (--set constrain_output=true) to hold the model "
            "to the format (llama.cpp, vLLM and other servers that take a grammar or a JSON "
            "schema)"]


@dataclass
class Failure:
    """Why an item failed at a step."""

    kind: str
    message: str
    attempts: int
    completion: Completion | None = None
    function: str | None = None  # the user function that raised or hung


def indexed_sinks(files: RunFiles, fsync: float, fence: Fence | None = None
                  ) -> tuple[DoneLog, JsonlSink, JsonlSink]:
    """The done index, and the results and dropped files, each line written told to it
    (resume of a million records reads 16 MB, not the records). The index is begun
    afresh when both files are empty (a new run); otherwise it is appended to, as the
    resume left it complete (or removed). With a ``fence`` (a cluster shard's lease)
    every append happens inside it."""
    empty = all(not path.exists() or path.stat().st_size == 0
                for path in (files.results, files.dropped))
    done_log = DoneLog(done_path(files.results), begin=empty)
    return (done_log,
            JsonlSink(files.results, fsync, lambda key, end: done_log.add(key, RESULTS, end),
                      fence=fence),
            JsonlSink(files.dropped, fsync, lambda key, end: done_log.add(key, DROPPED, end),
                      fence=fence))


class RunRecorder:
    """``rounds``: batch mode's rounds replay unfinished items; a step done, a retry or a
    meta example is still counted (and written) once per item."""

    def __init__(self, job: Job, rounds: bool = False) -> None:
        self.job = job
        self.rounds = rounds
        self._counted: KeyIndex | None = KeyIndex() if rounds else None
        self.failed_before: KeyIndex | None = None  # "key|kind|message" already on file
        self.plan = job.plan
        self.files = job.files
        self.counts = Counts()
        fsync, fence = job.options.fsync_interval, job.fence
        self.done_log, self.results_sink, self.dropped_sink = indexed_sinks(job.files, fsync,
                                                                             fence)
        self.failures_sink = JsonlSink(job.files.failures, fsync, fence=fence)
        self.meta_sink = JsonlSink(job.files.meta, fsync, fence=fence) \
            if job.options.meta_datagen else None
        self.results: dict[tuple[int, tuple[int, ...], int], dict[str, Any]] = {}
        self.started_at = iso_now()
        self.t0 = time.monotonic()
        self._last_counters = 0.0
        self.extra: dict[str, Any] = {}  # more manifest sections (e.g. a user-code hint)
        self.early: list[tuple[str, str]] = []  # (outcome, step) of the first items

    # ---- outcomes --------------------------------------------------------------------

    def record(self, state: ItemState) -> dict[str, Any] | Failure:
        """Write a finished item; return its record, or the Failure when it cannot be
        written as JSON (the caller records that)."""
        record = self.plan.record(state)
        try:
            line = dumps_line(record)
        except TypeError as exc:
            last = list(state.trace)[-1] if state.trace else self.job.step_names[-1]
            value = state.trace.get(last, {}).get("output")
            return Failure("serialization", f"the extractor returned {a_type(value)} that "
                           f"cannot be written as JSON ({exc}); return dicts, lists, strings, "
                           "numbers or a pydantic model",
                           state.trace.get(last, {}).get("attempts", 0))
        written = self.results_sink.write_line(line, state.key)
        self.early += [("ok", "")] if len(self.early) < EARLY_ITEMS else []
        c = self.counts
        c.succeeded += 1
        c.latency_total += sum(t.get("latency_s", 0.0) for t in state.trace.values())
        if self.job.options.collect or self.job.options.on_record is not None:
            # the record as the file holds it (pydantic models and tuples as JSON,
            # secrets redacted): what a test reads in memory holds for the file too
            record = orjson.loads(written)
        if self.job.options.collect:
            self.results[(state.item.index, state.fanout, state.item.sample or 0)] = record
        self._changed()
        return record

    def fail(self, state: ItemState, step: str, failure: Failure) -> None:
        message = redact.redact(failure.message)
        error: dict[str, Any] = {"kind": failure.kind, "message": message,
                                 "attempts": failure.attempts}
        if failure.function is not None:
            error["function"] = failure.function
        record = self.plan.failure(state, step, error)
        if failure.completion is not None:
            record["raw_response"] = failure.completion.text
            record["finish_reason"] = failure.completion.finish_reason
        try:
            line = dumps_line(record)
        except TypeError:  # an unserialisable item value: keep what can be kept
            line = dumps_line({"index": state.item.index, "key": state.key,
                               "error": error, "item": repr(state.context)})
        if self.failed_before is not None and f"{state.key}|{failure.kind}|{message}" in \
                self.failed_before:  # batch mode resumed: this very failure is on file
            self.counts.failed_again += 1
        else:
            self.failures_sink.write_line(line)
        self.early += [(failure.kind, step)] if len(self.early) < EARLY_ITEMS else []
        self.counts.failed += 1
        self.counts.failed_by_kind[failure.kind] += 1
        self.counts.failed_by_step[step] += 1
        where = f" in {failure.function}" if failure.function else ""
        log.warning("item %d (%s) failed at step %s (%s%s) after %d attempt(s): %s",
                    state.item.index, state.key, step, failure.kind, where,
                    failure.attempts, message[:300])
        self._changed()

    def drop(self, state: ItemState, step: str, reason: str) -> None:
        """A filter's "no": listed with its reason, never a failure, never retried."""
        line = dumps_line({"index": state.item.index, "key": state.key, "step": step,
                           "reason": reason, "item": state.context, "steps": state.trace})
        self.dropped_sink.write_line(line, state.key)
        self.early += [("drop", step)] if len(self.early) < EARLY_ITEMS else []
        self.counts.dropped += 1
        self.counts.dropped_by_step[step] += 1
        self._changed()

    def meta(self, step: str, key: str, messages: list[dict[str, Any]] | None,
             prompt: str | None, completion: Completion) -> None:
        """Meta-datagen: the accepted call as a training example for a model that could
        replace this step."""
        if self.meta_sink is None or self._again(f"meta|{step}|{key}"):
            return
        example: dict[str, Any] = {"step": step, "key": key}
        if prompt is None:
            example["messages"] = [*(messages or []),
                                   {"role": "assistant", "content": completion.text}]
        else:
            example.update(prompt=prompt, completion=completion.text)
        self.meta_sink.write_line(dumps_line(example))

    def debug(self, event: CallEvent) -> None:
        """One JSON file per call: the full input and output, secrets redacted."""
        if not self.job.options.debug:
            return
        folder = self.files.debug_dir
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{event.step}-{event.key.replace('/', '_')}-{time.time_ns()}.json"
        write_json(folder / name, dataclasses.asdict(event))

    def _again(self, what: str) -> bool:
        """Batch rounds: was this already counted (a replay)? Never, online."""
        return self._counted is not None and self._counted.add(what)

    def step_done(self, step: str, key: str) -> int:
        self.counts.step_done[step] += 0 if self._again(f"done|{step}|{key}") else 1
        self.job.display.step(step, self.counts.step_done[step])
        return self.counts.step_done[step]

    def retried(self, step: str, key: str, retry: int) -> None:
        """A validation retry (``retry``: its number for this item and step)."""
        if not self._again(f"retry|{step}|{key}|{retry}"):
            self.counts.validation_retries[step] += 1

    # ---- display, summary, manifest ---------------------------------------------------

    def _changed(self) -> None:
        c = self.counts
        self.job.display.update(c.succeeded, c.failed + c.dropped)
        self.show_counters()

    def stats(self) -> CallStats:
        return CallStats.total([caller.stats for caller in self.job.callers])

    def show_counters(self, force: bool = False) -> None:
        """Tokens, cost, calls and failures by kind for the display: at most every 0.25 s,
        so no item pays for adding up the counters of every model."""
        now = time.monotonic()
        if not force and now - self._last_counters < 0.25:
            return
        self._last_counters = now
        s, display = self.stats(), self.job.display
        display.usage(s.prompt_tokens + s.completion_tokens, s.cost_usd)
        display.calls(s.requests, s.retries, s.rate_limited, s.cache_hits)
        display.kinds(dict(self.counts.failed_by_kind), dict(s.errors_by_kind))
        display.note(self.waiting())

    def waiting(self) -> str:
        """Why requests are held back now, and until when (a Retry-After pause)."""
        for caller in self.job.callers:
            limits = caller.throttle.limits
            left = limits.paused_for()
            if left > 0:
                until = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
                return f"waiting until {until} ({left:.0f} s): {limits.pause_reason}"
        return ""

    def hints(self) -> list[str]:
        return hints_for(self.early, self.job.steps)

    def summary(self) -> str:
        hints = "".join(f"\nhint: {hint}" for hint in self.hints())
        return self._counts_line() + hints

    def _counts_line(self) -> str:
        c, s = self.counts, self.stats()
        by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(c.failed_by_kind.items()))
        more = f", {c.dropped} dropped" if c.dropped else ""
        more += f", {c.skipped} already done" if c.skipped else ""
        vr = sum(c.validation_retries.values())
        more += f", {vr} validation retries" if vr else ""
        return redact.redact(
            f"{c.succeeded} succeeded, {c.failed} failed{f' ({by_kind})' if by_kind else ''}"
            f"{more}; {s.requests} requests, {s.retries} retries, {s.rate_limited} "
            f"rate-limited (429), {s.cache_hits} cache hits; "
            f"{s.prompt_tokens} prompt + {s.completion_tokens} completion tokens"
            f"{f', ${s.cost_usd:.4f}' if s.cost_usd is not None else ', cost unknown'}"
            + (f"; {self.extra['batches']['summary']}" if "batches" in self.extra else ""))

    def manifest(self, status: str, error: dict[str, str] | None) -> dict[str, Any]:
        return manifest_of(self, status, error)

    def write_manifest(self, status: str, error: dict[str, str] | None) -> dict[str, Any]:
        manifest = self.manifest(status, error)
        write_json(self.files.manifest, manifest)
        return manifest

    def close(self) -> None:
        """Flush and close every file; the first write error is raised after all are
        closed."""
        first: Exception | None = None
        for sink in (self.results_sink, self.failures_sink, self.dropped_sink,
                     self.meta_sink):
            if sink is None:
                continue
            try:
                sink.close()
            except Exception as exc:  # OSError as WriteError: keep closing the others
                first = first or exc
        self.done_log.close()
        if first is not None:
            raise first

    def ordered_results(self) -> list[dict[str, Any]]:
        return [self.results[i] for i in sorted(self.results)]


def manifest_of(recorder: RunRecorder, status: str, error: dict[str, str] | None
                ) -> dict[str, Any]:
    """The manifest of the run so far (built here, in one place)."""
    c, s = recorder.counts, recorder.stats()
    elapsed = time.monotonic() - recorder.t0
    return build_manifest(
        recorder.job.manifest_base, status=status, error=error, started_at=recorder.started_at,
        updated_at=iso_now(), files=recorder.files.as_dict(),
        counts={"finished": c.finished, "succeeded": c.succeeded, "failed": c.failed,
                "failed_by_kind": dict(c.failed_by_kind), "skipped_done": c.skipped,
                "results_in_file": recorder.job.resumed + c.succeeded},
        steps={name: {"done": c.step_done[name],
                      "validation_retries": c.validation_retries[name],
                      "failed": c.failed_by_step[name],
                      "dropped": c.dropped_by_step[name]}
               for name in recorder.job.step_names},
        calls={"requests": s.requests, "retries": s.retries,
               "rate_limited": s.rate_limited, "errors_by_kind": dict(s.errors_by_kind),
               "cache_hits": s.cache_hits, "cache_misses": s.cache_misses},
        tokens={"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                "total": s.prompt_tokens + s.completion_tokens},
        cost_usd=s.cost_usd,
        timings={"duration_s": round(elapsed, 3),
                 "items_per_s": round(c.finished / elapsed, 3) if elapsed > 0 else None,
                 "mean_latency_s": round(c.latency_total / c.succeeded, 4)
                 if c.succeeded else None},
        extra={"dropped": {"total": c.dropped, "by_step": dict(c.dropped_by_step)},
               "callbacks": {"on_record_errors": c.callback_errors},
               "hints": recorder.hints(), **recorder.extra})
