"""The transport for every provider: ``litellm.acompletion``.

litellm is imported on first use (it takes seconds), with its price map read from the
local copy so nothing reaches for the network. Retries are ours: litellm's own
(``num_retries``) and the openai SDK's (``max_retries``, two by default) are turned off,
or a 429 would hit the server three times per attempt and every count would lie.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache
from types import ModuleType
from typing import Any

from datagen.llm.errors import CallError, invalid_request, kind_for_status, parse_retry_after
from datagen.llm.ratelimits import from_anthropic_headers, from_openai_headers
from datagen.llm.types import ChatRequest, Choice, Completion, RateLimitInfo, Usage
from datagen.redact import redact


@lru_cache(maxsize=1)
def import_litellm() -> ModuleType:
    """Import litellm once, offline and quiet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stderr
    litellm.telemetry = False
    from datagen.llm.litellm_quiet import quiet_litellm

    quiet_litellm(litellm)  # flat memory: no logging job queued per call (see there)
    _preload_openai_chat()
    return litellm


@lru_cache(maxsize=1)
def _preload_openai_chat() -> None:
    """The openai SDK's chat resources, which litellm imports inside its first call to an
    OpenAI-compatible endpoint: 0.4 s with the event loop stopped, in the middle of a run
    (every other request waited behind it), now with litellm's own import."""
    with contextlib.suppress(ImportError):
        import openai.resources.chat  # noqa: F401


def known_providers() -> set[str]:
    litellm = import_litellm()
    return {p.value if hasattr(p, "value") else str(p) for p in litellm.provider_list}


def _headers_of(exc: BaseException) -> Any:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers:
        return headers
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None)


def rate_limits_of(headers: Any) -> RateLimitInfo | None:
    """The limits a response's headers state, as litellm hands them on: OpenAI's
    x-ratelimit-* as sent, other providers' behind ``llm_provider-``."""
    if not headers:
        return None
    try:
        plain = {str(k).lower().removeprefix("llm_provider-"): str(v)
                 for k, v in dict(headers).items()}
    except (TypeError, ValueError):
        return None
    return from_openai_headers(plain) or from_anthropic_headers(plain)


_UNREADABLE = ("Invalid response object", "Empty or invalid response",
               "LiteLLM: provider returned")


def _cause(exc: BaseException, message: str) -> str:
    """What an exception was raised from, at the bottom of its chain, when that says more
    than ``message`` (e.g. the connection refused, or a test cassette without the request)."""
    root, seen = exc, 0
    while seen < 20 and (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
        seen += 1
    text = str(root).strip()
    if root is exc or not text or text in message:
        return ""
    return redact(f" (cause: {type(root).__name__}: {text[:2000]})")


def classify(exc: BaseException) -> CallError:
    """Map any exception from litellm (or below it) to a :class:`CallError`."""
    litellm = import_litellm()
    message = redact(str(getattr(exc, "message", None) or exc) or type(exc).__name__)
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    headers = _headers_of(exc)
    retry_after = parse_retry_after(headers)
    error = _classified(litellm, exc, message, status, retry_after)
    error.rate_limits = rate_limits_of(headers)
    return error


def _classified(litellm: ModuleType, exc: BaseException, message: str, status: int | None,
                retry_after: float | None) -> CallError:
    checks: list[tuple[type[BaseException], str]] = [
        (litellm.ContextWindowExceededError, "context_window"),
        (litellm.ContentPolicyViolationError, "content_filter"),
        (litellm.AuthenticationError, "auth"),
        (litellm.PermissionDeniedError, "auth"),
        (litellm.NotFoundError, "not_found"),
        (litellm.RateLimitError, "rate_limit"),
        (litellm.Timeout, "timeout"),
        (litellm.APIConnectionError, "connection"),
        (litellm.InternalServerError, "server_error"),
        (litellm.ServiceUnavailableError, "server_error"),
        (litellm.BadRequestError, "bad_request"),
        (litellm.UnprocessableEntityError, "bad_request"),
    ]
    if any(sign in message for sign in _UNREADABLE):
        # litellm's words for a 200 it could not read (choices, message or usage of the
        # wrong type): the same kind the fast transports give it
        return CallError("malformed_response", message, status, retry_after)
    if "Connection error" in message or "Cannot connect to host" in message:
        # litellm reports a refused or reset connection as an InternalServerError, and
        # the openai SDK's "Connection error." hides why: say what lies beneath it
        return CallError("connection", message + _cause(exc, message), status, retry_after)
    for cls, kind in checks:
        if isinstance(exc, cls):
            if kind == "bad_request" and status is not None and status >= 500:
                kind = "server_error"
            return CallError(invalid_request(kind, status, message), message, status,
                             retry_after)
    if isinstance(exc, TimeoutError):
        return CallError("timeout", message, status, retry_after)
    if isinstance(exc, (ConnectionError, OSError)):
        return CallError("connection", message, status, retry_after)
    return CallError(invalid_request(kind_for_status(status), status, message),
                     f"{type(exc).__name__}: {message}", status, retry_after)


def _dummy_key_needed(request: ChatRequest) -> bool:
    # A self-hosted OpenAI-compatible server (vLLM, llama.cpp, ...) takes no key, but the
    # openai SDK refuses to start without one: give it the conventional placeholder.
    return bool(request.base_url) and request.model.startswith("openai/") and not (
        os.environ.get("OPENAI_API_KEY")
    )


def _choice(choice: Any) -> Choice:
    """One of a response's choices (chat or text-completion shape); one without text is
    marked rejected, as the fast transport marks it."""
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None)
    if text is None:
        text = getattr(choice, "text", None)  # text-completion shape
    return Choice(str(text or ""), getattr(choice, "finish_reason", None),
                  rejected=text is None)


