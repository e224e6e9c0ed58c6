"""The five-topic example: one short text per topic, parsed from <draft> tags.

    python examples/five_topics/pipeline.py                      # uses config.yaml as is
    python examples/five_topics/pipeline.py base_url=http://127.0.0.1:8000/v1 model=my-model

Any ``key=value`` argument overrides config.yaml, exactly like a constructor keyword.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline
from datagen.config import parse_overrides

HERE = Path(__file__).resolve().parent
TOPICS = ["machine learning", "ocean currents", "medieval castles", "sourdough bread",
          "black holes"]


def data_pool() -> list[dict[str, Any]]:
    return [{"user_prompt_kwargs": {"topic": topic, "word_count": "100 words"},
             "system_prompt_kwargs": {"tone": "plain"}} for topic in TOPICS]


def build(**overrides: Any) -> DataGenerationPipeline:
    return DataGenerationPipeline(config=HERE / "config.yaml", **overrides)


async def main(argv: list[str]) -> list[dict[str, Any]]:
    pipeline = build(**parse_overrides(argv))
    results = await pipeline.run(
        data_pool(),
        concurrency_limit=5,
        extract_function=pipeline.make_default_extractor(pattern_name="draft"),
    )
    assert pipeline.last_run_files is not None
    print(f"{len(results)} of {len(TOPICS)} drafts written to {pipeline.last_run_files.results}")
    for record in results:
        print(f"- {record['user_prompt_kwargs']['topic']}: {record['output'][:70]!r}")
    return results


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
