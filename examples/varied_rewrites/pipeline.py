"""Varied rewrites, written the way Augmentoolkit writes pipelines: a filter, then a
rewrite whose prompt is picked from several variations, ending in ShareGPT.

    datagen run examples/varied_rewrites                   # the embedded model
    datagen run examples/varied_rewrites --set provider=openai --set model=gpt-4o-mini

Its conventions, as Augmentoolkit's own pipelines have them:
- prompts are YAML chats with few-shot turns, placeholders written for ``str.format``
  (``{text}``): ``prompts.syntax: format`` in config.yaml;
- a judge step filters the chunks: ``keep=`` drops the unsuitable ones (listed in the
  run's ``_dropped.jsonl`` with the reason; a drop is not a failure);
- the rewrite step's prompt is one of prompts/variations/, chosen per item from its key
  (Augmentoolkit's RandomVariationStep, but the same choice on every run and resume; the
  record says which, as ``prompt_file``);
- each variation ends with the assistant's opening words, ``<rewrite>``: a prefill the
  model continues.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, chunks, extract, to_sharegpt

HERE = Path(__file__).resolve().parent
VARIATIONS = sorted(str(p.relative_to(HERE / "prompts"))
                    for p in (HERE / "prompts" / "variations").glob("*.yaml"))


def suitable(verdict: str, context: dict[str, Any]) -> bool:
    """The filter: keep the chunks the judge found suitable."""
    return verdict == "suitable"


def build(pipeline: DataGenerationPipeline | None = None) -> DataGenerationPipeline:
    pipeline = pipeline or DataGenerationPipeline(config=HERE / "config.yaml")
    return (pipeline
            .step("judgement", prompt="judge_paragraph.yaml",
                  extract=extract.choice("suitable", "unsuitable"), keep=suitable)
            .step("rewrite", prompt=VARIATIONS, extract=extract.tag("rewrite")))


def data_pool(pipeline: DataGenerationPipeline, input_dir: str = "input",
              chunk_size: int = 140, subset_size: int | None = None, seed: int = 0
              ) -> Iterator[dict[str, Any]]:
    return chunks(HERE / input_dir, chunk_size=chunk_size, subset_size=subset_size, seed=seed,
                  cache_dir=HERE / ".datagen_chunks")


def mapper(record: dict[str, Any]) -> list[dict[str, str]]:
    """A rewrite instruction and the original text -> the rewrite (`datagen export`
    uses it)."""
    steps = record["steps"]
    style = Path(steps["rewrite"]["prompt_file"]).stem.replace("_", " ")
    return [{"role": "user", "content": f"Rewrite this {style}:\n\n{record['item']['text']}"},
            {"role": "assistant", "content": steps["rewrite"]["output"]}]


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=mapper)
    return out


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
