"""The configuration's schema: every section and field of config.yaml, each described.

These pydantic models are the one source of truth for what a config may say: loading
(``datagen.config.loading``) validates against them, and ``datagen config`` prints the
annotated file from their descriptions, so the documented config cannot drift from the
real one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# A file name is at most 255 bytes; the longest suffix datagen adds to a run's stem is
# "_20261122_101500_99_failures.jsonl" (34) and "_manifest.json.tmp" is shorter.
MAX_EXPERIMENT_NAME = 200
MAX_CONCURRENCY = 10_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _described(default: Any, description: str, **kwargs: Any) -> Any:
    return Field(default=default, description=description, **kwargs)


class ModelConfig(_Section):
    """Which model to call and how. Sampling fields left unset are not sent."""

    provider: str = _described("openai", "who serves the model: local (embedded), openai, "
                               "anthropic, or any litellm provider")
    model: str = _described("gpt-4o-mini", "the model's name at that provider")
    api_key: SecretStr | None = _described(
        None, "the key; empty: the provider's usual environment variable (OPENAI_API_KEY...)")
    base_url: str | None = _described(
        None, "an OpenAI-compatible server (vLLM, llama.cpp, Ollama's /v1) or a gateway")
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers sent with every request "
        "(credentials in them are redacted from every file)")
    transport: Literal["auto", "litellm", "openai", "anthropic"] = _described(
        "auto", "auto: datagen's fast path for OpenAI-compatible and Anthropic endpoints, "
        "litellm for the rest")
    rate_limit: float | None = _described(
        None, "requests per second, never exceeded in any 1-second window", gt=0)
    requests_per_minute: float | None = _described(
        None, "the provider's RPM limit, if you prefer that unit", gt=0)
    tokens_per_minute: float | None = _described(
        None, "the provider's TPM limit (estimated before a call, corrected after)", gt=0)
    input_tokens_per_minute: float | None = _described(
        None, "an input-token limit per minute (Anthropic's ITPM)", gt=0)
    output_tokens_per_minute: float | None = _described(
        None, "an output-token limit per minute (Anthropic's OTPM)", gt=0)
    max_retries: int = _described(3, "retries of transient errors: 429, 5xx, timeouts, "
                                  "dropped connections", ge=0, le=100)
    max_retry_after: float = _described(
        60.0, "the longest pause a Retry-After header may impose, in seconds", ge=0)
    timeout: float = _described(120.0, "seconds per request", gt=0)
    max_tokens: int | None = _described(None, "the answer's token budget", gt=0)
    max_completion_tokens: int | None = _described(
        None, "the same, under OpenAI's newer name", gt=0)
    temperature: float | None = _described(None, "sampling temperature", ge=0)
    top_p: float | None = _described(None, "nucleus sampling")
    top_k: int | None = _described(None, "top-k sampling")
    min_p: float | None = _described(None, "min-p sampling")
    stop: str | list[str] | None = _described(None, "stop sequence(s)")
    seed: int | None = _described(None, "sampling seed (samples add their index to it)")
    presence_penalty: float | None = _described(None, "presence penalty")
    frequency_penalty: float | None = _described(None, "frequency penalty")
    repetition_penalty: float | None = _described(None, "repetition penalty")
    logit_bias: dict[str, float] | None = _described(None, "token id -> bias")
    logprobs: bool | None = _described(None, "return log probabilities")
    top_logprobs: int | None = _described(None, "how many alternatives per token")
    reasoning_effort: str | None = _described(None, "for reasoning models: low|medium|high")
    response_format: dict[str, Any] | None = _described(
        None, "e.g. {type: json_object}; a json_schema form is translated for llama.cpp")
    extra_params: dict[str, Any] = Field(
        default_factory=dict, description="anything else the provider takes, sent as is")
    input_cost_per_million: float | None = _described(
        None, "dollars per million input tokens (default: litellm's local price map)", ge=0)
    output_cost_per_million: float | None = _described(
        None, "dollars per million output tokens", ge=0)
    batch_input_cost_per_million: float | None = _described(
        None, "batch mode: dollars per million input tokens (default: litellm's batch price, "
        "else half the online price, the providers' documented discount)", ge=0)
    batch_output_cost_per_million: float | None = _described(
        None, "batch mode: dollars per million output tokens (same defaults)", ge=0)
    constrain_output: bool | None = _described(
        None, "send the extractor's grammar/JSON schema: null = only to provider local, "
        "true = always, false = never")
    prefill: Literal["auto", "native", "continue", "template", "off"] = _described(
        "auto", "how a prompt ending with the assistant's turn is sent: auto picks per "
        "provider; native (Anthropic), continue (vLLM's continue_final_message), template "
        "(the chat template left open: local models), off (an error)")
    samples_in_one_request: bool | Literal["auto"] = _described(
        "auto", "samples of one prompt (samples=N) asked in one request with n=N, the "
        "prompt billed once: auto = on for OpenAI's own API (provider openai, no "
        "base_url); true for servers that honour n (vLLM); false = one request each")

    @field_validator("api_key", "base_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # "${OPENAI_API_KEY:-}" resolves to "": that means "not set here", not "the empty key"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key")
    @classmethod
    def _clean_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            if secret != secret.strip():
                # never echo the key itself: only what is wrong with it
                raise ValueError("the key has leading or trailing whitespace (a trailing "
                                 "newline or carriage return from a file?); remove it")
            if any(ch.isspace() or ord(ch) < 32 for ch in secret):
                raise ValueError("the key contains whitespace or control characters")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value != value.strip() or any(ch.isspace() for ch in value):
            raise ValueError(f"{value!r} contains whitespace")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL; write e.g. "
                             "http://127.0.0.1:8000/v1")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port") from None
        return value

    def is_embedded(self) -> bool:
        """True for the in-process local model (provider ``local`` and no base_url)."""
        return self.provider == "local" and not self.base_url

    def effective_provider(self) -> str:
        return "openai" if self.provider == "local" and self.base_url else self.provider

    def model_string(self) -> str:
        """The litellm model name: ``provider/model`` unless the model already has it.

        ``provider: local`` with a ``base_url`` means a model served locally over the
        OpenAI API (llama.cpp, vLLM, Ollama's /v1): it goes to that server.
        """
        model = self.model.removeprefix(f"{self.provider}/")
        return f"{self.effective_provider()}/{model}"


SAMPLING_FIELDS: tuple[str, ...] = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "reasoning_effort", "response_format",
)  # fmt: skip


class PromptsConfig(_Section):
    """Where the prompt files are and how they are written."""

    system_prompt_path: str | None = _described(
        None, "the single-step form's system prompt (relative: to this file's folder)")
    user_prompt_path: str | None = _described(None, "the single-step form's user prompt")
    dirs: list[str] = Field(default_factory=list, description="folders searched for a "
                            "step's prompt files, after the pipeline's own prompts/")
    syntax: Literal["jinja", "format"] = _described(
        "jinja", "placeholder syntax: jinja ({{ name }}) or format ({name}, as str.format: "
        "Augmentoolkit-style files)")
    literal_placeholders: list[str] = Field(
        default_factory=list, description="under format syntax: {names} sent as written, "
        "not filled (e.g. [user, narrator] for RPToolkit's prompts)")


class OutputConfig(_Section):
    """Where a run's files go."""

    output_dir: str = _described("output", "the folder of the run files (relative to the "
                                 "working directory)", min_length=1)
    experiment_name: str = _described(
        "experiment", "the files' name: <experiment_name>[_<timestamp>].jsonl", min_length=1,
        max_length=MAX_EXPERIMENT_NAME)
    need_time_stamp: bool = _described(True, "a new timestamped file per run")
    fsync_interval: float = _described(1.0, "seconds between fsyncs to disk (0: every line)",
                                       ge=0)

    @field_validator("experiment_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "\x00" in value or any(ord(ch) < 32 for ch in value):
            raise ValueError("contains a control character (NUL, newline...)")
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"{value!r} must be a plain name, not a path; put folders in "
                             "output_dir")
        if re.search(r'[<>:"|?*]', value):
            raise ValueError(f"{value!r} has a character file systems reject (<>:\"|?*)")
        return value


class RunConfig(_Section):
    """How a run behaves."""

    concurrency_limit: int = _described(
        5, "requests in flight (workers never exceed the pool's size)", ge=1,
        le=MAX_CONCURRENCY)
    progress: bool = _described(True, "the live display on stderr")
    resume: bool | Literal["force"] = _described(
        False, "true: continue the newest run of this experiment; force: even if its "
        "templates, model or sampling changed")
    cache: bool = _described(True, "reuse answers to identical requests across runs "
                             "(SQLite); a run's own answers are always kept for its resume")
    cache_path: str | None = _described(None, "default: output_dir/.datagen_cache.sqlite")
    cache_salt: str = _described("", "change it for fresh samples of the same requests")
    samples: int = _described(1, "outputs per input item, keyed <key>#i, each with its "
                              "own seed (or one request with n: "
                              "model.samples_in_one_request)", ge=1, le=10_000)
    batch: bool = _described(False, "send every step through the provider's batch API "
                             "(about half price, answers within the completion window)")
    batch_poll_interval: float = _described(
        10.0, "batch mode: seconds before the first status poll of open batches; doubles "
        "after each poll up to batch_poll_max", gt=0)
    batch_poll_max: float = _described(
        300.0, "batch mode: the longest wait between two status polls, in seconds", gt=0)
    batch_max_requests: int | None = _described(
        None, "batch mode: requests per batch at most (default: the provider's limit, "
        "OpenAI 50,000, Anthropic 100,000)", ge=1)
    batch_max_mb: float | None = _described(
        None, "batch mode: megabytes per batch request file at most (default: the "
        "provider's limit, OpenAI 200, Anthropic 256)", gt=0)
    batch_max_wait_hours: float = _described(
        30.0, "batch mode: stop waiting for open batches after this many hours (they keep "
        "running at the provider; --resume picks them up)", gt=0)
    shutdown_timeout: float = _described(30.0, "seconds Ctrl+C / SIGTERM waits for the "
                                         "requests in flight", ge=0)
    user_code_timeout: float = _described(
        60.0, "seconds an extractor, validator, input processor or on_record may take "
        "per call", gt=0)
    debug: bool = _described(False, "every call's input and output to <run>_debug/")
    meta_datagen: bool = _described(False, "accepted calls as training examples, "
                                    "<run>_meta.jsonl")


class Settings(BaseModel):
    """The whole, validated configuration of a pipeline."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelConfig = Field(default_factory=ModelConfig,
                               description="the model every step uses unless it names another")
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="named models a step can pick (step(model=NAME)); "
        "each inherits model:'s settings, but not its api_key/base_url when it sets provider")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="prompt files")
    output_data: OutputConfig = Field(default_factory=OutputConfig, description="run files")
    run: RunConfig = Field(default_factory=RunConfig, description="run behaviour")
    params: dict[str, Any] = Field(default_factory=dict, description="the pipeline's own "
                                   "settings, free-form (they reach build() and data_pool())")
    config_path: Path | None = Field(default=None, exclude=True)

    def sampling_params(self) -> dict[str, Any]:
        """Sampling parameters that are set, plus extra_params, as litellm keywords."""
        return sampling_of(self.model)

    def named_model(self, name: str | None) -> ModelConfig:
        """The model a step asked for: the main one for None, else models[name]."""
        from datagen.config.loading import named_model

        return named_model(self, name)

    def public_dict(self) -> dict[str, Any]:
        """The configuration with secrets removed, for the manifest (which is redacted as
        a whole on top of this)."""
        data = self.model_dump(mode="json")
        for model in [data["model"], *data.get("models", {}).values()]:
            if isinstance(model, dict):
                if model.get("api_key"):
                    model["api_key"] = "<redacted>"
                if model.get("headers"):
                    model["headers"] = dict.fromkeys(model["headers"], "<redacted>")
        return data


def sampling_of(m: ModelConfig) -> dict[str, Any]:
    """A model's sampling parameters that are set, plus its extra_params."""
    out = {name: getattr(m, name) for name in SAMPLING_FIELDS}
    out = {k: v for k, v in out.items() if v is not None}
    out.update(m.extra_params)
    return out



SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "prompts": PromptsConfig,
    "output_data": OutputConfig,
    "run": RunConfig,
}
FREEFORM_SECTIONS = ("params", "models")
