"""A fake model in process: ``provider: fake`` (model strings ``fake/<anything>``),
served through the library's in-process handler transport (registered when this module is
imported: ``import datagen.testing``, or the pytest plugin, does it).

For unit tests of prompts, ``parse_response`` and extractors with no HTTP at all. Replies
come from the process-wide :data:`fake_llm`: a script of texts, or a rule (a function of
the messages). Every call is recorded::

    from datagen.testing import fake_llm
    fake_llm.script("<draft>one</draft>", "<draft>two</draft>")   # replies in order
    fake_llm.rule(lambda messages: "<draft>" + messages[-1]["content"] + "</draft>")
    pipeline = DataGenerationPipeline(provider="fake", model="any")
    ...
    assert len(fake_llm.calls) == 2

The pytest fixture ``fake_llm`` (from datagen's pytest plugin) resets it per test.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datagen.llm.handler import HandlerTransport
from datagen.llm.providers import register_provider
from datagen.llm.types import ChatRequest

Messages = list[dict[str, Any]]


def echo(messages: Messages) -> str:
    """The default rule: the last user message, back."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


@dataclass
class FakeCall:
    model: str
    messages: Messages
    params: dict[str, Any]


@dataclass
class FakeLLM:
    """Scripted or rule-based replies, and the record of every call."""

    calls: list[FakeCall] = field(default_factory=list)
    _rule: Callable[[Messages], str] = echo
    _script: deque[str] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, *replies: str) -> FakeLLM:
        """Answer the next calls with these texts, in order (then fall back to the rule)."""
        with self._lock:
            self._script.extend(replies)
        return self

    def rule(self, rule: Callable[[Messages], str]) -> FakeLLM:
        """Answer every call (after the script runs out) with ``rule(messages)``."""
        self._rule = rule
        return self

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self._script.clear()
            self._rule = echo

    def reply(self, model: str, messages: Messages, params: dict[str, Any]) -> str:
        with self._lock:
            self.calls.append(FakeCall(model, messages, params))
            if self._script:
                return self._script.popleft()
        return self._rule(messages)


fake_llm = FakeLLM()


def _handler(request: ChatRequest) -> str:
    messages = request.messages if request.prompt is None else [
        {"role": "user", "content": request.prompt}]
    return fake_llm.reply(request.model.split("/", 1)[-1], messages, dict(request.params))


def make_transport(m: Any, concurrency: int) -> HandlerTransport:
    """``provider: fake``: the in-process handler transport answering from fake_llm."""
    return HandlerTransport(_handler, name="fake")


register_provider("fake", make_transport, prices=(0.0, 0.0))
