"""Issue 11: cache identity from the whole request, the resume fingerprint's endpoint,
RunResult, the annotated config, the test kit outside the library path."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_pool, topic_draft

from datagen import DataGenerationPipeline, RunResult, extract
from datagen.llm.types import ChatRequest, identity_fields, request_identity
from datagen.manifest import ResumeError
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message

BASE = ChatRequest(model="openai/m", messages=[{"role": "user", "content": "hi"}],
                   params={"temperature": 0.5}, provider="openai",
                   base_url="http://127.0.0.1:1/v1", headers={"X-Title": "a"},
                   api_key="sk-one-key-123456", timeout=10.0)
CHANGED: dict[str, Any] = {
    "model": "openai/other", "messages": [{"role": "user", "content": "ho"}],
    "params": {"temperature": 0.6}, "provider": "together_ai",
    "base_url": "http://127.0.0.1:2/v1", "prompt": "Once upon a time",
    "headers": {"X-Title": "b"},
}


def test_every_field_of_the_request_is_part_of_its_identity() -> None:
    """Adding a field to ChatRequest changes the key without anyone remembering to: the
    identity is every field but the ones marked otherwise, and only the credential and the
    client-side timeout are marked."""
    fields = {f.name for f in dataclasses.fields(ChatRequest)}
    assert fields - set(identity_fields()) == {"api_key", "timeout"}
    assert set(CHANGED) == set(identity_fields()), "a new field needs a case here"
    key = request_identity(BASE)
    for name, value in CHANGED.items():
        assert request_identity(dataclasses.replace(BASE, **{name: value})) != key, name
    assert request_identity(BASE, salt="x") != key
    # what is not sent to the model, or is a secret, does not split the cache
    assert request_identity(dataclasses.replace(BASE, api_key="sk-another-98765")) == key
    assert request_identity(dataclasses.replace(BASE, timeout=99.0)) == key
    secret = dataclasses.replace(BASE, headers={"X-Title": "a", "Authorization": "Bearer x"})
    assert request_identity(secret) == key


def test_completion_mode_with_the_cache_on_gives_each_item_its_own_answer(
        tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "story.txt").write_text("Once upon a time, {{ hero }}")
    with FakeOpenAIServer(responder=lambda body: f"...and {body['prompt'][18:]} won.") as srv:
        def build() -> DataGenerationPipeline:
            return (DataGenerationPipeline(config=None, base_url=srv.base_url, model="base",
                                           output_dir=str(tmp_path / "out"), progress=False)
                    .step("story", prompt=prompts / "story.txt", mode="completion"))

        pool = [{"hero": h} for h in ("Ann", "Bo", "Cy")]
        first = build().run_sync(pool)
        assert sorted(r["output"] for r in first) == ["...and Ann won.", "...and Bo won.",
                                                      "...and Cy won."]
        assert srv.request_count == 3
        second = build().run_sync(pool)  # a new run: every answer from the cache
        assert [r["output"] for r in second] == [r["output"] for r in first]
        assert srv.request_count == 3


def test_the_same_model_on_two_servers_is_two_cache_entries_and_no_resume(
        project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer(responder=lambda body: "<draft>one</draft>") as one, \
            FakeOpenAIServer(responder=lambda body: "<draft>two</draft>") as two:
        a = DataGenerationPipeline(config=project, base_url=one.base_url, cache_path=str(cache))
        assert a.run_sync(make_pool(2))[0]["output"] == "<draft>one</draft>"
        b = DataGenerationPipeline(config=project, base_url=two.base_url, cache_path=str(cache))
        assert b.run_sync(make_pool(2))[0]["output"] == "<draft>two</draft>"
        assert one.request_count == 2 and two.request_count == 2  # nothing reused across
        with sqlite3.connect(cache) as db:
            assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 4
        with pytest.raises(ResumeError, match=r"endpoint: openai @ http://127\.0\.0\.1:\d+/v1 "
                                              r"-> openai @ http://127\.0\.0\.1:\d+/v1"):
            DataGenerationPipeline(config=project, base_url=one.base_url,
                                   cache_path=str(cache)).run_sync(make_pool(3), resume=True)
        assert one.request_count == 2


def test_run_returns_a_run_result(project: Path, server: FakeOpenAIServer) -> None:
    server.responder = lambda body: (topic_draft(body) if "topic 1" not in str(body)
                                     else "no tags")
    p = DataGenerationPipeline(config=project, base_url=server.base_url)
    result = p.run_sync(make_pool(3), extract_function=extract.tag("draft"))
    assert isinstance(result, RunResult) and isinstance(result, list)
    assert [r["index"] for r in result] == [0, 2]
    assert result.status == "completed"
    assert result.counts["succeeded"] == 2 and result.counts["failed"] == 1
    assert result.counts["dropped"] == 0
    assert result.manifest == json.loads(result.files.manifest.read_text())
    assert result.files.results.read_bytes().count(b"\n") == 2
    lines = [json.loads(x) for x in result.files.results.read_bytes().splitlines()]
    assert sorted(lines, key=lambda r: r["index"]) == list(result)  # memory = file
    assert not hasattr(p, "last_run_files")


def test_an_error_that_stops_the_run_carries_what_was_done(project: Path,
                                                           server: FakeOpenAIServer) -> None:
    def items() -> Any:
        yield from make_pool(2)
        yield {"user_prompt_kwargs": {"topic": "x"}}  # word_count missing

    with pytest.raises(Exception) as err:
        DataGenerationPipeline(config=project, base_url=server.base_url).run_sync(
            items(), concurrency_limit=1)
    result = err.value.result  # type: ignore[attr-defined]
    assert result.status == "failed" and len(result) == 2


def test_datagen_config_prints_every_field_and_loads_back() -> None:
    from datagen.config import load_settings
    from datagen.config.explain import annotated_config
    from datagen.config.schema import SECTIONS

    text = annotated_config()
    data = yaml.safe_load(text)
    for section, cls in SECTIONS.items():
        assert set(data[section]) == set(cls.model_fields), section
        for name, info in cls.model_fields.items():
            assert f"{name}: " in text and str(info.description) in text, name
    assert load_settings(data).model_dump() == load_settings(None).model_dump()


def test_the_fake_model_is_a_provider_like_any_other(fake_llm: Any, tmp_path: Path) -> None:
    from datagen.llm import providers

    fake_llm.script("<draft>hello</draft>")
    p = DataGenerationPipeline(config=None, provider="fake", model="m",
                               user_prompt_path=str(_prompt(tmp_path)),
                               output_dir=str(tmp_path / "out"), progress=False)
    assert p.transport_name() == "fake"
    assert p.run_sync([{"user_prompt_kwargs": {"x": 1}}])[0]["output"] == "<draft>hello</draft>"
    assert "fake" in providers._PROVIDERS  # registered by the test kit, not the library
    assert last_user_message({"messages": fake_llm.calls[0].messages}) == "About 1."


def _prompt(tmp_path: Path) -> Path:
    path = tmp_path / "user.txt"
    path.write_text("About {{ x }}.")
    return path
