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
from typing import Any

import yaml
from pydantic import ValidationError

from datagen.config.schema import FREEFORM_SECTIONS, SECTIONS, ModelConfig, Settings
from datagen.errors import ConfigError

PLACEHOLDER = "!!PLACEHOLDER!!"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    as the placeholder string, so the placeholder check can name the field, and that
    refuses a key written twice in one mapping (plain YAML keeps the last one silently:
    a second ``model:`` section would drop the first one's base_url and api_key)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != line:
                raise DuplicateKeyError(key, first, line)
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} appears twice: at line {first} and again at line "
                         f"{again}; YAML would silently keep only the second. Merge them "
                         "into one")


_Loader.add_constructor("tag:yaml.org,2002:PLACEHOLDER!!", lambda loader, node: PLACEHOLDER)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file into a dict; a syntax error names the file and line."""
    if path.is_dir():
        raise ConfigError(
            f"config {path} is a folder, not a file: pass the config.yaml inside it "
            f"(config='{path / 'config.yaml'}'), or give the folder to `datagen run`")
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}. Create it (see the config.yaml at the top of the "
            "datagen repository for every key), or pass config=PATH, or config=None to use "
            "only keyword arguments."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
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
            problems.append(_unknown_keyword(key, merged.get("params")))
    return merged, touched, problems


def _unknown_keyword(key: str, params: Any) -> str:
    """An override that is no config key: the closest config key, or, when none is close
    (or the config's params: has it), the pipeline's own setting it probably is."""
    suggestion = _suggest(key, valid_keys())
    if (suggestion and not (isinstance(params, dict) and key in params)) or \
            not key.isidentifier():
        return f"unknown key '{key}' in keyword argument.{suggestion}"
    return (f"unknown key '{key}' in keyword argument. Did you mean 'params.{key}'? A "
            "setting of your pipeline goes under params: (passed to build() and "
            f"data_pool()): --set params.{key}=..., or params={{'{key}': ...}}")


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
    for name in settings.models:  # every named model is checked now, not when first used
        named_model(settings, name)
    settings.config_path = path
    _resolve_prompt_paths(settings, path.parent if path else Path.cwd(), touched)
    return settings


def named_model(settings: Settings, name: str | None) -> ModelConfig:
    """The model a step asked for: the main one for None, else ``models[name]``, which
    inherits the main model's settings (but not its server's: api_key, base_url, headers,
    samples_in_one_request, when it names a provider of its own)."""
    if name is None:
        return settings.model
    if name not in settings.models:
        known = ", ".join(sorted(settings.models)) or "none defined"
        raise ConfigError(f"no model named {name!r} in the models: section of the config "
                          f"(defined: {known})")
    own = settings.models[name]
    base = settings.model.model_dump(exclude_unset=False)
    if "provider" in own:
        for key in ("api_key", "base_url", "headers", "samples_in_one_request"):
            base.pop(key, None)
    try:
        return ModelConfig.model_validate({**base, **own})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, f"models.{name}")) from None
