"""Poems from text chunks: read input/, chunk it, write one poem per chunk, export ShareGPT.

    datagen run examples/poems                              # the embedded model
    datagen run examples/poems --set provider=openai --set model=gpt-4o-mini
    python examples/poems/pipeline.py provider=openai model=gpt-4o-mini  # the same
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, chunks, extract, to_sharegpt

HERE = Path(__file__).resolve().parent


def build(pipeline: DataGenerationPipeline | None = None) -> DataGenerationPipeline:
    pipeline = pipeline or DataGenerationPipeline(config=HERE / "config.yaml")
    return pipeline.step("poem", prompt="poem.yaml", extract=extract.tag("poem"))


def data_pool(pipeline: DataGenerationPipeline, input_dir: str = "input",
              chunk_size: int = 120, subset_size: int | None = None, seed: int = 0
              ) -> Iterator[dict[str, Any]]:
    return chunks(HERE / input_dir, chunk_size=chunk_size, subset_size=subset_size, seed=seed,
                  cache_dir=HERE / ".datagen_chunks")


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out)
    return out


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
