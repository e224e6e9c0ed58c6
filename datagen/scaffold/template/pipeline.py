"""A datagen pipeline: one summary per chunk of the documents in input/.

    datagen run                      # in this folder: the embedded model, no key needed
    datagen run --dry-run            # tokens, cost and time; nothing is sent
    datagen run --set provider=openai --set model=gpt-4o-mini

The rule datagen follows: `build(pipeline, **params)` adds the steps to a pipeline made
from config.yaml; `data_pool(pipeline, **params)` gives the items; `export(results)` runs
after a run. Keys under `params:` in config.yaml arrive as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, chunks, extract, to_sharegpt

HERE = Path(__file__).resolve().parent


def build(pipeline: DataGenerationPipeline) -> DataGenerationPipeline:
    return pipeline.step("summary", prompt="summary.yaml", extract=extract.tag("summary"))


def data_pool(pipeline: DataGenerationPipeline, input_dir: str = "input",
              chunk_size: int = 150, seed: int = 0) -> Iterator[dict[str, Any]]:
    return chunks(HERE / input_dir, chunk_size=chunk_size, seed=seed,
                  cache_dir=HERE / ".datagen_chunks")


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out)
    return out
