"""The fast transport for OpenAI-compatible endpoints: pooled HTTP/1.1, orjson both ways.

litellm spends ~9 ms of CPU per call (its openai SDK path on httpx, request preparation,
cost bookkeeping), so one process tops out near 100 calls/s whatever the provider allows;
a POST of its own costs ~0.05 ms (datagen.llm.http1). For endpoints that speak the OpenAI
chat API (OpenAI, vLLM, SGLang, llama.cpp, Ollama's /v1, DeepSeek, Together, OpenRouter,
Groq, ...) this transport sends the request itself, with the same semantics as the litellm path: the
same error kinds (so the same retries), Retry-After, usage. No hidden retries: each call
is one HTTP request.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from datagen.llm.errors import CallError, invalid_request, kind_for_status, parse_retry_after
from datagen.llm.ratelimits import from_openai_headers
from datagen.llm.types import ChatRequest, Choice, Completion, RateLimitInfo, Usage
from datagen.llm.wire import (
    field_of,
    join_url,
    load_object,
    malformed,
    post,
    preview,
    session_for,
    token_count,
)  # fmt: skip
from datagen.redact import redact

# litellm provider -> (OpenAI-compatible base URL, environment variable with its key)
OPENAI_COMPATIBLE: dict[str, tuple[str, str]] = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "together_ai": ("https://api.together.xyz/v1", "TOGETHERAI_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "fireworks_ai": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
}


def speaks_openai(provider: str) -> bool:
    return provider in OPENAI_COMPATIBLE


def _error_detail(raw: bytes) -> tuple[str, str | None]:
    """The provider's message and error code from an error body (any shape)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:500].decode("utf-8", "replace") or "(empty body)", None
    return _error_fields(body.get("error", body) if isinstance(body, dict) else body)


def _error_fields(error: Any) -> tuple[str, str | None]:
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return str(error.get("message") or error), (str(code) if code is not None else None)
    return str(error), None


def _refine(kind: str, message: str, code: str | None) -> str:
    lowered = f"{code or ''} {message}".lower()
    if kind == "bad_request" and ("context_length" in lowered or "maximum context" in lowered
                                  or "too many tokens" in lowered):
        return "context_window"
    if kind == "bad_request" and "content_filter" in lowered:
        return "content_filter"
    return kind


def classify(status: int, raw: bytes, headers: Any,
              rate_limits: RateLimitInfo | None = None) -> CallError:
    message, code = _error_detail(raw)
    kind = _refine(invalid_request(kind_for_status(status), status, message), message, code)
    return CallError(kind, redact(f"{status}: {message}"), status, parse_retry_after(headers),
                     rate_limits)


def _in_band_error(error: Any, rate_limits: RateLimitInfo | None) -> CallError:
    """A 200 whose body is ``{"error": ...}`` (OpenRouter and some proxies answer so):
    classified by the HTTP status its ``code`` names, else as a bad request (refined by
    the message: a context overflow, a content filter) - as litellm classifies it, so both
    transports agree on every answer."""
    message, code = _error_fields(error)
    status = None
    number = error.get("code") if isinstance(error, dict) else None
    if isinstance(number, int) and not isinstance(number, bool) and 400 <= number < 600:
        status = number
    kind = kind_for_status(status) if status is not None else "bad_request"
    return CallError(_refine(kind, message, code),
                     redact(f"{status or 200} (error in the body): {message}"), status,
                     None, rate_limits)


def _finish_reason(value: Any) -> str | None:
    """Why it stopped; a value that is not text (a number from an odd server) is read as
    "stop", as litellm reads it: the answer itself is fine."""
    if value is None or isinstance(value, str):
        return value
    return "stop"


def _text_of(content: Any) -> str | None:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise malformed(f"a content part is a {type(part).__name__}, not an object: "
                                f"{preview(part)}")
            if part.get("type") == "text":
                parts.append(field_of(part, "text", str, "content part ") or "")
        return "".join(parts)
    raise malformed(f"message.content is a {type(content).__name__}: {preview(content)}")


def parse_completion(raw: bytes, latency: float, rate_limits: RateLimitInfo | None = None
                     ) -> Completion:
    """A chat (or text) completion body -> :class:`Completion`; raises :class:`CallError`
    (``malformed_response``, ``empty_response``, or the kind of an error in the body).
    Several choices (a request with ``n`` > 1) are all read, in their ``index`` order."""
    return completion_of(load_object(raw), latency, rate_limits)


