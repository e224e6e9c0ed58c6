"""The types a run's plan and the engine share: one item on its way through the steps
(:class:`ItemState`), a step made ready to run (:class:`StepRuntime`), what the engine
asks of a plan (:class:`Plan`), and the record shapes.

They live below both the plans (``datagen.plans``) and the engine (``datagen.engine``),
so dependencies point one way: the pipeline builds a plan, the engine runs it, and
neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from datagen.llm.caller import Caller
from datagen.llm.types import ChatRequest
from datagen.pool import PoolItem

Messages = list[dict[str, Any]]
# (context, where) -> (chat messages, None) or (None, completion prompt), and the name of
# the prompt file chosen (a step may have several; None for one)
Render = Callable[["ItemState", Mapping[str, Any], str],
                  tuple[Messages | None, str | None, str | None]]


@dataclass
class ItemState:
    """One item (or one fan-out child, or one sample) on its way through the steps."""

    item: PoolItem
    key: str
    context: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, dict[str, Any]] = field(default_factory=dict)
    fanout: tuple[int, ...] = ()
    variant: int = 0  # 0 for the item itself; samples and repeats count up (their seeds)

    def child(self, i: int, step: str, element: Any, marker: str = "/",
              fan: int = 1) -> ItemState:
        """Fan-out child ``i`` (``marker`` "/") or sample ``i`` (``marker`` "#") of this
        state after ``step``."""
        trace = {name: dict(t) for name, t in self.trace.items()}
        index_name = "fanout_index" if marker == "/" else "sample_index"
        trace[step] = {**trace.get(step, {}), "output": element, index_name: i}
        return ItemState(self.item, f"{self.key}{marker}{i}", self.context,
                         {**self.outputs, step: element}, trace, (*self.fanout, i),
                         self.variant * fan + i)

    def choice(self, n: int) -> int:
        """A stable choice among ``n`` (a step's prompt variants) from this state's key:
        the same on every run and resume."""
        digest = hashlib.blake2b(self.key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % n


@dataclass
class StepRuntime:
    """A step made ready to run: its model's caller and how to build its requests."""

    name: str
    caller: Caller
    render: Render
    build_request: Callable[[Messages | None, str | None], ChatRequest]
    extract: Callable[[str], Any] | None = None
    validate: Callable[..., Any] | None = None
    keep: Callable[..., Any] | None = None  # a filter step: False drops the item
    input_processor: Callable[..., Any] | None = None
    max_retries: int = 0
    one_to_many: bool = False
    samples: int = 1  # outputs per input at this step, each continuing as <key>#i
    batch: bool = False  # answered through the provider's batch API, in rounds
    seeded: bool = False  # the provider takes a seed: samples get distinct ones
    base_seed: int = 0
    unsent_constraint: str | None = None  # the extractor could constrain, but is not sent
    shared: bool = False  # the samples of one input share one request (n = samples)

    def request_for(self, state: ItemState, messages: Messages | None,
                    prompt: str | None, variant: int | None = None, n: int = 1
                    ) -> ChatRequest:
        """The request of ``state`` (of ``variant``, when given: the first sample of a
        group whose ``n`` samples share one request)."""
        request = self.build_request(messages, prompt)
        variant = state.variant if variant is None else variant
        seeded = bool(variant and self.seeded)  # distinct samples where the provider seeds
        if seeded or n > 1:
            from dataclasses import replace

            params = {**request.params, **({"seed": self.base_seed + variant} if seeded
                                           else {}), **({"n": n} if n > 1 else {})}
            request = replace(request, params=params)
        return request


class Plan(Protocol):
    """What a run does, as the engine sees it."""

    model_names: list[str | None]
    fingerprint: dict[str, Any]
    extractor_name: str

    def make_item(self, index: int, raw: Any, fresh: bool = False) -> PoolItem: ...

    def check_item(self, item: PoolItem) -> None: ...

    def check_models(self) -> None:
        """Each model's provider, and each prompt against its model (a prefill where the
        model cannot continue one): ConfigError before anything is written."""

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]: ...

    def batch_steps(self) -> dict[str, str | None]:
        """The steps sent through a batch API, each with its model's name."""
        ...

    def record(self, state: ItemState) -> dict[str, Any]: ...

    def failure(self, state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]: ...


# ---- record shapes ----------------------------------------------------------------

def legacy_record(state: ItemState) -> dict[str, Any]:
    """The single-step record (the shape the core template promises)."""
    (trace,) = state.trace.values()
    record: dict[str, Any] = {**_legacy_inputs(state), "output": trace["output"],
              **{k: trace[k] for k in ("raw_response", "model", "finish_reason", "usage",
                                       "latency_s", "attempts", "cached", "messages")
                 if k in trace}}
    if state.item.sample is not None:
        record["sample_index"] = state.item.sample
    return record


def legacy_failure(state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
    return {**_legacy_inputs(state), "error": error}


def _legacy_inputs(state: ItemState) -> dict[str, Any]:
    item = state.item
    record: dict[str, Any] = {"index": item.index, "key": state.key,
                              "user_prompt_kwargs": item.user_kwargs,
                              "system_prompt_kwargs": item.system_kwargs}
    if item.meta:
        record["meta"] = item.meta
    return record


def steps_record(state: ItemState) -> dict[str, Any]:
    """A multi-step record: the item, every step's trace, the last step's output."""
    last = list(state.trace)[-1]
    record: dict[str, Any] = {"index": state.item.index, "key": state.key, "item": state.context,
              "output": state.trace[last].get("output"), "steps": state.trace}
    if state.item.sample is not None:
        record["sample_index"] = state.item.sample
    return record


def steps_failure(state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
    return {"index": state.item.index, "key": state.key, "item": state.context,
            "step": step, "error": {**error, "step": step}, "steps": state.trace}
