"""Configuration: the schema (``schema``: every field of config.yaml, described) and its
loading (``loading``: the file, keyword overrides, ``${ENV}``, placeholders, unknown and
duplicate keys)."""

from datagen.config.loading import (
    PLACEHOLDER,
    apply_overrides,
    load_settings,
    named_model,
    parse_overrides,
    read_yaml,
    valid_keys,
)  # fmt: skip
from datagen.config.schema import (
    SAMPLING_FIELDS,
    SECTIONS,
    ModelConfig,
    OutputConfig,
    PromptsConfig,
    RunConfig,
    Settings,
    sampling_of,
)  # fmt: skip

__all__ = [
    "PLACEHOLDER", "SAMPLING_FIELDS", "SECTIONS", "ModelConfig", "OutputConfig",
    "PromptsConfig", "RunConfig", "Settings", "apply_overrides", "load_settings",
    "named_model", "parse_overrides", "read_yaml", "sampling_of", "valid_keys",
]  # fmt: skip
