"""The fast transport for Anthropic's Messages API: pooled HTTP/1.1, orjson both ways.

The same semantics as the OpenAI-compatible fast path (``openai_transport``): the same
error kinds (so the same retries), Retry-After, usage, no hidden retries (each call is
one HTTP request), at a fraction of litellm's CPU per call. A :class:`ChatRequest` in the
OpenAI shape becomes a ``POST /v1/messages``:

- ``system`` (and ``developer``) messages are joined into the top-level ``system``;
- consecutive messages of one role are merged into one turn of text blocks (the API
  wants user and assistant to alternate);
- a last message from the assistant is a prefill: sent last with its trailing whitespace
  removed (the API rejects it otherwise; nothing left of it: not sent); the answer is the
  continuation only, for the caller to put after its prefill (the whitespace removed is
  not given back: the continuation usually starts with its own);
- ``max_tokens`` (or ``max_completion_tokens``) is required by the API: absent, it is
  :data:`DEFAULT_MAX_TOKENS`; ``stop`` becomes ``stop_sequences``; ``user`` becomes
  ``metadata.user_id``; ``params["extra_body"]`` is merged into the body last.

A text-completion request (``prompt``, base-model mode) has no Messages equivalent and
fails with ``bad_request``.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

import orjson

from datagen.llm.errors import CallError, kind_for_error_type, kind_for_status, parse_retry_after
from datagen.llm.ratelimits import from_anthropic_headers
from datagen.llm.types import ChatRequest, Completion, RateLimitInfo, Usage
from datagen.llm.wire import (
    field_of,
    load_object,
    malformed,
    post,
    preview,
    session_for,
    token_count,
)  # fmt: skip
from datagen.redact import get_logger, redact

log = get_logger("datagen.llm")

ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
KEY_ENV = "ANTHROPIC_API_KEY"
# The Messages API requires max_tokens; this is sent when the request sets none. Every
# current Claude model allows at least this many output tokens.
DEFAULT_MAX_TOKENS = 4096

# OpenAI-style parameters the Messages API rejects ("Extra inputs are not permitted") or
# has no equivalent for, so they are never sent: seed, presence_penalty,
# frequency_penalty, repetition_penalty, logit_bias, logprobs, top_logprobs, n, min_p,
# response_format (Anthropic's structured output is a different shape: pass it under
# extra_body), reasoning_effort (use extra_body={"thinking": {...}}), grammar (llama.cpp),
# parallel_tool_calls, stream and stream_options (this transport reads one JSON body).
DROPPED_PARAMS = frozenset({
    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "n", "min_p", "response_format", "reasoning_effort",
    "grammar", "parallel_tool_calls", "stream", "stream_options",
})  # fmt: skip
# Mapped to their Messages names by build_body; everything else (temperature, top_p,
# top_k, metadata, and Anthropic's own: thinking, tools, tool_choice, service_tier, ...)
# is sent as it is.
MAPPED_PARAMS = frozenset({"max_tokens", "max_completion_tokens", "stop", "user", "extra_body"})

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
SYSTEM_ROLES = frozenset({"system", "developer"})
TURN_ROLES = frozenset({"user", "assistant"})
CONTEXT_WINDOW_HINTS = ("prompt is too long", "exceed context limit", "context window")
PROMPT_UNSUPPORTED = (
    "the anthropic transport speaks the Messages API only: a text-completion prompt "
    "(base-model mode) has no equivalent there. Send chat messages, or use an "
    "OpenAI-compatible endpoint with a completions route for base models."
)
_warned: set[str] = set()


@lru_cache(maxsize=16)
def messages_url(base_url: str | None) -> str:
    """``{base}/v1/messages``; ``base`` may be given with or without ``/v1`` (or the
    whole ``/v1/messages``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url or ANTHROPIC_URL)
    root = parts.path.rstrip("/")
    for suffix in ("/v1/messages", "/v1"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
            break
    return urlunsplit(parts._replace(path=root + "/v1/messages"))


# ---- request ---------------------------------------------------------------------------

def _blocks(content: Any, where: str) -> list[Any]:
    """A message's content as a list of content blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return list(content)
    raise CallError("bad_request", f"{where}: content must be a string or a list of content "
                                   f"blocks, not {type(content).__name__}")


def _system_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = _blocks(content, where)
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict)
                   and p.get("type") == "text")


def split_system(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The system text (every system message, joined by a blank line) and the turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in SYSTEM_ROLES:
            text = _system_text(message.get("content"), f"messages[{i}]")
            if text:
                system.append(text)
        elif role in TURN_ROLES:
            turns.append(message)
        else:
            raise CallError("bad_request", f"messages[{i}]: role {role!r} is not supported by "
                                           "the anthropic transport (system, user, assistant)")
    return ("\n\n".join(system) if system else None), turns


def merge_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role as one turn (their content as text blocks, in
    order); a lone message keeps its content as it is."""
    merged: list[dict[str, Any]] = []
    for i, message in enumerate(turns):
        role, content = message["role"], message.get("content")
        if not isinstance(content, (str, list)):
            raise CallError("bad_request", f"messages: a {role} message's content must be a "
                                           f"string or a list of content blocks, not "
                                           f"{type(content).__name__}")
        if merged and merged[-1]["role"] == role:
            last = merged[-1]
            last["content"] = _blocks(last["content"], f"turn {len(merged) - 1}") + _blocks(
                content, f"messages[{i}]")
        else:
            merged.append({"role": role, "content": content})
    return merged


def strip_prefill(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A final assistant turn (a prefill) without trailing whitespace; dropped when
    nothing is left of it. ``turns`` are build_body's own copies: changed in place."""
    if not turns or turns[-1]["role"] != "assistant":
        return turns
    content = turns[-1]["content"]
    if isinstance(content, str):
        content = content.rstrip()
    elif isinstance(content, list):
        content = list(content)
        while content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
            text = str(content[-1].get("text", "")).rstrip()
            if text:
                content[-1] = {**content[-1], "text": text}
                break
            content.pop()
    if not content:
        return turns[:-1]
    turns[-1]["content"] = content
    return turns


def _warn_dropped(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning("anthropic transport: parameter %r is not sent (the Messages API has no "
                    "such parameter)", name)


def _sampling(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in DROPPED_PARAMS:
            _warn_dropped(name)
        elif name not in MAPPED_PARAMS and value is not None:
            out[name] = value
    stop = params.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    user = params.get("user")
    if user and "metadata" not in out:
        out["metadata"] = {"user_id": str(user)}
    return out


def build_body(request: ChatRequest) -> dict[str, Any]:
    """The Messages API body for ``request`` (see the module docstring)."""
    params = request.params
    system, turns = split_system(request.messages)
    body: dict[str, Any] = {
        "model": request.model.removeprefix("anthropic/"),
        "max_tokens": params.get("max_tokens") or params.get("max_completion_tokens")
        or DEFAULT_MAX_TOKENS,
        "messages": strip_prefill(merge_turns(turns)),
    }
    if system is not None:
        body["system"] = system
    body.update(_sampling(dict(params)))
    extra = params.get("extra_body")
    if extra:
        body.update(extra)
    return body


# ---- response --------------------------------------------------------------------------

def _text(content: list[Any]) -> str | None:
    """The text blocks joined; None when there is none (thinking blocks are skipped)."""
    texts: list[str] = []
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise malformed(f"content[{i}] is a {type(block).__name__}, not an object: "
                            f"{preview(block)}")
        if block.get("type") == "text":
            texts.append(field_of(block, "text", str, f"content[{i}].") or "")
    return "".join(texts) if texts else None


def _usage(body: dict[str, Any]) -> Usage:
    usage = field_of(body, "usage", dict, "") or {}
    prompt = (token_count(usage, "input_tokens") + token_count(usage, "cache_creation_input_tokens")
              + token_count(usage, "cache_read_input_tokens"))
    return Usage(prompt, token_count(usage, "output_tokens"))


def parse_message(raw: bytes, latency: float, rate_limits: RateLimitInfo | None = None
                  ) -> Completion:
    """A Messages API 200 body -> :class:`Completion`; raises :class:`CallError`
    (``malformed_response`` when the body cannot be read, ``empty_response`` when it
    holds no text block)."""
    return message_of(load_object(raw), latency, rate_limits)


def message_of(body: dict[str, Any], latency: float,
               rate_limits: RateLimitInfo | None = None) -> Completion:
    """:func:`parse_message` of a body already decoded (a batch's result)."""
    if body.get("type") == "error":
        message, kind = _error_fields(body.get("error"))
        raise malformed(f"a 200 whose body is an error: {kind or 'error'}: {message}")
    content = body.get("content")
    if not isinstance(content, list):
        found = "missing" if content is None else f"a {type(content).__name__}"
        raise malformed(f"content is {found}, not a list: {preview(content)}")
    text = _text(content)
    if text is None:
        raise CallError("empty_response", "the response has no text content", None, None,
                        rate_limits)
    stop = field_of(body, "stop_reason", str, "")
    model = body.get("model")
    return Completion(text=text, finish_reason=FINISH_REASONS.get(stop, stop) if stop else None,
                      usage=_usage(body), model="" if model is None else str(model),
                      latency_s=latency, rate_limits=rate_limits)


# ---- errors ----------------------------------------------------------------------------

def _error_fields(error: Any) -> tuple[str, str | None]:
    if isinstance(error, dict):
        kind = error.get("type")
        return str(error.get("message") or error), (str(kind) if kind is not None else None)
    return str(error), None


def _error_detail(raw: bytes) -> tuple[str, str | None]:
    """The message and the error type of an error body (any shape; Anthropic's is
    ``{"type": "error", "error": {"type": ..., "message": ...}}``)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:  # a proxy's or Cloudflare's HTML page, say
        return raw[:500].decode("utf-8", "replace").strip() or "(empty body)", None
    return _error_fields(body.get("error", body) if isinstance(body, dict) else body)


def classify(status: int, raw: bytes, headers: Any,
             rate_limits: RateLimitInfo | None = None) -> CallError:
    """An error response -> :class:`CallError`: by Anthropic's error type when it is one
    datagen knows, else by status (529 overloaded -> server_error, retried)."""
    message, error_type = _error_detail(raw)
    kind = kind_for_error_type(error_type) or kind_for_status(status)
    if kind == "bad_request" and any(h in message.lower() for h in CONTEXT_WINDOW_HINTS):
        kind = "context_window"
    label = f"{status} {error_type}" if error_type else str(status)
    return CallError(kind, redact(f"{label}: {message}"), status, parse_retry_after(headers),
                     rate_limits)


# ---- transport -------------------------------------------------------------------------

class AnthropicTransport:
    """POSTs to ``{base_url}/v1/messages`` over pooled connections (see wire).

    The key is the request's ``api_key``, else ``api_key`` given here, else the
    ``ANTHROPIC_API_KEY`` environment variable; the URL is the request's ``base_url``,
    else ``base_url`` given here, else https://api.anthropic.com.
    """

    name = "anthropic"

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 pool_size: int = 64, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self.url = messages_url(base_url)
        self._key = api_key or os.environ.get(KEY_ENV)
        self._headers = {"Content-Type": "application/json",
                         "anthropic-version": ANTHROPIC_VERSION, **(headers or {})}
        if self._key:
            self._headers["x-api-key"] = self._key
        self.pool_size = pool_size
        self._session: Any = None
        self.track_sends = False  # set when the endpoint has a rate window

    def _open(self) -> Any:
        self._session = session_for(self._session, self.pool_size, self._headers,
                                    self.track_sends)
        return self._session

    def _target(self, request: ChatRequest) -> tuple[str, dict[str, str] | None]:
        """The URL and the headers this request needs beyond the session's."""
        url = self.url if request.base_url in (None, self.base_url) else messages_url(
            request.base_url)
        key = request.api_key
        return url, ({"x-api-key": key} if key and key != self._key else None)

    async def complete(self, request: ChatRequest) -> Completion:
        if request.prompt is not None:
            raise CallError("bad_request", PROMPT_UNSUPPORTED)
        data = orjson.dumps(build_body(request))
        url, headers = self._target(request)
        session = self._open()
        started = time.perf_counter()
        status, raw, response_headers = await post(session, url, data, request.timeout,
                                                   headers)
        rate_limits = from_anthropic_headers(response_headers)
        if status != 200:
            raise classify(status, raw, response_headers, rate_limits)
        try:
            return parse_message(raw, time.perf_counter() - started, rate_limits)
        except CallError as err:  # an unreadable 200 still said what the limits are
            err.rate_limits = err.rate_limits or rate_limits
            raise

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
