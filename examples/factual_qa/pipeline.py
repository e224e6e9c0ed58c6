"""Factual QA: questions from chunks -> answers from the chunk -> a judge keeps what passes.

    python examples/factual_qa/pipeline.py                  # the embedded model
    python examples/factual_qa/pipeline.py provider=openai model=gpt-4o-mini

One chunk gives several questions (a one_to_many step); each question is answered from
the chunk; the judge says PASS or FAIL, and a FAIL sends the answer back with the reason
(up to judge_retries), then to the failures file. Only judged answers reach the results,
which are exported as ShareGPT (question -> answer).
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
QUESTIONS_SCHEMA = list[str]


def build(**overrides: Any) -> DataGenerationPipeline:
    pipeline = DataGenerationPipeline(config=HERE / "config.yaml", **overrides)
    retries = pipeline.settings.params.get("judge_retries", 1)
    return (pipeline
            .step("questions", prompt="questions.yaml", extract=extract.json(QUESTIONS_SCHEMA),
                  validate=lambda qs, item: bool(qs) or "no questions", one_to_many=True)
            .step("answer", prompt="answer.yaml", extract=extract.tag("answer"), model="large")
            .step("judge", prompt="judge.yaml", extract=extract.choice("PASS", "FAIL"),
                  validate=lambda verdict, item: verdict == "PASS"
                  or "the answer is not supported by the text",
                  max_retries=retries))


def data_pool(pipeline: DataGenerationPipeline) -> Iterator[dict[str, Any]]:
    params = pipeline.settings.params
    return chunks(HERE / params["input_dir"], chunk_size=params["chunk_size"],
                  subset_size=params.get("subset_size"), seed=params.get("seed", 0),
                  cache_dir=HERE / ".datagen_chunks")


def qa_pair(record: dict[str, Any]) -> list[dict[str, str]]:
    steps = record["steps"]
    return [{"role": "user", "content": steps["questions"]["output"]},
            {"role": "assistant", "content": steps["answer"]["output"]}]


def export(results: Path) -> Path:
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=qa_pair)
    return out


async def main(argv: list[str]) -> list[dict[str, Any]]:
    pipeline = build(**parse_overrides(argv))
    results = await pipeline.run(data_pool(pipeline))
    assert pipeline.last_run_files is not None
    print(f"{len(results)} judged QA pairs in {pipeline.last_run_files.results}; ShareGPT: "
          f"{export(pipeline.last_run_files.results)}")
    return results


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
