"""datagen: synthetic training data with LLMs.

``import datagen`` is cheap: the pipeline, litellm, aiohttp and jinja2 load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# litellm must read its model price map from its local copy, never from the network; this
# has to be set before litellm is first imported, wherever that happens.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from datagen import extract
    from datagen.errors import (
        ConfigError,
        DatagenError,
        DataPoolError,
        ExtractionError,
        OutputError,
        RunAbortedError,
        TemplateError,
    )  # fmt: skip
    from datagen.pipeline import DataGenerationPipeline

_LAZY = {
    "DataGenerationPipeline": "datagen.pipeline",
    "DatagenError": "datagen.errors",
    "ConfigError": "datagen.errors",
    "TemplateError": "datagen.errors",
    "DataPoolError": "datagen.errors",
    "OutputError": "datagen.errors",
    "ExtractionError": "datagen.errors",
    "RunAbortedError": "datagen.errors",
}


def __getattr__(name: str) -> Any:
    if name == "extract":
        import importlib

        return importlib.import_module("datagen.extract")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'datagen' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ConfigError", "DataGenerationPipeline", "DataPoolError", "DatagenError", "ExtractionError",
    "OutputError", "RunAbortedError", "TemplateError", "__version__", "extract",
]  # fmt: skip
