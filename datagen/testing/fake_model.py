"""A fake model in process: ``provider: fake`` (model strings ``fake/<anything>``).

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


def make_provider() -> Any:
    """The litellm CustomLLM serving ``fake/<name>`` from :data:`fake_llm`."""
    from litellm.llms.custom_llm import CustomLLM
    from litellm.types.utils import Usage

    class FakeProvider(CustomLLM):
        async def acompletion(self, model: str, messages: Messages, *args: Any,
                              **kwargs: Any) -> Any:
            model_response = kwargs["model_response"]
            params = dict(kwargs.get("optional_params") or {})
            text = fake_llm.reply(model, messages, params)
            model_response.choices[0].message.content = text
            model_response.choices[0].finish_reason = "stop"
            prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion = len(text.split())
            model_response.usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                                         total_tokens=prompt + completion)
            model_response.model = f"fake/{model}"
            return model_response

    return FakeProvider()
