"""One model made ready for a run: which transport, its limits, how its requests look."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from datagen.config import ModelConfig, Settings
from datagen.errors import ConfigError
from datagen.llm.caller import Caller, Transport
from datagen.llm.throttle import Throttle
from datagen.llm.types import ChatRequest

# Providers datagen serves itself (registered with litellm as custom providers).
BUILTIN_PROVIDERS: frozenset[str] = frozenset({"local", "fake"})
Messages = list[dict[str, str]]


def transport_name(m: ModelConfig) -> str:
    """'openai' (the fast aiohttp path) or 'litellm', as model.transport resolves."""
    from datagen.llm.openai_transport import speaks_openai

    fits = speaks_openai(m.effective_provider()) and not m.is_embedded()
    if m.transport == "auto":
        return "openai" if fits else "litellm"
    if m.transport == "openai" and not fits:
        raise ConfigError(
            f"transport 'openai' needs an OpenAI-compatible endpoint, and provider "
            f"'{m.provider}' is not one: use transport 'litellm' (or 'auto'), or "
            "provider 'openai' with model.base_url"
        )
    return m.transport


def make_transport(m: ModelConfig, concurrency: int) -> Transport:
    if transport_name(m) == "openai":
        from datagen.llm.openai_transport import OpenAITransport

        key = m.api_key.get_secret_value() if m.api_key else None
        return OpenAITransport(m.effective_provider(), m.base_url, key, pool_size=concurrency)
    from datagen.llm.litellm_transport import LiteLLMTransport

    return LiteLLMTransport()


def check_provider(m: ModelConfig) -> None:
    """Raise ConfigError for a provider or local model that cannot serve requests."""
    if transport_name(m) == "openai":
        return  # a provider the fast path knows: no need to load litellm to check it
    if m.is_embedded():
        from datagen.llm.local import check_available

        check_available(m.model.removeprefix("local/"))
        return
    if m.provider in BUILTIN_PROVIDERS:
        return
    from datagen.llm.litellm_transport import known_providers

    known = known_providers()
    if m.provider not in known:
        close = difflib.get_close_matches(m.provider, sorted(known), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown model provider '{m.provider}' (model.provider).{hint} For any "
            "OpenAI-compatible server (vLLM, llama.cpp, Ollama's /v1) use provider "
            "'openai' with model.base_url."
        )


def constraint_params(m: ModelConfig, extractor: Any, sampling: dict[str, Any]
                      ) -> dict[str, Any]:
    """The extractor's output constraint, for models that take one (model.constrain_output);
    never replaces a grammar or format the user set."""
    # auto: the local model needs it, embedded or served by llama.cpp (provider: local
    # with a base_url); other models follow format instructions on their own
    wanted = m.provider == "local" if m.constrain_output is None else m.constrain_output
    constraint = getattr(extractor, "constraint", None)
    params = constraint(sampling.get("max_tokens") or sampling.get("max_completion_tokens")) \
        if wanted and callable(constraint) else None
    if not params or any(k in sampling for k in ("grammar", "response_format")):
        return {}
    if "grammar" in params and not m.is_embedded():
        return {"extra_body": {"grammar": params["grammar"]}}  # llama.cpp server form
    return dict(params)


def response_format_params(response_format: Any) -> dict[str, Any]:
    """A pydantic model (or a dict) as a request's response_format: OpenAI's json_schema
    form, which the embedded model translates for llama.cpp."""
    if response_format is None:
        return {}
    if isinstance(response_format, dict):
        return {"response_format": response_format}
    schema_of = getattr(response_format, "model_json_schema", None)
    if not callable(schema_of):
        raise ConfigError(f"response_format must be a pydantic model class or a dict, not "
                          f"{response_format!r}")
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": response_format.__name__, "schema": schema_of()}}}


def request_builder(m: ModelConfig, params: dict[str, Any]
                    ) -> Callable[[Messages | None, str | None], ChatRequest]:
    """(messages, prompt) -> ChatRequest, with everything else fixed once per run."""
    model, base_url, timeout = m.model_string(), m.base_url, m.timeout
    key = m.api_key.get_secret_value() if m.api_key else None

    def build(messages: Messages | None, prompt: str | None = None) -> ChatRequest:
        return ChatRequest(model=model, messages=messages or [], params=params, api_key=key,
                           base_url=base_url, timeout=timeout, prompt=prompt)

    return build


def sampling_of(m: ModelConfig) -> dict[str, Any]:
    """A model's sampling parameters that are set, plus its extra_params."""
    return Settings(model=m).sampling_params()


def make_caller(m: ModelConfig, concurrency: int, cache: Any) -> Caller:
    transport = make_transport(m, concurrency)
    throttle = Throttle(m.rate_limit, requests_per_minute=m.requests_per_minute,
                        tokens_per_minute=m.tokens_per_minute, concurrency=concurrency,
                        slack=transport.name != "litellm")
    from datagen.costs import prices_for

    return Caller(transport, throttle, max_retries=m.max_retries, cache=cache,
                  prices=prices_for(m))
