"""A transport that answers in process by calling a function, as httpx's MockTransport
does: the test kit's fake model and any user-defined provider plug in here, through the
same :class:`~datagen.llm.caller.Transport` protocol a real provider uses.

    from datagen.llm.providers import register_provider
    from datagen.llm.handler import HandlerTransport

    register_provider("echo", lambda model, concurrency: HandlerTransport(
        lambda request: request.messages[-1]["content"]))
    DataGenerationPipeline(provider="echo", model="any", ...)

The handler takes the :class:`ChatRequest` and returns the text, a :class:`Completion`,
or an awaitable of either; raising :class:`CallError` reports a provider error (a 429, a
500...) with its usual consequences. Usage, when the handler gives only text, is counted
in words.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion, Usage

Handler = Callable[[ChatRequest], "str | Completion | Awaitable[str | Completion]"]


def word_usage(request: ChatRequest, text: str) -> Usage:
    prompt = request.prompt if request.prompt is not None else " ".join(
        str(m.get("content", "")) for m in request.messages)
    return Usage(prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()))


class HandlerTransport:
    """Calls ``handler(request)`` for every request; never touches the network."""

    def __init__(self, handler: Handler, name: str = "handler") -> None:
        self.handler = handler
        self.name = name

    async def complete(self, request: ChatRequest) -> Completion:
        started = time.perf_counter()
        try:
            answer: Any = self.handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
        except CallError:
            raise
        except Exception as exc:  # the handler's own fault: an item-level error
            raise CallError("error", f"{type(exc).__name__}: {exc}") from None
        if isinstance(answer, Completion):
            return answer
        if not isinstance(answer, str):
            raise CallError("malformed_response", f"the {self.name} handler returned "
                            f"{type(answer).__name__}, not text")
        return Completion(text=answer, finish_reason="stop", usage=word_usage(request, answer),
                          model=request.model, latency_s=time.perf_counter() - started)

    async def aclose(self) -> None:
        return None
