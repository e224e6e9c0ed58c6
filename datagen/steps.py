"""The steps of a multi-step pipeline, and what a step's validator may answer.

A step renders its prompt with one context: the item's fields, every earlier step's
output under that step's name, and ``error_message``. It calls its model (the main one or
a named one), extracts, validates; a failed extraction or validation is retried with the
reason in ``error_message``, up to the step's ``max_retries``; then the item fails with
that reason and the step's name. A ``one_to_many`` step's list output fans out: each
element continues through the later steps as its own item, keyed ``<parent key>/<i>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from datagen.prompts import StepPrompt

DEFAULT_VALIDATION_RETRIES = 2


@dataclass(frozen=True)
class Step:
    name: str
    prompt: StepPrompt
    extract: Callable[[str], Any] | None = None
    validate: Callable[..., Any] | None = None
    input_processor: Callable[[dict[str, Any]], Any] | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    max_retries: int = DEFAULT_VALIDATION_RETRIES
    one_to_many: bool = False
    response_format: Any = None
    mode: Literal["chat", "completion"] = "chat"


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
    return (f"the validator returned {result!r}; return True, False, (False, reason) or a "
            "reason string")


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


async def call_user_function(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user's function, sync or async, with as many arguments as it takes."""
    try:
        arity = _arity(fn)
    except TypeError:  # an unhashable callable: work it out every time
        arity = _arity.__wrapped__(fn)
    result = fn(*(args if arity is None else args[:arity]))
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class CallEvent:
    """What observers see, before (``response`` None) and after every LLM call."""

    step: str
    key: str
    messages: list[dict[str, str]] | None
    prompt: str | None
    response: str | None = None
    usage: dict[str, int] | None = None
    latency_s: float | None = None
    cached: bool = False
    error: str | None = None
