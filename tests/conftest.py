from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message

SYSTEM = "You write in a {{ tone }} tone. Put the text between <draft> and </draft> tags.\n"
USER = "Write about {{ topic }} in about {{ word_count }}.\n"
TOPIC = re.compile(r"Write about (.+?) in about")


def topic_draft(body: dict[str, Any]) -> str:
    """A deterministic reply shaped like a real model's: prose around a <draft> block."""
    match = TOPIC.search(last_user_message(body))
    topic = match.group(1) if match else "something"
    return f"Sure! Here it is.\n<draft>\n{topic.capitalize()} is a subject worth study.\n</draft>"


def write_project(root: Path, *, system: str | None = SYSTEM, user: str = USER,
                  extra_yaml: str = "") -> Path:
    """A pipeline folder: config.yaml and prompts/ (paths relative to the config)."""
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "user.txt").write_text(user)
    system_line = ""
    if system is not None:
        (root / "prompts" / "system.txt").write_text(system)
        system_line = "  system_prompt_path: prompts/system.txt\n"
    config = (
        "model:\n  provider: openai\n  model: test-model\n  max_retries: 0\n"
        "  max_tokens: 64\n  temperature: 0.0\n"
        f"prompts:\n{system_line}  user_prompt_path: prompts/user.txt\n"
        f"output_data:\n  output_dir: {root / 'output'}\n  experiment_name: demo\n"
        "  need_time_stamp: true\n"
        "run:\n  progress: false\n" + extra_yaml
    )
    path = root / "config.yaml"
    path.write_text(config)
    return path


def make_pool(n: int, *, tone: bool = True) -> list[dict[str, Any]]:
    return [
        {"user_prompt_kwargs": {"topic": f"topic {i}", "word_count": f"{10 + i} words"},
         **({"system_prompt_kwargs": {"tone": "plain"}} if tone else {})}
        for i in range(n)
    ]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=topic_draft) as srv:
        yield srv


UNREACHABLE = "http://127.0.0.1:9/v1"  # replay never connects; a leak fails loudly here


def recording_responder(body: dict[str, Any]) -> str:
    """Stand-in answers when recording without a real server (DATAGEN_RECORD=1 alone)."""
    import orjson

    prompt = last_user_message(body)
    match = re.search(r"quiz question about (.+?) for", prompt)
    if match:
        answer = {"question": f"What is the key idea of {match.group(1)}?",
                  "answer": f"The key idea of {match.group(1)}.", "difficulty": 3}
        return "Here is the question:\n```json\n" + orjson.dumps(answer).decode() + "\n```"
    return topic_draft(body)


@pytest.fixture
def base_url() -> Iterator[str]:
    """Where requests go: a live server while recording, nowhere while replaying."""
    from datagen.testing.cassettes import recording_requested

    if not recording_requested():
        yield UNREACHABLE
    elif os.environ.get("DATAGEN_RECORD_BASE_URL"):
        yield os.environ["DATAGEN_RECORD_BASE_URL"]
    else:
        with FakeOpenAIServer(responder=recording_responder) as server:
            yield server.base_url
