"""The item runner: one item through every step: render, call, extract, validate, retry
with the reason, fan out, sample, drop; each outcome handed to the recorder.

A fault of this item (its call failed after retries, its answer was rejected, user code
raised or timed out) fails this item only. A fault no retry can fix (401, 404) or a bad
template raises, and the worker pool stops the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from datagen.engine.job import Deferred, Job
from datagen.engine.recorder import Failure, RunRecorder
from datagen.engine.verdict import judge
from datagen.errors import RunAbortedError, a_type
from datagen.llm.cache import ResponseCache
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion, request_identity
from datagen.plan import ItemState, StepRuntime
from datagen.pool import PoolItem
from datagen.redact import get_logger
from datagen.steps import CallEvent
from datagen.usercode import UserCodeError, call_user

log = get_logger("datagen.engine")


class StepFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class StepDropped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fatal_message(err: CallError, model: str) -> str:
    if err.kind == "auth":
        return (f"the provider rejected the credentials ({err.status or 'auth'}): "
                f"{err.message}. Check model.api_key in config.yaml (or the provider's "
                "environment variable, e.g. OPENAI_API_KEY) and that the key may use this "
                "model.")
    return (f"model '{model}' or its endpoint was not found ({err.status or 404}): "
            f"{err.message}. Check model.provider, model.model and model.base_url.")


def step_trace(completion: Completion, attempts: int, retries: int) -> dict[str, Any]:
    return {"raw_response": completion.text, "model": completion.model,
            "finish_reason": completion.finish_reason, "usage": completion.usage.as_dict(),
            "latency_s": round(completion.latency_s, 4), "attempts": attempts,
            "validation_retries": retries, "cached": attempts == 0}


class Rejections:
    """Rejected answers forgotten by the cache: at once; in batch mode (``hold``) when the
    run ends, since its rounds replay every unfinished item and each replay must take the
    same path (nothing asked twice)."""

    def __init__(self, hold: bool) -> None:
        self.held: dict[str, ResponseCache] | None = {} if hold else None

    def reject(self, cache: ResponseCache, key: str) -> None:
        if self.held is not None:
            self.held[key] = cache
        else:
            cache.reject(key)

    def release(self) -> None:
        held, self.held = self.held, None
        for key, cache in (held or {}).items():
            cache.reject(key)


class ItemRunner:
    """Carries items through the job's steps; outcomes go to the recorder."""

    def __init__(self, job: Job, recorder: RunRecorder, salt: str) -> None:
        self.job, self.recorder, self.salt = job, recorder, salt
        self.steps = job.steps
        self.timeout = job.options.user_code_timeout
        self.observers = job.options.observers
        self.rejections = Rejections(hold=recorder.rounds)

    async def run(self, item: PoolItem) -> None:
        state = ItemState(item=item, key=item.key, context=dict(item.user_kwargs),
                          variant=item.variant)
        await self._advance(state, 0)

    async def _advance(self, state: ItemState, first: int) -> None:
        """Carry one item (or fan-out child, or sample) through steps[first:], then
        write it."""
        for position in range(first, len(self.steps)):
            step = self.steps[position]
            if step.samples > 1:
                await self._sample(step, state, position)
                return
            try:
                output = await self._run_step(step, state)
            except StepFailed as failed:
                self.recorder.fail(state, step.name, failed.failure)
                return
            except StepDropped as dropped:
                self.recorder.drop(state, step.name, dropped.reason)
                return
            except Deferred:  # batch mode: its request is in this round's batch
                self.recorder.counts.deferred += 1
                return
            self._report(step.name, self.recorder.step_done(step.name, state.key))
            if step.one_to_many:
                await self._fan_out(step, state, output, position)
                return
            state.outputs[step.name] = output
        outcome = self.recorder.record(state)
        if isinstance(outcome, Failure):
            self.recorder.fail(state, self.steps[-1].name, outcome)
        elif self.job.options.on_record is not None:
            await self._on_record(outcome)

    async def _sample(self, step: StepRuntime, state: ItemState, position: int) -> None:
        """``samples=N`` at this step: N outputs, each continuing as ``<key>#i``."""
        async def one(i: int) -> None:
            sample = state.child(i, step.name, None, "#", step.samples)
            if sample.key in self.job.done:  # finished in the run being resumed
                self.recorder.counts.skipped += 1
                return
            sample.outputs.pop(step.name, None)
            try:
                output = await self._run_step(step, sample)
            except StepFailed as failed:
                self.recorder.fail(sample, step.name, failed.failure)
                return
            except StepDropped as dropped:
                self.recorder.drop(sample, step.name, dropped.reason)
                return
            except Deferred:
                self.recorder.counts.deferred += 1
                return
            self._report(step.name, self.recorder.step_done(step.name, sample.key))
            if step.one_to_many:
                await self._fan_out(step, sample, output, position)
                return
            sample.outputs[step.name] = output
            await self._advance(sample, position + 1)

        await _gather_all([one(i) for i in range(step.samples)])

    async def _fan_out(self, step: StepRuntime, state: ItemState, output: Any,
                       position: int) -> None:
        if not isinstance(output, list):
            self.recorder.fail(state, step.name, Failure(
                "fanout", f"step '{step.name}' is one_to_many but returned "
                f"{a_type(output)}, not a list", 0))
            return
        if not output:  # nothing to continue with: a filter's answer, not a fault
            self.recorder.drop(state, step.name, f"step '{step.name}' returned an empty "
                               "list: nothing to continue with")
            return
        await self._branch(step, state, output, position, "/")

    async def _branch(self, step: StepRuntime, state: ItemState, outputs: list[Any],
                      position: int, marker: str) -> None:
        """Continue each element (fan-out "/") as its own item."""
        branches = []
        for i, element in enumerate(outputs):
            child = state.child(i, step.name, element, marker, len(outputs))
            if child.key in self.job.done:  # finished in the run being resumed
                self.recorder.counts.skipped += 1
                continue
            branches.append(self._advance(child, position + 1))
        await _gather_all(branches)

    # ---- one step --------------------------------------------------------------------

    async def _run_step(self, step: StepRuntime, state: ItemState) -> Any:
        """The step's output for this item."""
        context = {**state.context, **state.outputs}
        if step.input_processor is not None:
            context = await self._user(step.input_processor, "input_processor", context)
            if not isinstance(context, Mapping):
                raise StepFailed(Failure("input_processor", "input_processor returned "
                                         f"{a_type(context)}; it must return a dict", 0))
        return await self._attempts(step, state, context)

    async def _attempts(self, step: StepRuntime, state: ItemState,
                        context: Mapping[str, Any]) -> Any:
        """Call, extract, validate; retry with the reason up to the step's max_retries."""
        where = f"item {state.item.index}" + (f" (key {state.key})"
                                              if state.key != state.item.key else "")
        error_message: str | None = None
        retries = 0
        while True:
            messages, prompt, label = step.render(
                state, {**context, "error_message": error_message}, where)
            request = step.request_for(state, messages, prompt)
            completion, attempts, key = await self._call(step, state, request, retries)
            verdict = await judge(step, completion, context, self.timeout)
            reason = verdict.reason
            trace = step_trace(completion, attempts, retries)
            trace["messages" if prompt is None else "prompt"] = (messages if prompt is None
                                                                 else prompt)
            if label is not None:
                trace["prompt_file"] = label
            trace = {**state.trace.get(step.name, {}), **trace}  # keeps a sample's index
            if verdict.kind == "drop":
                state.trace[step.name] = {**trace, "output": None}
                raise StepDropped(reason or "dropped")
            if reason is None:
                state.trace[step.name] = {**trace, "output": verdict.output}
                self.recorder.meta(step.name, state.key, messages, prompt, completion)
                return verdict.output
            if verdict.rejects:
                self._reject(step, key)
            if retries >= step.max_retries:
                if completion.finish_reason == "length":
                    reason += " (the response was cut off at max_tokens: raise max_tokens)"
                state.trace[step.name] = trace
                raise StepFailed(Failure(verdict.kind, reason, attempts, completion,
                                         verdict.function))
            retries += 1
            self.recorder.retried(step.name, state.key, retries)
            error_message = reason
            log.info("step %s, %s: %s failed (%s); retry %d/%d", step.name, where,
                     verdict.kind, reason[:200], retries, step.max_retries)

    async def _call(self, step: StepRuntime, state: ItemState, request: ChatRequest,
                    retries: int) -> tuple[Completion, int, str | None]:
        salt = f"{self.salt}|{state.variant}" + (f"|v{retries}" if retries else "")
        key = request_identity(request, salt) if step.caller.cache is not None else None
        event = CallEvent(step.name, state.key, request.messages or None, request.prompt)
        self._observe("before", event)
        try:
            if step.batch and self.job.batch is not None and key is not None:
                completion = await self.job.batch.answer(step.name, request, key,
                                                         state.key)
                attempts = 1  # paid for, through a batch
            else:
                completion, attempts = await step.caller.call(request, key)
        except CallError as err:
            event.error = f"{err.kind}: {err.message}"
            self._observe("after", event)
            if err.fatal:
                message = fatal_message(err, request.model)
                if len(self.steps) > 1:
                    message = f"step '{step.name}': {message}"
                raise RunAbortedError(message, err.kind) from None
            raise StepFailed(Failure(err.kind, err.message, err.attempts)) from None
        event.response, event.usage = completion.text, completion.usage.as_dict()
        event.latency_s, event.cached = completion.latency_s, attempts == 0
        self._observe("after", event)
        return completion, attempts, key

    def _reject(self, step: StepRuntime, key: str | None) -> None:
        """An answer extraction or validation rejected is not kept: the failed item on
        resume asks the model again. (When the user's code itself failed, the answer is
        kept: fix the code and resume, and it is not paid for twice.)"""
        if key is not None and step.caller.cache is not None:
            self.rejections.reject(step.caller.cache, key)

    async def _user(self, fn: Any, kind: str, *args: Any) -> Any:
        try:
            return await call_user(fn, *args, kind=kind, timeout=self.timeout)
        except UserCodeError as exc:
            raise StepFailed(Failure(exc.kind, exc.message, 0, function=exc.function)
                             ) from None

    async def _on_record(self, record: dict[str, Any]) -> None:
        callback = self.job.options.on_record
        assert callback is not None
        try:
            await call_user(callback, record, kind="on_record", timeout=self.timeout)
        except UserCodeError as exc:  # the record is on disk: note it, keep going
            self.recorder.counts.callback_errors += 1
            log.warning("on_record failed for %s: %s", record.get("key"), exc.message)

    def _observe(self, phase: str, event: CallEvent) -> None:
        for observer in self.observers.get(phase, ()):
            try:
                observer(event)
            except Exception:  # an observer must never break a run
                log.exception("a %s-call observer raised; ignored", phase)
        if phase == "after":
            self.recorder.debug(event)

    def _report(self, name: str, done: int) -> None:
        callback = self.job.options.progress_callback
        if callback is None:
            return
        total = self.job.total
        fraction = min(1.0, done / total) if total else 0.0
        try:
            callback(name, fraction, f"step {name}: {done} done")
        except Exception:  # a UI hook must never break a run
            log.exception("progress_callback raised; ignored")


async def _gather_all(branches: list[Any]) -> None:
    """Run branches of one item together; a fatal error in one stops the run."""
    results = await asyncio.gather(*branches, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
