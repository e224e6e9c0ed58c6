"""What becomes of an answer: the extractor, the validator and the filter judge it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datagen.llm.types import Completion
from datagen.plan import StepRuntime
from datagen.steps import drop_reason, validation_reason
from datagen.usercode import UserCodeError, call_user


@dataclass
class Verdict:
    """An answer judged: kind "ok", "drop", or why it failed (extraction, validation,
    filter); the reason, the output, and the user function that raised, if one did."""

    kind: str
    reason: str | None
    output: Any = None
    function: str | None = None
    rejects: bool = True  # the answer is wrong (not the user's code): ask again later


async def judge(step: StepRuntime, completion: Completion, context: Mapping[str, Any],
                timeout: float | None) -> Verdict:
    """The step's extractor, validator and filter on one answer."""
    output: Any = completion.text
    if step.extract is not None:
        try:
            output = await call_user(step.extract, completion.text, kind="extraction",
                                     timeout=timeout)
        except UserCodeError as exc:
            return Verdict("extraction", exc.message, None, exc.function, exc.rejects)
        if (reason := drop_reason(output)) is not None:
            return Verdict("drop", reason)
    for kind, fn in (("validation", step.validate), ("filter", step.keep)):
        if fn is None:
            continue
        try:
            answer = await call_user(fn, output, context, kind=kind, timeout=timeout)
        except UserCodeError as exc:
            return Verdict(kind, exc.message, output, exc.function, exc.rejects)
        if (reason := drop_reason(answer)) is not None:
            return Verdict("drop", reason, output)
        if kind == "filter":
            if not answer:
                return Verdict("drop", f"filtered out by step '{step.name}'", output)
            continue
        if (reason := validation_reason(answer)) is not None:
            return Verdict("validation", reason, output)
    return Verdict("ok", None, output)
