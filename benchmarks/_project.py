"""A throwaway pipeline folder for the benchmarks: config.yaml, prompts/, a data pool."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from datagen.testing.fake_server import last_user_message

SYSTEM = "You write in a {{ tone }} tone. Write inside <draft></draft> tags.\n"
USER = "Write about {{ topic }} in about {{ word_count }}.\n"
_TOPIC = re.compile(r"Write about (.+?) in about")


def draft_reply(body: dict[str, Any]) -> str:
    match = _TOPIC.search(last_user_message(body))
    return f"<draft>{(match.group(1) if match else 'it').capitalize()} matters.</draft>"


def make_project(root: Path, base_url: str, prompts: tuple[str, str] = (SYSTEM, USER),
                 **model: Any) -> Path:
    """``prompts``: the system and user templates; ``model``: more keys of ``model:``."""
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "system.txt").write_text(prompts[0])
    (root / "prompts" / "user.txt").write_text(prompts[1])
    model_lines = "".join(f"  {k}: {orjson.dumps(v).decode()}\n" for k, v in model.items())
    (root / "config.yaml").write_text(
        "model:\n  provider: openai\n  model: bench\n  max_tokens: 32\n  temperature: 0\n"
        f"  base_url: {base_url}\n{model_lines}"
        "prompts:\n  system_prompt_path: prompts/system.txt\n  user_prompt_path: prompts/user.txt\n"
        f"output_data:\n  output_dir: {root / 'output'}\n  experiment_name: bench\n"
        "run:\n  progress: false\n"
    )
    return root / "config.yaml"


def make_pool(n: int) -> list[dict[str, Any]]:
    return [{"user_prompt_kwargs": {"topic": f"topic {i}", "word_count": "10 words"},
             "system_prompt_kwargs": {"tone": "plain"}} for i in range(n)]


def write_pool(path: Path, n: int) -> Path:
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"user_prompt_kwargs": {"topic": f"topic {i}",
                                                          "word_count": "10 words"},
                                   "system_prompt_kwargs": {"tone": "plain"}}) + b"\n")
    return path


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parsed records and the count of lines that do not parse."""
    good, bad = [], 0
    if not path.exists():
        return good, bad
    for line in path.read_bytes().splitlines():
        try:
            good.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            bad += 1
    return good, bad
