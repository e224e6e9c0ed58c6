"""End-to-end runs of the example scripts, replayed from recorded HTTP cassettes.

The cassettes hold real SmolLM2-135M-Instruct output, served by ``llama_cpp.server`` on
127.0.0.1 and reached through datagen's normal litellm ``openai/`` path with base_url.
Replay needs no server and no network. Re-record with ``make cassettes``
(tests/record_cassettes.py); ``DATAGEN_RECORD=1`` alone records against the project's
fake server instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from conftest import UNREACHABLE

from datagen.folder import load_folder
from datagen.testing.cassettes import SECRET_HEADERS, make_vcr, recording_requested
from datagen.testing.fake_server import last_user_message

ROOT = Path(__file__).resolve().parent.parent
CASSETTES = Path(__file__).resolve().parent / "cassettes"


def pipe(name: str, **overrides: Any) -> Any:
    """The example's pipeline, loaded the way `datagen run` loads it."""
    return load_folder(ROOT / "examples" / name, **overrides).pipeline


def load_example(name: str) -> ModuleType:
    path = ROOT / "examples" / name / "pipeline.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.NAME = name
    return module


@pytest.fixture
def cassette(datagen_cassette: Any) -> Any:
    """The kit's own fixture (datagen.testing.plugin): tests/cassettes/<test name>.yaml."""
    return datagen_cassette


