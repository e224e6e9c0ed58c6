"""``datagen config``: the whole config.yaml, every field with its default and its
description, printed from the schema itself (so it cannot drift from what loads)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from datagen.config.schema import SECTIONS, Settings

COMMENT_COLUMN = 34
FREEFORM_EXAMPLES = {
    "models": ["# large:                        # a name steps pick: .step(..., model=\"large\")",
               "#   model: gpt-4.1               # any field of model:, the rest inherited",
               "#   max_tokens: 2048"],
    "params": ["# n_items: 20                    # reaches build(pipeline, n_items=...) and "
               "data_pool()"],
}


def _value(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "null"
    if isinstance(default, str):
        return json.dumps(default) if (not default or default[0] in "!*&{[" or ":" in default
                                       or default.strip() != default) else default
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, (dict, list)):
        return json.dumps(default)
    return str(default)


def _line(key: str, value: str, description: str | None, indent: str) -> str:
    text = f"{indent}{key}: {value}"
    if description:
        text = text.ljust(COMMENT_COLUMN) + f" # {description}"
    return text


def section_lines(name: str, cls: type[BaseModel], info: FieldInfo | None) -> list[str]:
    head = f"{name}:"
    if info is not None and info.description:
        head = head.ljust(COMMENT_COLUMN) + f" # {info.description}"
    lines = [head]
    for field_name, field in cls.model_fields.items():
        lines.append(_line(field_name, _value(field), field.description, "  "))
    return lines


def annotated_config() -> str:
    """The annotated config.yaml: every section, field, default and description."""
    lines = ["# datagen configuration: every key, its default and what it does.",
             "# Each key can also be a DataGenerationPipeline keyword: flat (temperature=0.9),",
             "# dotted (model.temperature) or a whole section (output_data={...}).", ""]
    top: dict[str, Any] = Settings.model_fields
    for name in ("model", "models", "prompts", "output_data", "run", "params"):
        info = top[name]
        if name in SECTIONS:
            lines += section_lines(name, SECTIONS[name], info)
        else:
            lines.append(f"{name}: {{}}".ljust(COMMENT_COLUMN) + f" # {info.description}")
            lines += [f"  {example}" for example in FREEFORM_EXAMPLES[name]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
