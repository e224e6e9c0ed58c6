"""Factual QA: questions from chunks -> answers from the chunk -> a judge keeps what passes.

    datagen run examples/factual_qa                         # the embedded model
    datagen run examples/factual_qa --set provider=openai --set model=gpt-4o-mini

One chunk gives several questions (a one_to_many step); each question is answered from
the chunk; the judge reasons, then ends with "VERDICT: PASS" or "VERDICT: FAIL" (its
grammar lets a small model reason and still end with a verdict), and a FAIL sends the
answer back with the reason (up to judge_retries), then to the failures file. Only
judged answers reach the results, which are exported as ShareGPT (question -> answer):
`mapper` below is the conversation a record becomes, here and in `datagen export`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, chunks, extract, to_sharegpt

HERE = Path(__file__).resolve().parent
QUESTIONS_SCHEMA = list[str]


def build(pipeline: DataGenerationPipeline | None = None, judge_retries: int = 1
          ) -> DataGenerationPipeline:
    pipeline = pipeline or DataGenerationPipeline(config=HERE / "config.yaml")
    return (pipeline
            .step("questions", prompt="questions.yaml", extract=extract.json(QUESTIONS_SCHEMA),
                  validate=lambda qs, item: bool(qs) or "no questions", one_to_many=True)
            .step("answer", prompt="answer.yaml", extract=extract.tag("answer"), model="large")
            .step("judge", prompt="judge.yaml",
                  extract=extract.choice("PASS", "FAIL", marker="VERDICT:"),
                  validate=lambda verdict, item: verdict == "PASS"
                  or "the answer is not supported by the text",
                  max_retries=judge_retries))


def data_pool(pipeline: DataGenerationPipeline, input_dir: str = "input",
              chunk_size: int = 120, subset_size: int | None = None, seed: int = 0
              ) -> Iterator[dict[str, Any]]:
    return chunks(HERE / input_dir, chunk_size=chunk_size, subset_size=subset_size, seed=seed,
                  cache_dir=HERE / ".datagen_chunks")


def mapper(record: dict[str, Any]) -> list[dict[str, str]]:
    """question -> answer: the training pair a record becomes (`datagen export` uses it)."""
    steps = record["steps"]
    return [{"role": "user", "content": steps["questions"]["output"]},
            {"role": "assistant", "content": steps["answer"]["output"]}]


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=mapper)
    return out


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