def overrides(base_url: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    # constrain_output: llama.cpp servers take the extractor's GBNF grammar in the body
    return {"base_url": base_url, "api_key": "sk-cassette-test-key-0001", "max_retries": 0,
            "temperature": 0.0, "output_dir": str(tmp_path), "progress": False,
            "constrain_output": True, **extra}


def recorded_answers(cassette: Any) -> dict[str, str]:
    """The user message of every recorded request -> the text the server answered."""
    out = {}
    for request, response in zip(cassette.requests, cassette.responses, strict=True):
        body = orjson.loads(request.body)
        answer = orjson.loads(response["body"]["string"])
        out[last_user_message(body)] = answer["choices"][0]["message"]["content"]
    return out


async def test_five_topics_example(base_url: str, cassette: Any, tmp_path: Path) -> None:
    example = load_example("five_topics")
    pipeline = pipe("five_topics", **overrides(base_url, tmp_path))
    results = await pipeline.run(example.data_pool(None), concurrency_limit=5,
                                 extract_function=pipeline.make_default_extractor("draft"))
    assert [r["user_prompt_kwargs"]["topic"] for r in results] == example.TOPICS
    for record in results:
        assert record["output"].strip() and "<draft>" not in record["output"]
    lines = results.files.results.read_bytes().splitlines()
    assert len(lines) == 5
    assert all(orjson.loads(line)["model"] for line in lines)
    assert cassette.play_count == 5 or recording_requested()


async def test_custom_parser_example(base_url: str, cassette: Any, tmp_path: Path) -> None:
    """The example as written: its OpenAI json_schema response_format goes to the llama.cpp
    server as json_object + schema (provider: local with a base_url), which it takes."""
    example = load_example("custom_parser")
    assert pipe("custom_parser").settings.model.response_format["type"] == "json_schema"
    pipeline = pipe(example.NAME, **overrides(base_url, tmp_path))
    results = await pipeline.run(example.data_pool(None), concurrency_limit=3,
                                 parse_response=example.parse_response)
    assert len(results) == 3, results.files.failures.read_text()
    for record in results:
        assert set(record["output"]) == {"question", "answer", "difficulty"}
        assert 1 <= record["output"]["difficulty"] <= 5
    sent = [orjson.loads(r.body)["response_format"] for r in cassette.requests]
    assert {f["type"] for f in sent} == {"json_object"}
    assert all(f["schema"]["required"] == ["question", "answer", "difficulty"] for f in sent)
    assert cassette.play_count == 3 or recording_requested()


@pytest.mark.parametrize("transport", ["openai", "litellm"])
async def test_a_format_the_server_rejects_is_a_bad_request_tried_once(
        transport: str, base_url: str, cassette: Any, tmp_path: Path) -> None:
    """provider: openai sends the json_schema form as written; llama_cpp.server answers
    it with a 500 whose body is a validation error: one attempt, then the failures file."""
    example = load_example("custom_parser")
    pipeline = pipe(example.NAME, **overrides(base_url, tmp_path, provider="openai",
                                              model="smollm2", max_retries=3,
                                              transport=transport))
    results = await pipeline.run(example.data_pool(None)[:1],
                                 parse_response=example.parse_response)
    assert results == []
    failure = orjson.loads(results.files.failures.read_bytes())
    assert failure["error"]["kind"] == "bad_request", failure
    assert failure["error"]["attempts"] == 1
    assert "Input should be 'text' or 'json_object'" in failure["error"]["message"]
    assert len(cassette.requests) == 1 and cassette.responses[0]["status"]["code"] == 500


async def test_concurrent_requests_replay_their_own_answers(base_url: str, cassette: Any,
                                                            tmp_path: Path) -> None:
    example = load_example("five_topics")
    pipeline = pipe(example.NAME, **overrides(base_url, tmp_path, max_tokens=40,
                                         constrain_output=False))
    pool = [{"user_prompt_kwargs": {"topic": f"subject number {i}", "word_count": "20 words"},
             "system_prompt_kwargs": {"tone": "plain"}} for i in range(24)]
    results = await pipeline.run(pool, concurrency_limit=12)
    assert [r["index"] for r in results] == list(range(24))
    answers = recorded_answers(cassette)
    assert len(answers) == 24
    for record in results:  # each request got the answer recorded for its own body
        prompt = f"Write about {record['user_prompt_kwargs']['topic']} in about 20 words."
        assert record["raw_response"] == answers[prompt]


@pytest.mark.parametrize("transport", ["openai", "litellm"])
async def test_a_request_missing_from_the_cassette_fails_fast(transport: str, tmp_path: Path
                                                              ) -> None:
    example = load_example("five_topics")
    pipeline = pipe(example.NAME, **overrides(UNREACHABLE, tmp_path, transport=transport))
    pool = [{"user_prompt_kwargs": {"topic": "never recorded", "word_count": "1 word"},
             "system_prompt_kwargs": {"tone": "plain"}}]
    with make_vcr(CASSETTES, record=False).use_cassette("test_five_topics_example.yaml"):
        result = await pipeline.run(pool)
        assert result == []
    failure = orjson.loads(result.files.failures.read_bytes())
    assert failure["error"]["attempts"] == 1
    # the message says how to re-record, whichever transport wrapped the miss
    message = failure["error"]["message"]
    assert f"this request is not in {CASSETTES / 'test_five_topics_example.yaml'}" in message
    assert "Re-record it: DATAGEN_RECORD=1 pytest" in message


def test_no_cassette_holds_a_secret() -> None:
    files = sorted(CASSETTES.glob("*.yaml"))
    assert files, "no cassettes recorded"
    for path in files:
        text = path.read_text().lower()
        for header in SECRET_HEADERS:
            assert f"\n      {header}:" not in text, (path, header)
        assert "bearer" not in text and "sk-cassette-test-key" not in text, path


@pytest.mark.parametrize("transport", ["openai", "litellm"])
async def test_the_recorded_cassette_replays_through_either_transport(
    transport: str, tmp_path: Path
) -> None:
    if recording_requested():
        pytest.skip("replay only")
    example = load_example("five_topics")
    pipeline = pipe(example.NAME, **overrides(UNREACHABLE, tmp_path, transport=transport))
    with make_vcr(CASSETTES, record=False).use_cassette("test_five_topics_example.yaml") as cas:
        results = await pipeline.run(example.data_pool(None), concurrency_limit=5,
                                     extract_function=pipeline.make_default_extractor("draft"))
        assert cas.play_count == 5
    assert [r["user_prompt_kwargs"]["topic"] for r in results] == example.TOPICS
