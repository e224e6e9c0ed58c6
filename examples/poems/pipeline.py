"""Poems from text chunks: read input/, chunk it, write one poem per chunk, export ShareGPT.

    python examples/poems/pipeline.py                       # the embedded model
    python examples/poems/pipeline.py provider=openai model=gpt-4o-mini
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, extract
from datagen.config import parse_overrides
from datagen.export import to_sharegpt
from datagen.ingest import chunks

HERE = Path(__file__).resolve().parent


def build(**overrides: Any) -> DataGenerationPipeline:
    return (DataGenerationPipeline(config=HERE / "config.yaml", **overrides)
            .step("poem", prompt="poem.yaml", extract=extract.tag("poem")))


def data_pool(pipeline: DataGenerationPipeline) -> Iterator[dict[str, Any]]:
    params = pipeline.settings.params
    return chunks(HERE / params["input_dir"], chunk_size=params["chunk_size"],
                  subset_size=params.get("subset_size"), seed=params.get("seed", 0),
                  cache_dir=HERE / ".datagen_chunks")


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out)
    return out


async def main(argv: list[str]) -> list[dict[str, Any]]:
    pipeline = build(**parse_overrides(argv))
    results = await pipeline.run(data_pool(pipeline))
    assert pipeline.last_run_files is not None
    print(f"{len(results)} poems in {pipeline.last_run_files.results}; ShareGPT: "
          f"{export(pipeline.last_run_files.results)}")
    return results


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
