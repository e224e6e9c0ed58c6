"""Writing-style cloning: styled text -> generic rewrite; export (generic -> original) pairs.

    datagen run examples/style_clone                        # the embedded model
    datagen run examples/style_clone --set params.repair=false   # skip the repair step

Each chunk of the styled text is (optionally) repaired so it starts and ends cleanly, then
rewritten in a plain style. The ShareGPT export pairs them the other way round: the plain
text is the user's turn, the original-style text the assistant's, so a model trained on
it learns to write in the original's voice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, chunks, extract, to_sharegpt

HERE = Path(__file__).resolve().parent


def build(pipeline: DataGenerationPipeline | None = None, repair: bool = True
          ) -> DataGenerationPipeline:
    pipeline = pipeline or DataGenerationPipeline(config=HERE / "config.yaml")
    if repair:
        pipeline.step("repair", prompt="repair.yaml", extract=extract.tag("text"))
    return pipeline.step("generic", prompt="generic.yaml", extract=extract.tag("generic"))


def data_pool(pipeline: DataGenerationPipeline, input_dir: str = "input",
              chunk_size: int = 120, subset_size: int | None = None, seed: int = 0
              ) -> Iterator[dict[str, Any]]:
    return chunks(HERE / input_dir, chunk_size=chunk_size, subset_size=subset_size, seed=seed,
                  cache_dir=HERE / ".datagen_chunks")


def pair(record: dict[str, Any]) -> list[dict[str, str]]:
    """generic -> original: the plain text asks, the styled text answers."""
    steps = record["steps"]
    original = steps["repair"]["output"] if "repair" in steps else record["item"]["text"]
    return [{"role": "user", "content": steps["generic"]["output"]},
            {"role": "assistant", "content": original}]


mapper = pair  # the conversation a record becomes, in export() and in `datagen export`


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=mapper)
    return out


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
