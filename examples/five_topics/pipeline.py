"""The five-topic example: one short text per topic, parsed from <draft> tags.

    datagen run examples/five_topics                        # config.yaml as is
    datagen run examples/five_topics --set base_url=http://127.0.0.1:8000/v1 --set model=m
    python examples/five_topics/pipeline.py base_url=http://127.0.0.1:8000/v1  # the same

The single-step form: prompts and model come from config.yaml; this file names the data
pool and the extractor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline

HERE = Path(__file__).resolve().parent
TOPICS = ["machine learning", "ocean currents", "medieval castles", "sourdough bread",
          "black holes"]
extract_function = DataGenerationPipeline.make_default_extractor(pattern_name="draft")


def build(pipeline: DataGenerationPipeline | None = None) -> DataGenerationPipeline:
    return pipeline or DataGenerationPipeline(config=HERE / "config.yaml")


def data_pool(pipeline: DataGenerationPipeline) -> list[dict[str, Any]]:
    return [{"user_prompt_kwargs": {"topic": topic, "word_count": "100 words"},
             "system_prompt_kwargs": {"tone": "plain"}} for topic in TOPICS]


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
