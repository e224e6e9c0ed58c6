"""A custom ``parse_response``: any function ``str -> value`` (sync or async) will do.

    datagen run examples/custom_parser
    python examples/custom_parser/pipeline.py base_url=http://127.0.0.1:8000/v1

The parser below finds the JSON in the response (models like to add prose and code
fences), checks it, and returns a dict. Whatever it raises makes that item a failure with
the message, in ``*_failures.jsonl``; the run goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from datagen import DataGenerationPipeline, extract

HERE = Path(__file__).resolve().parent
TOPICS = [("photosynthesis", "middle school"), ("prime numbers", "high school"),
          ("the French Revolution", "university")]


def parse_response(text: str) -> dict[str, Any]:
    value = extract.find_json(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    missing = {"question", "answer", "difficulty"} - value.keys()
    if missing:
        raise ValueError(f"missing keys: {', '.join(sorted(missing))}")
    difficulty = int(value["difficulty"])
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty {difficulty} is outside 1-5")
    return {"question": str(value["question"]).strip(), "answer": str(value["answer"]).strip(),
            "difficulty": difficulty}


def build(pipeline: DataGenerationPipeline | None = None) -> DataGenerationPipeline:
    return pipeline or DataGenerationPipeline(config=HERE / "config.yaml")


def data_pool(pipeline: DataGenerationPipeline) -> list[dict[str, Any]]:
    return [{"user_prompt_kwargs": {"topic": topic, "level": level}} for topic, level in TOPICS]


if __name__ == "__main__":  # same as: datagen run <this folder> --set key=value ...
    from datagen import main

    sys.exit(main(["run", str(HERE), *(f"--set={a}" for a in sys.argv[1:])]))