def _index(choice: Any, choices: list[Any]) -> int:
    index = getattr(choice, "index", None)
    return index if isinstance(index, int) and not isinstance(index, bool) else \
        choices.index(choice)


def _to_completion(response: Any, latency: float) -> Completion:
    choices = getattr(response, "choices", None) or []
    if not choices:
        raise CallError("empty_response", "the response has no choices")
    if len(choices) > 1:  # in their index order, as the fast transport reads them
        choices = sorted(choices, key=lambda c: _index(c, choices))
    read = [_choice(choice) for choice in choices]
    answered = [c for c in read if not c.rejected]
    if not answered:
        raise CallError("empty_response", "the response has no text content")
    usage = getattr(response, "usage", None)
    hidden = getattr(response, "_hidden_params", None)
    headers = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    return Completion(
        text=answered[0].text,
        finish_reason=answered[0].finish_reason,
        usage=Usage(
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        ),
        model=str(getattr(response, "model", "") or ""),
        latency_s=latency,
        rate_limits=rate_limits_of(headers),
        choices=tuple(read) if len(read) > 1 else (),
    )


@lru_cache(maxsize=1)
def report_sends() -> None:
    """Tell the endpoint's rate window the moment litellm writes each request.

    litellm sends through aiohttp (its default transport) after milliseconds of its own
    CPU, which under load reach tens of milliseconds between our grant and the request on
    the wire: measured at a cap of 100/s, 101 in one second at the server. aiohttp's
    request class is where the write happens; litellm's sessions are its own, so the hook
    goes on the class: it only reads a context variable, set while one of our requests is
    being sent (any other aiohttp request of the process is unaffected).

    The hook is on ``write_bytes``, where the request (its headers wait for the body, to
    go out together) reaches the socket, not on ``send``: on Python 3.11 ``send`` hands
    the body to a task of its own, which a loop busy with litellm's CPU ran up to tens of
    milliseconds later (measured: 201 in one second at a cap of 200, 1 run in 3)."""
    import aiohttp

    from datagen.llm.ratewindow import mark_sent

    original = aiohttp.ClientRequest.write_bytes
    if getattr(original, "datagen_marks_sends", False):
        return

    async def write_bytes(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark_sent()
        return await original(self, *args, **kwargs)

    write_bytes.datagen_marks_sends = True  # type: ignore[attr-defined]
    aiohttp.ClientRequest.write_bytes = write_bytes  # type: ignore[method-assign]


class LiteLLMTransport:
    """Sends a :class:`ChatRequest` through ``litellm.acompletion``."""

    name = "litellm"
    prefill = ""  # how a chat ending with the assistant's turn is sent (runtime sets it)

    @property
    def track_sends(self) -> bool:
        return False

    @track_sends.setter
    def track_sends(self, value: bool) -> None:
        """Set when the endpoint has a rate window (see :func:`report_sends`)."""
        if value:
            report_sends()

    async def complete(self, request: ChatRequest) -> Completion:
        litellm = import_litellm()
        prompt = request.prompt
        if prompt is None and request.prefill is not None and self.prefill == "template":
            from datagen.llm.local import template_prompt

            prompt = template_prompt(request.model, list(request.messages))
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "timeout": request.timeout,
            "num_retries": 0,
            "max_retries": 0,
            **request.params,
        }
        if request.api_key:
            kwargs["api_key"] = request.api_key
        elif _dummy_key_needed(request):
            kwargs["api_key"] = "EMPTY"
        if request.base_url:
            kwargs["api_base"] = request.base_url
        if request.headers:
            kwargs["extra_headers"] = dict(request.headers)
        if request.prefill is not None and self.prefill == "continue":
            kwargs["extra_body"] = {**(kwargs.get("extra_body") or {}),
                                    "continue_final_message": True,
                                    "add_generation_prompt": False}
        started = time.perf_counter()
        try:
            if prompt is not None:  # text completion: a base model, a plain prompt
                kwargs.pop("messages")
                response = await litellm.atext_completion(prompt=prompt, **kwargs)
            else:
                response = await litellm.acompletion(**kwargs)
        except CallError:
            raise
        except Exception as exc:  # every provider failure is classified, none escapes raw
            raise classify(exc) from None
        return _to_completion(response, time.perf_counter() - started)

    async def aclose(self) -> None:
        return None
