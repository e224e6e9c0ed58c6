"""The user's hooks into a run: call observers (``on_call``), the progress callback and
``on_record``. None of them may break a run: what they raise is logged (or counted) and
the run goes on."""

from __future__ import annotations

from typing import Any

from datagen.engine.job import Job
from datagen.engine.recorder import RunRecorder
from datagen.redact import get_logger
from datagen.steps import CallEvent
from datagen.usercode import UserCodeError, call_user

log = get_logger("datagen.engine")


class Hooks:
    def __init__(self, job: Job, recorder: RunRecorder) -> None:
        self.job, self.recorder = job, recorder
        self.observers = job.options.observers
        # anyone to tell of each call (on_call observers, --debug files): else no event
        self.watching = any(self.observers.get(phase) for phase in ("before", "after")) \
            or bool(job.options.debug)

    async def on_record(self, record: dict[str, Any]) -> None:
        callback = self.job.options.on_record
        assert callback is not None
        try:
            await call_user(callback, record, kind="on_record",
                            timeout=self.job.options.user_code_timeout)
        except UserCodeError as exc:  # the record is on disk: note it, keep going
            self.recorder.counts.callback_errors += 1
            log.warning("on_record failed for %s: %s", record.get("key"), exc.message)

    def observe(self, phase: str, event: CallEvent) -> None:
        for observer in self.observers.get(phase, ()):
            try:
                observer(event)
            except Exception:  # an observer must never break a run
                log.exception("a %s-call observer raised; ignored", phase)
        if phase == "after":
            self.recorder.debug(event)

    def report(self, name: str, done: int) -> None:
        callback = self.job.options.progress_callback
        if callback is None:
            return
        total = self.job.total
        fraction = min(1.0, done / total) if total else 0.0
        try:
            callback(name, fraction, f"step {name}: {done} done")
        except Exception:  # a UI hook must never break a run
            log.exception("progress_callback raised; ignored")
