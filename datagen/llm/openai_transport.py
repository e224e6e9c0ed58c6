"""The fast transport for OpenAI-compatible endpoints: one aiohttp session, orjson both ways.

litellm spends ~9 ms of CPU per call (its openai SDK path on httpx, request preparation,
cost bookkeeping), so one process tops out near 100 calls/s whatever the provider allows;
a plain aiohttp POST costs ~0.3 ms. For endpoints that speak the OpenAI chat API (OpenAI,
vLLM, SGLang, llama.cpp, Ollama's /v1, DeepSeek, Together, OpenRouter, Groq, ...) this
transport sends the request itself, with the same semantics as the litellm path: the
same error kinds (so the same retries), Retry-After, usage. No hidden retries: each call
is one HTTP request.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from datagen.llm.errors import CallError, kind_for_status, parse_retry_after
from datagen.llm.types import ChatRequest, Completion, Usage
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
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return str(error.get("message") or error), (str(code) if code is not None else None)
    return str(error), None


def _classify(status: int, raw: bytes, headers: Any) -> CallError:
    message, code = _error_detail(raw)
    kind = kind_for_status(status)
    lowered = f"{code or ''} {message}".lower()
    if kind == "bad_request" and ("context_length" in lowered or "maximum context" in lowered
                                  or "too many tokens" in lowered):
        kind = "context_window"
    elif kind == "bad_request" and "content_filter" in lowered:
        kind = "content_filter"
    return CallError(kind, redact(f"{status}: {message}"), status, parse_retry_after(headers))


def parse_completion(raw: bytes, latency: float) -> Completion:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CallError("server_error", f"the response is not valid JSON: {exc}") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices:
        raise CallError("empty_response", "the response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content")
    if text is None:
        text = choice.get("text")
    if text is None:
        raise CallError("empty_response", "the response has no text content")
    usage = body.get("usage") or {}
    return Completion(
        text=text,
        finish_reason=choice.get("finish_reason"),
        usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens")
                                                                or 0)),
        model=str(body.get("model") or ""),
        latency_s=latency,
    )


class OpenAITransport:
    """POSTs to ``{base_url}/chat/completions`` with a pooled aiohttp session."""

    name = "openai"

    def __init__(self, provider: str, base_url: str | None, api_key: str | None,
                 pool_size: int = 64, headers: dict[str, str] | None = None) -> None:
        default_url, key_env = OPENAI_COMPATIBLE.get(provider, OPENAI_COMPATIBLE["openai"])
        root = (base_url or default_url).rstrip("/")
        self.url = root + "/chat/completions"
        self.completions_url = root + "/completions"  # text completion, for base models
        key = api_key or os.environ.get(key_env)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.pool_size = pool_size
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.pool_size,
                                             limit_per_host=self.pool_size,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  json_serialize=lambda o: orjson.dumps(
                                                      o).decode())
        return self._session

    def _body(self, request: ChatRequest) -> bytes:
        params = dict(request.params)
        extra = params.pop("extra_body", None) or {}  # the openai SDK's way: merged in
        model = request.model.split("/", 1)[1] if "/" in request.model else request.model
        if request.prompt is not None:
            return orjson.dumps({"model": model, "prompt": request.prompt, **params, **extra})
        return orjson.dumps({"model": model, "messages": request.messages, **params, **extra})

    async def complete(self, request: ChatRequest) -> Completion:
        import aiohttp

        session = self._open()
        started = time.perf_counter()
        try:
            url = self.completions_url if request.prompt is not None else self.url
            async with session.post(url, data=self._body(request),
                                    timeout=aiohttp.ClientTimeout(total=request.timeout)
                                    ) as response:
                raw = await response.read()
                if response.status != 200:
                    raise _classify(response.status, raw, response.headers)
        except asyncio.TimeoutError:
            raise CallError("timeout", f"no answer within {request.timeout:g}s") from None
        except aiohttp.ClientResponseError as exc:
            raise CallError(kind_for_status(exc.status), redact(str(exc)), exc.status) from None
        except aiohttp.ClientError as exc:  # refused, reset, DNS, payload errors
            raise CallError("connection", redact(f"{type(exc).__name__}: {exc}")) from None
        except CallError:
            raise
        except Exception as exc:  # anything else below us (a cassette miss, a proxy hook):
            # an item-level error, as litellm reports it, never a crash of the run
            raise CallError("error", redact(f"{type(exc).__name__}: {exc}")) from None
        return parse_completion(raw, time.perf_counter() - started)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
