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

from datagen.engine.hooks import Hooks
from datagen.engine.job import Deferred, Job
from datagen.engine.recorder import Failure, RunRecorder
from datagen.engine.sharing import Seat, SharedRequests
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


def call_failed(err: CallError, model: str, step: str | None) -> Exception:
    """What a failed call becomes: the run stops (no retry can fix it), or the item fails.
    ``step``: named in the message of a run with several."""
    if err.fatal:
        message = fatal_message(err, model)
        return RunAbortedError(f"step '{step}': {message}" if step else message, err.kind)
    return StepFailed(Failure(err.kind, err.message, err.attempts))


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
        self.hooks = Hooks(job, recorder)
        self.shared = SharedRequests()  # samples asked together, with n
        self.rejections = Rejections(hold=recorder.rounds)

    async def run(self, item: PoolItem) -> None:
        state = ItemState(item=item, key=item.key, context=dict(item.user_kwargs),
                          variant=item.variant)
        seat = self.shared.copy_seat(self.steps[0], item, self.job.source.samples,
                                     self.job.done)
        try:
            await self._advance(state, 0, seat)
        finally:
            if seat is not None:
                self.shared.leave(seat)

    async def _advance(self, state: ItemState, first: int, seat: Seat | None = None,
                       sampled: bool = False) -> None:
        """Carry one item (or fan-out child, or sample) through steps[first:], then
        write it. ``sampled``: it is one of steps[first]'s samples already; ``seat``:
        its place in a group of samples sharing steps[first]'s request."""
        for position in range(first, len(self.steps)):
            step = self.steps[position]
            if step.samples > 1 and not (sampled and position == first):
                await self._sample(step, state, position)
                return
            if position and self.job.cache is not None:
                await self.job.cache.durable()  # the earlier step's answer, on disk first
            try:
                output = await self._run_step(step, state, seat if position == first
                                              else None)
            except StepFailed as failed:
                self.recorder.fail(state, step.name, failed.failure)
                return
            except StepDropped as dropped:
                self.recorder.drop(state, step.name, dropped.reason)
                return
            except Deferred:  # batch mode: its request is in this round's batch
                self.recorder.counts.deferred += 1
                return
            self.hooks.report(step.name, self.recorder.step_done(step.name, state.key))
            if step.one_to_many:
                await self._fan_out(step, state, output, position)
                return
            state.outputs[step.name] = output
        outcome = self.recorder.record(state)
        if isinstance(outcome, Failure):
            self.recorder.fail(state, self.steps[-1].name, outcome)
        elif self.job.options.on_record is not None:
            await self.hooks.on_record(outcome)

    async def _sample(self, step: StepRuntime, state: ItemState, position: int) -> None:
        """``samples=N`` at this step: N outputs, each continuing as ``<key>#i``."""
        samples = []
        for i in range(step.samples):
            sample = state.child(i, step.name, None, "#", step.samples)
            if sample.key in self.job.done:  # finished in the run being resumed
                self.recorder.counts.skipped += 1
                continue
            sample.outputs.pop(step.name, None)
            samples.append((i, sample))
        seats = [self.shared.seat(step, state.key, state.variant * step.samples, i,
                                  step.samples, len(samples)) for i, _ in samples]
        await _gather_all([self._one_sample(step, sample, position, seat)
                           for (_, sample), seat in zip(samples, seats, strict=True)])

    async def _one_sample(self, step: StepRuntime, sample: ItemState, position: int,
                          seat: Seat | None) -> None:
        try:
            await self._advance(sample, position, seat, sampled=True)
        finally:
            if seat is not None:
                self.shared.leave(seat)

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

    async def _run_step(self, step: StepRuntime, state: ItemState,
                        seat: Seat | None = None) -> Any:
        """The step's output for this item."""
        context = {**state.context, **state.outputs}
        if step.input_processor is not None:
            context = await self._user(step.input_processor, "input_processor", context)
            if not isinstance(context, Mapping):
                raise StepFailed(Failure("input_processor", "input_processor returned "
                                         f"{a_type(context)}; it must return a dict", 0))
        return await self._attempts(step, state, context, seat)

    async def _attempts(self, step: StepRuntime, state: ItemState,
                        context: Mapping[str, Any], seat: Seat | None) -> Any:
        """Call, extract, validate; retry with the reason up to the step's max_retries.
        With a ``seat``, the first answer is this sample's choice of its group's."""
        where = f"item {state.item.index}" + (f" (key {state.key})"
                                              if state.key != state.item.key else "")
        error_message: str | None = None
        retries = 0
        while True:
            messages, prompt, label = step.render(
                state, {**context, "error_message": error_message}, where)
            request = step.request_for(state, messages, prompt)
            group = None if seat is None or retries else (seat, step.request_for(
                state, messages, prompt, seat.base_variant, seat.size))
            completion, attempts, key, choice = await self._call(step, state, request,
                                                                 retries, group)
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
                self._reject(step, key, choice)
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
                    retries: int, group: tuple[Seat, ChatRequest] | None
                    ) -> tuple[Completion, int, str | None, int | None]:
        """The answer, the attempts it took, its cache key, and which choice of a shared
        request's answer it is (None: its own request's)."""
        named = step.name if len(self.steps) > 1 else None
        if not self.hooks.watching:  # nobody to tell: no event made
            try:
                return await self._answer(step, state, request, retries, group)
            except CallError as err:
                raise call_failed(err, request.model, named) from None
        event = CallEvent(step.name, state.key, request.messages or None, request.prompt)
        self.hooks.observe("before", event)
        try:
            answered = await self._answer(step, state, request, retries, group)
        except CallError as err:
            event.error = f"{err.kind}: {err.message}"
            self.hooks.observe("after", event)
            raise call_failed(err, request.model, named) from None
        completion, attempts = answered[0], answered[1]
        event.response, event.usage = completion.text, completion.usage.as_dict()
        event.latency_s, event.cached = completion.latency_s, attempts == 0
        self.hooks.observe("after", event)
        return answered

    async def _answer(self, step: StepRuntime, state: ItemState, request: ChatRequest,
                      retries: int, group: tuple[Seat, ChatRequest] | None
                      ) -> tuple[Completion, int, str | None, int | None]:
        if group is not None:  # this sample's choice of its group's answer, if there is one
            seat, shared = group
            group_key = request_identity(shared, f"{self.salt}|{seat.base_variant}")
            if (chosen := await self.shared.answer(step, seat, shared, group_key)):
                return *chosen, group_key, seat.index
        salt = f"{self.salt}|{state.variant}" + (f"|v{retries}" if retries else "")
        key = request_identity(request, salt) if step.caller.cache is not None else None
        if step.batch and self.job.batch is not None and key is not None:
            completion = await self.job.batch.answer(step.name, request, key, state.key)
            return completion, 1, key, None  # paid for, through a batch
        return *await step.caller.call(request, key), key, None

    def _reject(self, step: StepRuntime, key: str | None, choice: int | None) -> None:
        """An answer extraction or validation rejected is not kept: the failed item on
        resume asks the model again (a choice of a shared request's answer: that choice
        only). (When the user's code itself failed, the answer is kept: fix the code and
        resume, and it is not paid for twice.)"""
        if key is not None and step.caller.cache is not None:
            if choice is None:
                self.rejections.reject(step.caller.cache, key)
            else:  # a shared answer's choice (never a batch step's)
                step.caller.cache.reject_choice(key, choice)

    async def _user(self, fn: Any, kind: str, *args: Any) -> Any:
        try:
            return await call_user(fn, *args, kind=kind, timeout=self.timeout)
        except UserCodeError as exc:
            raise StepFailed(Failure(exc.kind, exc.message, 0, function=exc.function)
                             ) from None


async def _gather_all(branches: list[Any]) -> None:
    """Run branches of one item together; a fatal error in one stops the run."""
    results = await asyncio.gather(*branches, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
