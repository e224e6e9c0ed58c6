"""datagen.testing as a user meets it: the pytest plugin's fixtures, in a fresh project."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_pool, write_project

from datagen import DataGenerationPipeline, extract
from datagen.testing import FakeLLM, FakeOpenAIServer

pytest_plugins = ["pytester"]


def test_fake_llm_scripted_then_rule(fake_llm: FakeLLM, tmp_path: Path) -> None:
    fake_llm.script("<draft>first</draft>").rule(lambda msgs: "<draft>ruled</draft>")
    p = DataGenerationPipeline(config=write_project(tmp_path), provider="fake", model="m")
    results = p.run_sync(make_pool(3), concurrency_limit=1,
                         extract_function=extract.tag("draft"))
    assert [r["output"] for r in results] == ["first", "ruled", "ruled"]
    assert len(fake_llm.calls) == 3
    assert fake_llm.calls[0].messages[-1]["content"] == "Write about topic 0 in about 10 words."
    assert fake_llm.calls[0].params["temperature"] == 0.0


def test_fake_llm_is_reset_between_tests(fake_llm: FakeLLM) -> None:
    assert fake_llm.calls == []


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_test_file() -> str:
    """The test file the README's "Testing your pipeline" section shows, verbatim."""
    section = README.read_text().split("## Testing your pipeline", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_users_test_records_once_then_replays_with_the_server_stopped(
    pytester: pytest.Pytester,
) -> None:
    write_project(pytester.path)
    source = readme_test_file()
    assert 'base_url="http://127.0.0.1:8000/v1"' in source
    with FakeOpenAIServer(responder=lambda body: "<draft>Some text.</draft>") as server:
        pytester.makepyfile(test_mine=source.replace("http://127.0.0.1:8000/v1",
                                                     server.base_url))
        first = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        first.assert_outcomes(passed=2)
        assert server.request_count == 2
    cassette = pytester.path / "cassettes" / "test_pipeline_writes_drafts.yaml"
    assert cassette.exists() and "authorization" not in cassette.read_text().lower()
    # the server is gone: the second run can only pass by replaying
    second = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    second.assert_outcomes(passed=2)
