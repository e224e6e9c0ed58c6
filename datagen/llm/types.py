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
class RateLimitInfo:
    """The provider's view of an endpoint's limits, from one response's headers.

    Every field is optional: a provider sends only some of them (OpenAI: requests and
    tokens; Anthropic: also input and output tokens). ``*_reset_s`` is seconds from the
    moment the response was read until that limit is fully replenished.
    """

    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset_s: float | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset_s: float | None = None
    input_tokens_limit: int | None = None
    input_tokens_remaining: int | None = None
    input_tokens_reset_s: float | None = None
    output_tokens_limit: int | None = None
    output_tokens_remaining: int | None = None
    output_tokens_reset_s: float | None = None


@dataclass(frozen=True)
class Completion:
    """A model's answer: its text, why it stopped, and what it cost in tokens.

    ``rate_limits``: the endpoint's limits as the response's headers stated them (None
    when the transport does not read them or the provider sent none).
    """

    text: str
    finish_reason: str | None
    usage: Usage
    model: str
    latency_s: float = 0.0
    rate_limits: RateLimitInfo | None = None