def completion_of(body: dict[str, Any], latency: float,
                  rate_limits: RateLimitInfo | None = None) -> Completion:
    """:func:`parse_completion` of a body already decoded (a batch's result line)."""
    if body.get("choices") is None and body.get("error") is not None:
        raise _in_band_error(body["error"], rate_limits)
    choices = field_of(body, "choices", list, "")
    if not choices:
        raise CallError("empty_response", "the response has no choices", None, None,
                        rate_limits)
    read = sorted((_choice(choice, i) for i, choice in enumerate(choices)),
                  key=lambda pair: pair[0])
    answered = [c for _, c in read if not c.rejected]
    if not answered:
        raise CallError("empty_response", "the response has no text content", None, None,
                        rate_limits)
    usage = field_of(body, "usage", dict, "") or {}
    model = body.get("model")
    return Completion(
        text=answered[0].text,
        finish_reason=answered[0].finish_reason,
        usage=Usage(token_count(usage, "prompt_tokens"), token_count(usage, "completion_tokens")),
        model="" if model is None else str(model),
        latency_s=latency,
        rate_limits=rate_limits,
        choices=tuple(c for _, c in read) if len(read) > 1 else (),
    )


def build_body(request: ChatRequest, prefill: str = "") -> bytes:
    """The JSON body of ``request`` for an OpenAI-compatible endpoint (chat, or text
    completion when it has a prompt): what the fast transport POSTs, and what a batch's
    request line carries. A chat ending with the assistant's turn (a prefill) goes as the
    server continues one: ``prefill`` "template" (llama.cpp's server: the chat template
    left open, as a prompt) or "continue" (vLLM, SGLang: their flags)."""
    params = dict(request.params)
    extra = params.pop("extra_body", None) or {}  # the openai SDK's way: merged in
    model = request.model.split("/", 1)[1] if "/" in request.model else request.model
    prompt = request.prompt
    if prompt is None and request.prefill is not None:
        if prefill == "template":
            from datagen.llm.local import template_prompt

            prompt = template_prompt(request.model, list(request.messages))
        elif prefill == "continue":
            extra = {**extra, "continue_final_message": True, "add_generation_prompt": False}
    if prompt is not None:
        return orjson.dumps({"model": model, "prompt": prompt, **params, **extra})
    return orjson.dumps({"model": model, "messages": request.messages, **params, **extra})


def _choice(choice: Any, i: int) -> tuple[int, Choice]:
    """``choices[i]``: its index (its position when it states none) and its answer; one
    without text is marked rejected (of several, the others are still good)."""
    where = f"choices[{i}]"
    if not isinstance(choice, dict):
        raise malformed(f"{where} is a {type(choice).__name__}, not an object: "
                        f"{preview(choice)}")
    message = field_of(choice, "message", dict, f"{where}.") or {}
    text = _text_of(message.get("content"))
    if text is None:
        text = field_of(choice, "text", str, f"{where}.")
    index = choice.get("index")
    position = index if isinstance(index, int) and not isinstance(index, bool) else i
    finish = _finish_reason(choice.get("finish_reason"))
    return position, Choice(text or "", finish, rejected=text is None)


class OpenAITransport:
    """POSTs to ``{base_url}/chat/completions`` over pooled connections (see wire)."""

    name = "openai"

    def __init__(self, provider: str, base_url: str | None, api_key: str | None,
                 pool_size: int = 64, headers: dict[str, str] | None = None) -> None:
        default_url, key_env = OPENAI_COMPATIBLE.get(provider, OPENAI_COMPATIBLE["openai"])
        root = base_url or default_url
        self.url = join_url(root, "/chat/completions")
        self.completions_url = join_url(root, "/completions")  # text completion: base models
        key = api_key or os.environ.get(key_env)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.pool_size = pool_size
        self._session: Any = None
        self.track_sends = False  # set when the endpoint has a rate window
        self.prefill = ""  # how a chat ending with the assistant's turn is sent (runtime)

    def _open(self) -> Any:
        self._session = session_for(self._session, self.pool_size, self._headers,
                                    self.track_sends)
        return self._session

    def _body(self, request: ChatRequest) -> tuple[str, bytes]:
        """The URL and the body of ``request``."""
        as_text = request.prompt is not None or (request.prefill is not None
                                                 and self.prefill == "template")
        return (self.completions_url if as_text else self.url), build_body(request, self.prefill)

    async def complete(self, request: ChatRequest) -> Completion:
        session = self._open()
        started = time.perf_counter()
        url, body = self._body(request)
        status, raw, headers = await post(session, url, body, request.timeout)
        rate_limits = from_openai_headers(headers)
        if status != 200:
            raise classify(status, raw, headers, rate_limits)
        try:
            return parse_completion(raw, time.perf_counter() - started, rate_limits)
        except CallError as err:  # an unreadable 200 still said what the limits are
            err.rate_limits = err.rate_limits or rate_limits
            raise

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
