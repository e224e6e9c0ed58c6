"""One model made ready for a run: which transport, its limits, how its requests look."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from datagen.config import ModelConfig, sampling_of
from datagen.errors import ConfigError
from datagen.llm import providers
from datagen.llm.caller import Caller, Transport
from datagen.llm.throttle import (
    SEND_JITTER_MARGIN_S,
    RateSpec,
    Throttle,
    endpoint_key,
    endpoint_limits,
)  # fmt: skip
from datagen.llm.types import ChatRequest

Messages = list[dict[str, Any]]
__all__ = ["make_caller", "request_builder", "sampling_of", "transport_name"]


def api_key_of(m: ModelConfig) -> str | None:
    return m.api_key.get_secret_value() if m.api_key else None


def transport_name(m: ModelConfig) -> str:
    """Which transport serves ``m``: 'openai' (the fast aiohttp path for OpenAI-compatible
    endpoints), 'anthropic' (the fast path for Anthropic's Messages API), a registered
    provider's name (the embedded model, test fakes), or 'litellm' for everything else."""
    from datagen.llm.openai_transport import speaks_openai

    plugin = providers.registered(m)
    if plugin is not None:
        return plugin.name
    provider = m.effective_provider()
    fits = {"openai": speaks_openai(provider), "anthropic": provider == "anthropic"}
    if m.transport == "auto":
        return next((name for name, ok in fits.items() if ok), "litellm")
    if m.transport != "litellm" and not fits[m.transport]:
        need = ("an OpenAI-compatible endpoint" if m.transport == "openai" else
                "provider 'anthropic'")
        raise ConfigError(
            f"transport '{m.transport}' needs {need}, and provider '{m.provider}' is not "
            "one: use transport 'litellm' (or 'auto'), or provider 'openai' with "
            "model.base_url for an OpenAI-compatible server")
    return m.transport


def prefill_mode(m: ModelConfig) -> str:
    """How ``m`` continues a chat that ends with the assistant's opening words: "native"
    (the provider does: Anthropic), "continue" (vLLM/SGLang's continue_final_message),
    "template" (the chat template with the assistant's turn left open: the embedded model
    and llama.cpp's server), or "" when it cannot."""
    from datagen.llm.openai_transport import speaks_openai

    if m.prefill != "auto":
        return "" if m.prefill == "off" else m.prefill
    if m.is_embedded() or (m.provider == "local" and m.base_url):
        return "template"
    if providers.registered(m) is not None or m.effective_provider() == "anthropic":
        return "native"
    if speaks_openai(m.effective_provider()) and m.base_url:
        return "continue"
    return ""


def check_prefill(m: ModelConfig, step: str) -> None:
    """Raise ConfigError, naming the model, when a prompt ending with the assistant's turn
    cannot be sent to it."""
    mode = prefill_mode(m)
    if not mode:
        raise ConfigError(
            f"step '{step}': its prompt ends with the assistant's turn (a prefill), and "
            f"model {m.model_string()} cannot continue one (model.prefill: "
            f"{m.prefill}). Use a model that can (provider anthropic; a vLLM or SGLang "
            "server: prefill: continue; the embedded model or llama.cpp: prefill: template),"
            " set prefill: native if this server continues a final assistant message "
            "itself, or end the prompt with the user's message.")
    if mode == "template" and not m.is_embedded():
        from datagen.llm.local import MODELS

        name = m.model.removeprefix(f"{m.provider}/")
        if name not in MODELS:
            raise ConfigError(
                f"step '{step}': a prefill through the chat template needs the model's "
                f"template, and {name!r} is not a model datagen knows locally ("
                f"{', '.join(MODELS)}): use prefill: continue if the server supports "
                "continue_final_message, or prefill: native if it continues one itself.")


def _no_choices(m: ModelConfig) -> str | None:
    """Why ``m`` cannot answer one request with several choices (OpenAI's ``n``), or None
    when it can (OpenAI; OpenAI-compatible servers and litellm providers that honour it)."""
    name = transport_name(m)
    if name == "anthropic" or m.effective_provider() == "anthropic":
        return "Anthropic's API answers each request once (it has no n)"
    if name not in ("openai", "litellm"):
        what = "the embedded model" if m.is_embedded() else f"provider '{m.provider}'"
        return f"{what} answers each request once, in this process"
    return None


def shares_samples(m: ModelConfig) -> bool:
    """Whether the samples of one prompt share one request with ``n`` = samples
    (model.samples_in_one_request; auto: only OpenAI's own API, where the prompt is then
    billed once: llama.cpp's server and many others ignore or reject ``n``)."""
    if m.samples_in_one_request == "auto":
        return m.effective_provider() == "openai" and not m.base_url and \
            _no_choices(m) is None
    return bool(m.samples_in_one_request) and _no_choices(m) is None


def check_samples_request(m: ModelConfig) -> None:
    """Raise ConfigError, naming the model, for samples_in_one_request: true on a model
    that cannot answer with several choices."""
    why = _no_choices(m) if m.samples_in_one_request is True else None
    if why is not None:
        raise ConfigError(
            f"model {m.model_string()}: samples_in_one_request is true, but {why}: its "
            "samples cannot share one request. Set model.samples_in_one_request to auto "
            "or false (each sample then asks on its own).")


def make_transport(m: ModelConfig, concurrency: int) -> Transport:
    name = transport_name(m)
    plugin = providers.registered(m)
    if plugin is not None:
        transport: Transport = plugin.make_transport(m, concurrency)
        return transport
    if name == "openai":
        from datagen.llm.openai_transport import OpenAITransport

        transport = OpenAITransport(m.effective_provider(), m.base_url, api_key_of(m),
                                    pool_size=concurrency, headers=m.headers)
        transport.prefill = prefill_mode(m)
        return transport
    if name == "anthropic":
        from datagen.llm.anthropic_transport import AnthropicTransport

        return AnthropicTransport(m.base_url, api_key_of(m), pool_size=concurrency,
                                  headers=m.headers)
    from datagen.llm.litellm_transport import LiteLLMTransport

    litellm_transport = LiteLLMTransport()
    litellm_transport.prefill = prefill_mode(m)
    return litellm_transport


def check_provider(m: ModelConfig) -> None:
    """Raise ConfigError for a provider or local model that cannot serve requests (or
    cannot take the settings it was given)."""
    check_samples_request(m)
    plugin = providers.registered(m)
    if plugin is not None:
        if plugin.check is not None:
            plugin.check(m)
        return
    if transport_name(m) != "litellm":
        return  # a provider a fast path knows: no need to load litellm to check it
    from datagen.llm.litellm_transport import known_providers

    known = known_providers()
    if m.effective_provider() not in known:
        close = difflib.get_close_matches(m.provider, sorted(known), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown model provider '{m.provider}' (model.provider).{hint} For any "
            "OpenAI-compatible server (vLLM, llama.cpp, Ollama's /v1) use provider "
            "'openai' with model.base_url."
        )


def wants_constraint(m: ModelConfig) -> bool:
    """Whether extractors' constraints go to this model (model.constrain_output; auto: the
    local model needs it, embedded or served by llama.cpp, i.e. provider: local with a
    base_url; other models follow format instructions on their own)."""
    return m.provider == "local" if m.constrain_output is None else m.constrain_output


def _constraint_of(extractor: Any, sampling: dict[str, Any], prefill: str | None = None
                   ) -> dict[str, Any] | None:
    """After a ``prefill`` (the assistant's opening words, when they are fixed text) the
    constraint is for the continuation: only an extractor that knows how gives one."""
    budget = sampling.get("max_tokens") or sampling.get("max_completion_tokens")
    if prefill is not None:
        after = getattr(extractor, "constraint_after", None)
        return after(prefill, budget) if callable(after) else None
    constraint = getattr(extractor, "constraint", None)
    if not callable(constraint):
        return None
    params: dict[str, Any] | None = constraint(budget)
    return params


def constraint_params(m: ModelConfig, extractor: Any, sampling: dict[str, Any],
                      prefill: str | None = None) -> dict[str, Any]:
    """The extractor's output constraint, for models that take one (model.constrain_output);
    never replaces a grammar or format the user set."""
    params = _constraint_of(extractor, sampling, prefill) if wants_constraint(m) else None
    if not params or any(k in sampling for k in ("grammar", "response_format")):
        return {}
    if "grammar" in params and not m.is_embedded():
        return {"extra_body": {"grammar": params["grammar"]}}  # llama.cpp server form
    return dict(params)


def unsent_constraint(m: ModelConfig, extractor: Any, sampling: dict[str, Any]) -> str | None:
    """The extractor's name when it has a constraint that a self-hosted server (a
    base_url) could enforce but that is not sent (constrain_output off, no format of the
    user's): the run's summary suggests constrain_output when its items fail extraction."""
    if wants_constraint(m) or not m.base_url or m.provider == "anthropic" or any(
            k in sampling for k in ("grammar", "response_format")):
        return None
    if _constraint_of(extractor, sampling) is None:
        return None
    return str(getattr(extractor, "name", None) or type(extractor).__name__)


def server_params(m: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` in the form the model's server takes. A llama.cpp server (provider:
    local with a base_url) takes a JSON schema as ``{type: json_object, schema: ...}``
    and answers OpenAI's ``json_schema`` form with a 500: translated here, as the
    embedded model translates it in process."""
    fmt = params.get("response_format")
    if m.provider == "local" and m.base_url and isinstance(fmt, dict) and \
            fmt.get("type") == "json_schema":
        from datagen.llm.local import json_object_form

        return {**params, "response_format": json_object_form(fmt)}
    return params


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
    params = server_params(m, params)
    provider, headers, key = m.effective_provider(), dict(m.headers), api_key_of(m)

    def build(messages: Messages | None, prompt: str | None = None) -> ChatRequest:
        return ChatRequest(model=model, messages=messages or [], params=params,
                           provider=provider, base_url=base_url, prompt=prompt,
                           headers=headers, api_key=key, timeout=timeout)

    return build


def rate_spec(m: ModelConfig, transport: str) -> RateSpec:
    # litellm spends milliseconds of CPU between our grant and its send: more margin
    margin = SEND_JITTER_MARGIN_S["slow" if transport == "litellm" else "fast"]
    return RateSpec(m.rate_limit, m.requests_per_minute, m.tokens_per_minute,
                    m.input_tokens_per_minute, m.output_tokens_per_minute,
                    m.max_retry_after, margin)


def make_caller(m: ModelConfig, concurrency: int, cache: Any) -> Caller:
    transport = make_transport(m, concurrency)
    key = endpoint_key(m.effective_provider(), m.base_url, m.model_string(), api_key_of(m))
    limits = endpoint_limits(key, rate_spec(m, transport.name), m.model_string())
    if limits.window is not None and hasattr(transport, "track_sends"):
        transport.track_sends = True  # the window counts sends from when they are written
        limits.reports_writes = True
    throttle = Throttle(concurrency=concurrency, limits=limits)
    return Caller(transport, throttle, max_retries=m.max_retries, cache=cache,
                  prices=prices_of(m))


def prices_of(m: ModelConfig) -> tuple[float, float] | None:
    from datagen.costs import prices_for

    return prices_for(m)
