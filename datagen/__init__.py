"""datagen: synthetic training data with LLMs.

``import datagen`` is cheap: the pipeline, litellm, aiohttp and jinja2 load on first use.
Everything a pipeline, its tests and the README use is a name of this package (its
``__all__``); the modules behind them may move.
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
    from datagen.cli import main
    from datagen.engine import RunInterrupted
    from datagen.errors import (
        ConfigError,
        DatagenError,
        DataPoolError,
        ExtractionError,
        OutputError,
        RunAbortedError,
        TemplateError,
    )  # fmt: skip
    from datagen.export import to_hf, to_openai, to_sharegpt
    from datagen.folder import load_folder
    from datagen.ingest import chunks, read_documents
    from datagen.llm.errors import CallError
    from datagen.llm.handler import HandlerTransport
    from datagen.llm.providers import register_provider
    from datagen.llm.types import ChatRequest, Completion, Usage
    from datagen.pipeline import DataGenerationPipeline
    from datagen.result import RunResult
    from datagen.steps import DROP, CallEvent

_LAZY = {
    "DataGenerationPipeline": "datagen.pipeline",
    "RunResult": "datagen.result",
    "RunInterrupted": "datagen.engine",
    "DROP": "datagen.steps",
    "CallEvent": "datagen.steps",
    "chunks": "datagen.ingest",
    "read_documents": "datagen.ingest",
    "to_sharegpt": "datagen.export",
    "to_openai": "datagen.export",
    "to_hf": "datagen.export",
    "load_folder": "datagen.folder",
    "main": "datagen.cli",
    "register_provider": "datagen.llm.providers",
    "HandlerTransport": "datagen.llm.handler",
    "ChatRequest": "datagen.llm.types",
    "Completion": "datagen.llm.types",
    "Usage": "datagen.llm.types",
    "CallError": "datagen.llm.errors",
    "DatagenError": "datagen.errors",
    "ConfigError": "datagen.errors",
    "TemplateError": "datagen.errors",
    "DataPoolError": "datagen.errors",
    "OutputError": "datagen.errors",
    "ExtractionError": "datagen.errors",
    "RunAbortedError": "datagen.errors",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "extract":
        return importlib.import_module("datagen.extract")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'datagen' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DROP", "CallError", "CallEvent", "ChatRequest", "Completion", "ConfigError",
    "DataGenerationPipeline", "DataPoolError", "DatagenError", "ExtractionError",
    "HandlerTransport", "OutputError", "RunAbortedError", "RunInterrupted", "RunResult",
    "TemplateError", "Usage", "__version__", "chunks", "extract", "load_folder", "main",
    "read_documents", "register_provider", "to_hf", "to_openai", "to_sharegpt",
]  # fmt: skip
