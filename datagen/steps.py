"""The steps of a multi-step pipeline, and what a step's extractor and validator may
answer.

A step renders its prompt with one context: the item's fields, every earlier step's
output under that step's name, and ``error_message``. It calls its model (the main one or
a named one), extracts, validates; a failed extraction or validation is retried with the
reason in ``error_message``, up to the step's ``max_retries``; then the item fails with
that reason and the step's name. An extractor or validator that returns :data:`DROP`
(or a ``keep`` predicate that returns False) drops the item: it is counted and listed
with its reason, never a failure, never retried. A ``one_to_many`` step's list output fans
out: each element continues through the later steps as its own item, keyed
``<parent key>/<i>``; ``samples=N`` makes N outputs, keyed ``<parent key>#<i>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from datagen.prompts import StepPrompt

DEFAULT_VALIDATION_RETRIES = 2


class _Drop:
    """The value an extractor or validator returns to drop an item (a filter)."""

    _instance: _Drop | None = None

    def __new__(cls) -> _Drop:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DROP"

    def __call__(self, reason: str) -> Dropped:
        """``DROP("off topic")``: drop, with the reason listed in the dropped file."""
        return Dropped(reason)


@dataclass(frozen=True)
class Dropped:
    reason: str


DROP = _Drop()


def drop_reason(value: Any) -> str | None:
    """The reason when ``value`` says "drop this item", else None."""
    if value is DROP:
        return "dropped"
    if isinstance(value, Dropped):
        return value.reason or "dropped"
    return None


@dataclass(frozen=True)
class Step:
    name: str
    prompts: tuple[StepPrompt, ...]
    extract: Callable[[str], Any] | None = None
    validate: Callable[..., Any] | None = None
    keep: Callable[..., Any] | None = None
    input_processor: Callable[[dict[str, Any]], Any] | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    max_retries: int = DEFAULT_VALIDATION_RETRIES
    one_to_many: bool = False
    samples: int = 1
    batch: bool | None = None  # None: as run.batch says
    response_format: Any = None
    mode: Literal["chat", "completion"] = "chat"

    @property
    def prompt(self) -> StepPrompt:
        return self.prompts[0]

    @property
    def variables(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for prompt in self.prompts:
            out |= prompt.variables
        return out


def validation_reason(result: Any) -> str | None:
    """None when a validator's answer means "valid", else the reason it failed.

    Accepted answers: True / False, (ok, message), or a string (the reason it failed).
    """
    if result is True:
        return None
    if result is False:
        return "the output did not pass validation"
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        return None if result[0] else str(result[1] or "the output did not pass validation")
    if isinstance(result, str):
        return result or "the output did not pass validation"
    return (f"the validator returned {result!r}; return True, False, (False, reason), a "
            "reason string, or DROP")


@dataclass
class CallEvent:
    """What observers see, before (``response`` None) and after every LLM call."""

    step: str
    key: str
    messages: list[dict[str, Any]] | None
    prompt: str | None
    response: str | None = None
    usage: dict[str, int] | None = None
    latency_s: float | None = None
    cached: bool = False
    error: str | None = None
