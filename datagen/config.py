"""config.yaml: load, merge constructor overrides, resolve ``${ENV}``, validate.

The order is fixed and every step reports all of its problems at once:

1. read the YAML file (a syntax error names the line);
2. apply overrides: flat (``temperature=0.9``), dotted (``model.temperature``) or a whole
   section (``output_data={...}``, merged over the file's section);
3. reject unknown keys, naming the closest valid one;
4. list every value still set to ``!!PLACEHOLDER!!``;
5. replace ``${VAR}`` / ``${VAR:-default}`` from the environment;
6. validate types with pydantic;
7. resolve relative prompt paths: against the config file's folder for paths written in
   the file, against the working directory for paths given as keywords.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from datagen.errors import ConfigError

PLACEHOLDER = "!!PLACEHOLDER!!"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to call and how. Sampling fields left unset are not sent."""

    provider: str = "openai"
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = None
    base_url: str | None = None
    rate_limit: float | None = Field(default=None, gt=0, description="requests per second")
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    # auto: the fast aiohttp path for OpenAI-compatible endpoints, litellm for the rest
    transport: Literal["auto", "litellm", "openai"] = "auto"
    max_retries: int = Field(default=3, ge=0)
    timeout: float = Field(default=120.0, gt=0, description="seconds per request")
    # Sampling parameters litellm accepts (and maps per provider).
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    # Prices in dollars per million tokens; default: litellm's local price map.
    input_cost_per_million: float | None = Field(default=None, ge=0)
    output_cost_per_million: float | None = Field(default=None, ge=0)
    # Anything else the provider takes, passed to litellm as it is.
    extra_params: dict[str, Any] = Field(default_factory=dict)
    # Send the extractor's output constraint (GBNF grammar / JSON format) with each request.
    # None: only to the local model (provider: local), embedded or served by llama.cpp
    # (as `grammar` in the body); True: always; False: never.
    constrain_output: bool | None = None

    @field_validator("api_key", "base_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # "${OPENAI_API_KEY:-}" resolves to "": that means "not set here", not "the empty key"
        return None if isinstance(value, str) and not value.strip() else value

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
    system_prompt_path: str | None = None
    user_prompt_path: str | None = None
    # Folders searched for a step's prompt files, after the pipeline's own prompts/
    # (relative to the config file's folder).
    dirs: list[str] = Field(default_factory=list)


class OutputConfig(_Section):
    output_dir: str = "output"
    experiment_name: str = Field(default="experiment", min_length=1)
    need_time_stamp: bool = True
    fsync_interval: float = Field(default=1.0, ge=0, description="seconds between fsyncs")


class RunConfig(_Section):
    concurrency_limit: int = Field(default=5, ge=1)
    progress: bool = True
    # True: continue the newest run of this experiment; "force": even if what shapes the
    # output (templates, model, sampling, extractor) changed since.
    resume: bool | Literal["force"] = False
    cache: bool = True
    cache_path: str | None = None  # default: output_dir/.datagen_cache.sqlite
    cache_salt: str = ""  # change it to get fresh samples for the same requests
    shutdown_timeout: float = Field(default=30.0, ge=0, description="Ctrl+C grace, seconds")
    debug: bool = False  # write every call's input and output to <run>_debug/
    # write every accepted call as an OpenAI-format training example to <run>_meta.jsonl
    meta_datagen: bool = False


class Settings(BaseModel):
    """The whole, validated configuration of a pipeline."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    # Named models a step can pick (step(model="large")); each inherits `model`'s settings,
    # except connection settings (api_key, base_url) when it names its own provider.
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    output_data: OutputConfig = Field(default_factory=OutputConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    params: dict[str, Any] = Field(
        default_factory=dict, description="the pipeline's own keys, free-form"
    )
    config_path: Path | None = Field(default=None, exclude=True)

    def sampling_params(self) -> dict[str, Any]:
        """Sampling parameters that are set, plus extra_params, as litellm keywords."""
        out = {name: getattr(self.model, name) for name in SAMPLING_FIELDS}
        out = {k: v for k, v in out.items() if v is not None}
        out.update(self.model.extra_params)
        return out

    def named_model(self, name: str | None) -> ModelConfig:
        """The model a step asked for: the main one for None, else models[name]."""
        if name is None:
            return self.model
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none defined"
            raise ConfigError(f"no model named {name!r} in the models: section of the config "
                              f"(defined: {known})")
        own = self.models[name]
        base = self.model.model_dump(exclude_unset=False)
        if "provider" in own:
            for key in ("api_key", "base_url"):
                base.pop(key, None)
        try:
            return ModelConfig.model_validate({**base, **own})
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, f"models.{name}")) from None

    def public_dict(self) -> dict[str, Any]:
        """The configuration with secrets removed, for the manifest."""
        data = self.model_dump(mode="json")
        if data["model"].get("api_key") is not None:
            data["model"]["api_key"] = "<redacted>"
        for model in data.get("models", {}).values():
            if isinstance(model, dict) and model.get("api_key"):
                model["api_key"] = "<redacted>"
        return data


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "prompts": PromptsConfig,
    "output_data": OutputConfig,
    "run": RunConfig,
}
FREEFORM_SECTIONS = ("params", "models")
# flat keyword -> its section; field names are unique across sections by design
_FLAT: dict[str, str] = {
    field: section for section, cls in SECTIONS.items() for field in cls.model_fields
}
_PATH_FIELDS = ("system_prompt_path", "user_prompt_path")


def valid_keys() -> list[str]:
    """Every key a user may set: sections, flat field names and dotted names."""
    dotted = [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields]
    return [*SECTIONS, *FREEFORM_SECTIONS, *_FLAT, *dotted]


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _unknown_key_message(key: str, where: str, choices: list[str]) -> str:
    return f"unknown key '{key}' {where}.{_suggest(key, choices)}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads an unquoted ``!!PLACEHOLDER!!`` (a YAML tag to the parser)
    as the placeholder string, so the placeholder check can name the field."""


_Loader.add_constructor("tag:yaml.org,2002:PLACEHOLDER!!", lambda loader, node: PLACEHOLDER)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file into a dict; a syntax error names the file and line."""
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}. Create it (see the config.yaml at the top of the "
            "datagen repository for every key), or pass config=PATH, or config=None to use "
            "only keyword arguments."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections "
            f"({', '.join(SECTIONS)}), not a {type(data).__name__}"
        )
    return data


def _check_file_keys(data: Mapping[str, Any], path: Path | None) -> list[str]:
    where_file = f"in {path}" if path else "in the configuration"
    problems: list[str] = []
    for section, body in data.items():
        if section == "models":
            problems += _check_models(body, where_file)
            continue
        if section in FREEFORM_SECTIONS:
            continue
        if section not in SECTIONS:
            top = [*SECTIONS, *FREEFORM_SECTIONS]
            msg = _unknown_key_message(str(section), where_file, top)
            if section in _FLAT and not _suggest(str(section), top):
                msg += f" Did you mean '{_FLAT[section]}: {{{section}: ...}}'?"
            problems.append(msg)
            continue
        if body is None:
            continue
        if not isinstance(body, Mapping):
            problems.append(f"section '{section}' {where_file} must be a mapping of keys")
            continue
        fields = list(SECTIONS[section].model_fields)
        for key in body:
            if key not in fields:
                problems.append(
                    _unknown_key_message(f"{section}.{key}", where_file,
                                         [f"{section}.{f}" for f in fields] + list(_FLAT))
                )
    return problems


def _check_models(body: Any, where: str) -> list[str]:
    if body is None:
        return []
    if not isinstance(body, Mapping):
        return [f"section 'models' {where} must map model names to model settings"]
    fields = list(ModelConfig.model_fields)
    problems = []
    for name, model in body.items():
        if not isinstance(model, Mapping):
            problems.append(f"models.{name} {where} must be a mapping of model settings")
            continue
        for key in model:
            if key not in fields:
                problems.append(_unknown_key_message(
                    f"models.{name}.{key}", where, [f"models.{name}.{f}" for f in fields]))
    return problems


def apply_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], set[str], list[str]]:
    """Merge keyword overrides into the file's data.

    Returns the merged data, the dotted names of the fields set by keywords, and the list
    of problems (unknown keys).
    """
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v)
                              for k, v in data.items()}
    touched: set[str] = set()
    problems: list[str] = []

    def set_field(section: str, field: str, value: Any) -> None:
        body = merged.get(section)
        if not isinstance(body, dict):
            body = {}
            merged[section] = body
        body[field] = value
        touched.add(f"{section}.{field}")

    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, Mapping):
            for field, inner in value.items():
                if field not in SECTIONS[key].model_fields:
                    problems.append(_unknown_key_message(
                        f"{key}.{field}", "in keyword argument",
                        [f"{key}.{f}" for f in SECTIONS[key].model_fields]))
                    continue
                set_field(key, field, inner)
        elif key in FREEFORM_SECTIONS:
            if not isinstance(value, Mapping):
                problems.append(f"keyword '{key}' must be a dict, got {type(value).__name__}")
                continue
            params = merged.get(key)
            merged[key] = {**(params if isinstance(params, dict) else {}), **value}
        elif "." in key:
            section, _, field = key.partition(".")
            if section in FREEFORM_SECTIONS:
                params = merged.get(section)
                merged[section] = {**(params if isinstance(params, dict) else {}), field: value}
            elif section in SECTIONS and field in SECTIONS[section].model_fields:
                set_field(section, field, value)
            else:
                problems.append(_unknown_key_message(key, "in overrides", valid_keys()))
        elif key in _FLAT:
            set_field(_FLAT[key], key, value)
        elif key in SECTIONS:
            problems.append(
                f"keyword '{key}' is a section: pass a dict, e.g. {key}={{...}}, "
                f"or one of its keys ({', '.join(SECTIONS[key].model_fields)})"
            )
        else:
            problems.append(_unknown_key_message(key, "in keyword argument", valid_keys()))
    return merged, touched, problems


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.temperature=0.2", "base_url=http://..."]`` -> overrides.

    Values are read as YAML scalars, so ``0.2`` is a number, ``true`` a bool and ``null``
    None; anything else stays a string.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out[key.strip()] = value
    return out


def _walk_strings(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every (dotted path, string value) in a nested structure."""
    if isinstance(data, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in data.items():
            out.extend(_walk_strings(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list):
        out = []
        for i, v in enumerate(data):
            out.extend(_walk_strings(v, f"{prefix}[{i}]"))
        return out
    if isinstance(data, str):
        return [(prefix, data)]
    return []


def find_placeholders(data: Mapping[str, Any]) -> list[str]:
    """Dotted names of every value that still contains ``!!PLACEHOLDER!!``."""
    return [path for path, value in _walk_strings(data) if PLACEHOLDER in value]


def resolve_env(data: Any, missing: list[str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; collect unset names."""
    if isinstance(data, dict):
        return {k: resolve_env(v, missing, f"{path}.{k}" if path else str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_env(v, missing, f"{path}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is not None:
                return default
            missing.append(f"{path} needs environment variable {name}")
            return ""
        return value

    return _ENV_REF.sub(substitute, data)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or "api_key" in loc else f" (got {got!r})"
        lines.append(f"  - {loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def _resolve_prompt_paths(
    settings: Settings, base_dir: Path, from_keywords: set[str]
) -> None:
    for field in _PATH_FIELDS:
        value = getattr(settings.prompts, field)
        if not value:
            continue
        p = Path(value).expanduser()
        if not p.is_absolute():
            anchor = Path.cwd() if f"prompts.{field}" in from_keywords else base_dir
            candidate = anchor / p
            # A keyword path that is not under the working directory but is under the
            # config's folder is almost surely meant relative to the config.
            if not candidate.exists() and (base_dir / p).exists():
                candidate = base_dir / p
            p = candidate
        setattr(settings.prompts, field, str(p.resolve()))


def load_settings(
    config: str | os.PathLike[str] | Mapping[str, Any] | None = "config.yaml",
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated :class:`Settings` from a config file (or dict) and overrides."""
    overrides = dict(overrides or {})
    path: Path | None = None
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        path = Path(config).expanduser().resolve()
        data = read_yaml(path)
    source = str(path) if path else "keyword arguments"

    problems = _check_file_keys(data, path)
    merged, touched, override_problems = apply_overrides(data, overrides)
    problems += override_problems
    if problems:
        raise ConfigError("\n".join(problems))

    placeholders = find_placeholders(merged)
    if placeholders:
        raise ConfigError(
            f"fill in these values in {source} (or pass them as keyword arguments) before "
            "running; they are still set to !!PLACEHOLDER!!:\n"
            + "\n".join(f"  - {p}" for p in placeholders)
        )
    missing: list[str] = []
    merged = resolve_env(merged, missing)
    if missing:
        raise ConfigError(
            "environment variables referenced in the configuration are not set:\n"
            + "\n".join(f"  - {m}" for m in missing)
            + "\nexport them, or write ${VAR:-default} to give a default."
        )
    for section in SECTIONS:
        if merged.get(section) is None:
            merged.pop(section, None)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    settings.config_path = path
    _resolve_prompt_paths(settings, path.parent if path else Path.cwd(), touched)
    return settings
