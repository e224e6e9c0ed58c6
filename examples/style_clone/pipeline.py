"""Writing-style cloning: styled text -> generic rewrite; export (generic -> original) pairs.

    python examples/style_clone/pipeline.py                 # the embedded model
    python examples/style_clone/pipeline.py repair=false    # skip the repair step

Each chunk of the styled text is (optionally) repaired so it starts and ends cleanly, then
rewritten in a plain style. The ShareGPT export pairs them the other way round: the plain
text is the user's turn, the original-style text the assistant's, so a model trained on
it learns to write in the original's voice.
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
    pipeline = DataGenerationPipeline(config=HERE / "config.yaml", **overrides)
    if pipeline.settings.params.get("repair", True):
        pipeline.step("repair", prompt="repair.yaml", extract=extract.tag("text"))
    return pipeline.step("generic", prompt="generic.yaml", extract=extract.tag("generic"))


def data_pool(pipeline: DataGenerationPipeline) -> Iterator[dict[str, Any]]:
    params = pipeline.settings.params
    return chunks(HERE / params["input_dir"], chunk_size=params["chunk_size"],
                  subset_size=params.get("subset_size"), seed=params.get("seed", 0),
                  cache_dir=HERE / ".datagen_chunks")


def pair(record: dict[str, Any]) -> list[dict[str, str]]:
    """generic -> original: the plain text asks, the styled text answers."""
    steps = record["steps"]
    original = steps["repair"]["output"] if "repair" in steps else record["item"]["text"]
    return [{"role": "user", "content": steps["generic"]["output"]},
            {"role": "assistant", "content": original}]


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=pair)
    return out


async def main(argv: list[str]) -> list[dict[str, Any]]:
    overrides = parse_overrides(argv)
    if "repair" in overrides:  # a shortcut for params.repair
        overrides["params"] = {"repair": overrides.pop("repair")}
    pipeline = build(**overrides)
    results = await pipeline.run(data_pool(pipeline))
    assert pipeline.last_run_files is not None
    print(f"{len(results)} pairs in {pipeline.last_run_files.results}; ShareGPT: "
          f"{export(pipeline.last_run_files.results)}")
    return results


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
