"""What goes to a transport and what comes back, independent of the provider.

A :class:`ChatRequest` is the canonical request: everything that is sent, and so
everything that shapes the answer. Its identity (:func:`request_identity`), which keys
the response cache, is computed from *every* field of the dataclass except the ones
marked ``identity=False`` in their metadata (the credential and the client-side timeout):
a field added to the request is part of the identity without anyone remembering to add
it. Headers count too, but only those that are not credentials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

Message = dict[str, Any]
# header names whose values are credentials: never part of the identity, never written
CREDENTIAL_HEADER = re.compile(r"(auth|key|token|secret|cookie|signature|password|session)",
                               re.IGNORECASE)


@dataclass(frozen=True)
class ChatRequest:
    """One request: chat ``messages``, or a plain ``prompt`` for a text-completion
    endpoint (base models) when ``prompt`` is set.

    ``provider`` and ``base_url`` are the endpoint (the same model name on two servers is
    two different requests); ``params`` holds every sampling parameter, the output
    constraint (grammar, response format) and extra body fields, exactly as sent.
    """

    model: str
    messages: list[Message]
    params: Mapping[str, Any] = field(default_factory=dict)
    provider: str = ""
    base_url: str | None = None
    prompt: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False, metadata={"identity": False})
    timeout: float = field(default=120.0, metadata={"identity": False})

    @property
    def mode(self) -> str:
        return "chat" if self.prompt is None else "completion"

    @property
    def prefill(self) -> str | None:
        """The assistant's opening words when the chat ends with the assistant's turn."""
        if self.prompt is None and self.messages and \
                self.messages[-1].get("role") == "assistant":
            return str(self.messages[-1].get("content") or "")
        return None


def identity_fields() -> list[str]:
    """The names of the fields that make up a request's identity."""
    return list(_identity_fields())


@lru_cache(maxsize=1)
def _identity_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ChatRequest)
                 if f.metadata.get("identity", True))


def _identity_value(name: str, value: Any) -> Any:
    if name == "headers":
        return {k.lower(): v for k, v in value.items() if not CREDENTIAL_HEADER.search(k)}
    return value


def request_identity(request: ChatRequest, salt: str = "") -> str:
    """A hash of the canonical request as sent, minus credentials, plus ``salt``."""
    canonical = {name: getattr(request, name) for name in _identity_fields()}
    if request.headers:
        canonical["headers"] = _identity_value("headers", request.headers)
    canonical["mode"] = "chat" if request.prompt is None else "completion"
    canonical["salt"] = salt
    payload = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                           default=repr)
    return hashlib.sha256(payload).hexdigest()


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
class Choice:
    """One of several answers to a request that asked for ``n`` > 1. ``rejected``: its
    sample's extraction or validation refused it (kept in the cache so that the other
    choices keep their usage shares; never handed out again)."""

    text: str
    finish_reason: str | None
    rejected: bool = False


@dataclass(frozen=True)
class Completion:
    """A model's answer: its text, why it stopped, and what it cost in tokens.

    ``rate_limits``: the endpoint's limits as the response's headers stated them (None
    when the transport does not read them or the provider sent none). ``choices``: every
    answer when the server returned more than one (a request with ``n`` > 1; ``text`` is
    then the first's), else empty; ``usage`` is the whole request's.
    """

    text: str
    finish_reason: str | None
    usage: Usage
    model: str
    latency_s: float = 0.0
    rate_limits: RateLimitInfo | None = None
    choices: tuple[Choice, ...] = ()

    @property
    def choice_count(self) -> int:
        return len(self.choices) or 1

    def choice(self, i: int) -> Completion | None:
        """Answer ``i`` as a completion of its own, with its share of the usage (see
        :func:`usage_share`); None when the server returned fewer, or it was rejected."""
        if not self.choices:
            return self if i == 0 else None
        if i >= len(self.choices) or self.choices[i].rejected:
            return None
        picked = self.choices[i]
        return dataclasses.replace(self, text=picked.text, finish_reason=picked.finish_reason,
                                   usage=usage_share(self.usage, self.choices, i),
                                   rate_limits=None, choices=())


def usage_share(usage: Usage, choices: tuple[Choice, ...], i: int) -> Usage:
    """Choice ``i``'s part of a request's usage: the prompt, billed once, goes to choice 0;
    the completion tokens (servers report only their total) are apportioned by the
    length of each choice's text, the largest remainders rounded up, so the shares of
    all the choices add up to the server's count exactly."""
    weights = [len(c.text) for c in choices]
    total = sum(weights)
    if not total:
        weights, total = [1] * len(choices), len(choices)
    exact = [usage.completion_tokens * w / total for w in weights]
    shares = [int(x) for x in exact]
    short = usage.completion_tokens - sum(shares)
    for j in sorted(range(len(exact)), key=lambda j: (shares[j] - exact[j], j))[:short]:
        shares[j] += 1
    return Usage(usage.prompt_tokens if i == 0 else 0, shares[i])
