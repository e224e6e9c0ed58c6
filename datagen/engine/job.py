"""A job: everything the engine needs to run one pool (or one shard of a pool) to the
disk, prepared and checked before anything is sent (see ``datagen.prepare``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from datagen.llm.cache import ResponseCache
from datagen.llm.caller import Caller
from datagen.llm.types import ChatRequest, Completion
from datagen.plan import Plan, StepRuntime
from datagen.progress import Display
from datagen.seen import KeyIndex
from datagen.source import ItemSource
from datagen.steps import CallEvent
from datagen.store import Fence, RunFiles, RunLock

if TYPE_CHECKING:
    from datagen.batch.target import BatchPlan


@dataclass
class RunOptions:
    """How one run behaves (from ``run()``'s keywords and the config's run section)."""

    concurrency: int = 5
    collect: bool = True
    on_record: Callable[[dict[str, Any]], Any] | None = None  # sync or async
    progress_callback: Callable[[str, float, str], Any] | None = None
    observers: dict[str, list[Callable[[CallEvent], Any]]] = field(default_factory=dict)
    debug: bool = False
    meta_datagen: bool = False
    shutdown_timeout: float = 30.0
    user_code_timeout: float | None = 60.0
    fsync_interval: float = 1.0
    cache_salt: str = ""


class Deferred(Exception):
    """A batch step's request went into this round's batch: the item waits for the next
    round (its answer will be in the cache then). Not a failure, not a record."""


class BatchRound(Protocol):
    """Batch mode's side of a round (``datagen.executors.batch``): answers a batch step's
    request (``key``: its identity; ``item``: the key of the item asking) from what
    earlier rounds collected, raises the CallError a batch reported for it for good, or
    takes it into this round's batch and raises :class:`Deferred`."""

    async def answer(self, step: str, request: ChatRequest, key: str, item: str
                     ) -> Completion: ...


@dataclass
class Job:
    plan: Plan
    steps: list[StepRuntime]
    source: ItemSource
    total: int | None  # items the source will hand out, when known
    files: RunFiles
    lock: RunLock
    done: KeyIndex  # keys already finished (resume)
    options: RunOptions
    display: Display
    manifest_base: dict[str, Any]
    callers: list[Caller]
    cache: ResponseCache | None = None
    resumed: int = 0  # records already in the files when the run started
    batch: BatchRound | None = None  # batch mode: this round's collector
    fence: Fence | None = None  # a cluster shard: held around every append (its lease)
    # a cluster run: (shard, display, fence) -> the Job of one shard of this run, made
    # where the shard runs (see datagen.prepare.prepare_shard); it travels there pickled
    make_shard: Callable[..., Job] | None = None
    batch_plan: BatchPlan | None = None  # batch mode: each batch step's target, the knobs

    @property
    def step_names(self) -> list[str]:
        return [step.name for step in self.steps]
