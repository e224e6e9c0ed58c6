"""What goes to a transport and what comes back, independent of the provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    """One request: chat ``messages``, or a plain ``prompt`` for a text-completion
    endpoint (base models) when ``prompt`` is set."""

    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    timeout: float = 120.0
    prompt: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Completion:
    """A model's answer: its text, why it stopped, and what it cost in tokens."""

    text: str
    finish_reason: str | None
    usage: Usage
    model: str
    latency_s: float = 0.0
