"""Issue 13, point 7: llama.cpp servers and JSON. A ``json_schema`` response_format is sent
as llama.cpp takes it (provider: local with a base_url), a request the server rejects as
invalid is a bad request (one attempt, never retried), and a run whose first items all
fail extraction because no constraint was sent says to set ``constrain_output``.

The same against a real ``python -m llama_cpp.server``: tests/test_replay.py (cassettes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

from datagen import DataGenerationPipeline, extract
from datagen.llm import caller
from datagen.llm.errors import invalid_request
from datagen.testing import FakeOpenAIServer, FakeReply

SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}},
          "required": ["question"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "quiz", "schema": SCHEMA}}
# what llama_cpp.server 0.3.36 answers to that format (its body, as recorded)
LLAMA_422_AS_500 = {"error": {
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
    "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
    "'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File "
    "\"/srv/llama_cpp/server/app.py\", line 376, in create_chat_completion\n    POST "
    "/v1/chat/completions", "type": "internal_server_error", "param": None, "code": None}}
TRANSPORTS = ["openai", "litellm"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def like_llama_server(body: dict[str, Any]) -> Any:
    """A server that validates response_format as llama_cpp.server does."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") not in (None, "text", "json_object"):
        return FakeReply(status=500, body=LLAMA_422_AS_500)
    return '{"question": "What is a prime?"}'


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_json_schema_is_translated_for_a_llama_cpp_server(project: Path, transport: str
                                                           ) -> None:
    with FakeOpenAIServer(responder=like_llama_server) as server:
        p = DataGenerationPipeline(config=project, provider="local", model="smollm2",
                                   base_url=server.base_url, transport=transport,
                                   response_format=JSON_SCHEMA, max_retries=3)
        results = p.run_sync(make_pool(2))
        bodies = list(server.bodies)
    assert len(results) == 2, lines(results.files.failures)
    assert server.request_count == 2
    assert {orjson.dumps(b["response_format"]) for b in bodies} == {
        orjson.dumps({"type": "json_object", "schema": SCHEMA})}


def test_a_steps_pydantic_response_format_is_translated_too(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Quiz(BaseModel):
        question: str

    qa = Path(__file__).resolve().parent / "pipelines" / "qa"
    with FakeOpenAIServer(responder=like_llama_server) as server:
        p = (DataGenerationPipeline(config=qa / "config.yaml", provider="local",
                                    base_url=server.base_url, output_dir=str(tmp_path))
             .step("question", prompt="question.yaml", response_format=Quiz))
        results = p.run_sync([{"text": "Primes."}])
        (body,) = server.bodies
    assert results[0]["output"] == {"question": "What is a prime?"}
    assert body["response_format"]["type"] == "json_object"
    assert body["response_format"]["schema"]["properties"] == {
        "question": {"title": "Question", "type": "string"}}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_validation_error_in_a_500_is_a_bad_request_tried_once(project: Path,
                                                                 transport: str) -> None:
    with FakeOpenAIServer(responder=like_llama_server) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url,
                                   transport=transport, response_format=JSON_SCHEMA,
                                   max_retries=3)  # provider openai: sent as written
        results = p.run_sync(make_pool(1))
        assert server.request_count == 1  # not retried: asking again cannot help
    (failure,) = lines(results.files.failures)
    assert failure["error"]["kind"] == "bad_request"
    assert failure["error"]["attempts"] == 1
    assert "Input should be 'text' or 'json_object'" in failure["error"]["message"]


@pytest.mark.parametrize(("status", "message", "kind"), [
    (500, "1 validation error for ChatCompletionRequest\nmax_tokens\n  Input should be a "
          "valid integer", "bad_request"),
    (500, "2 validation errors: Extra inputs are not permitted", "bad_request"),
    (503, "{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required'}",
     "bad_request"),
    (500, "Internal server error: CUDA out of memory", "server_error"),
    (503, "the model is loading", "server_error"),
    (429, "1 validation error: Input should be slower", "rate_limit"),
    (None, "1 validation error", "error"),
])
def test_which_errors_are_request_validation_errors(status: int | None, message: str,
                                                    kind: str) -> None:
    from datagen.llm.errors import kind_for_status

    assert invalid_request(kind_for_status(status), status, message) == kind


def test_a_plain_500_is_still_retried(project: Path) -> None:
    replies = iter([FakeReply(status=500, body={"error": {"message": "overloaded"}})])

    def flaky(body: dict[str, Any]) -> Any:
        return next(replies, None) or topic_draft(body)

    with FakeOpenAIServer(responder=flaky) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, max_retries=2)
        results = p.run_sync(make_pool(1))
        assert server.request_count == 2
    assert len(results) == 1


# ---- the summary says to send the constraint ----------------------------------------------

def no_tags(body: dict[str, Any]) -> str:
    """A small model that ignores "put it in <draft> tags"."""
    return "Topics are interesting and worth study."


def run_five(tmp_path: Path, responder: Any, **overrides: Any) -> Any:
    with FakeOpenAIServer(responder=responder) as server:
        p = DataGenerationPipeline(config=write_project(tmp_path), base_url=server.base_url,
                                   **overrides)
        return p.run_sync(make_pool(5), extract_function=extract.tag("draft")), server


def test_all_early_items_failing_extraction_without_a_constraint_hint_constrain_output(
        tmp_path: Path) -> None:
    results, server = run_five(tmp_path, no_tags)
    assert "grammar" not in server.bodies[0]  # provider openai: nothing sent
    (hint,) = results.manifest["hints"]
    assert hint.startswith("all of the first 5 items failed extraction (tag(draft))")
    assert "set model.constrain_output: true" in hint
    assert "--set constrain_output=true" in hint
    assert "hint: all of the first 5 items" in results.files.log.read_text()


@pytest.mark.parametrize(("responder", "overrides"), [
    (topic_draft, {}),  # the items succeed
    (no_tags, {"constrain_output": True}),  # the grammar was sent: the hint cannot help
    (no_tags, {"response_format": {"type": "json_object"}}),  # the user's own format
])
def test_no_hint_when_it_would_not_help(tmp_path: Path, responder: Any,
                                        overrides: dict[str, Any]) -> None:
    results, _ = run_five(tmp_path, responder, **overrides)
    assert results.manifest["hints"] == []


def test_no_hint_for_a_plain_function(tmp_path: Path) -> None:
    def parse(text: str) -> str:
        return extract.tag("draft")(text)

    with FakeOpenAIServer(responder=no_tags) as server:
        p = DataGenerationPipeline(config=write_project(tmp_path), base_url=server.base_url)
        results = p.run_sync(make_pool(2), extract_function=parse)
    assert results.counts["failed"] == 2 and results.manifest["hints"] == []


def test_the_cli_prints_the_hint_with_no_progress(tmp_path: Path) -> None:
    write_project(tmp_path)
    (tmp_path / "pipeline.py").write_text(
        "from datagen import extract\n"
        "extract_function = extract.tag('draft')\n"
        "def build(pipeline):\n    return pipeline\n"
        "def data_pool(pipeline):\n"
        "    return [{'user_prompt_kwargs': {'topic': t, 'word_count': '9 words'},\n"
        "             'system_prompt_kwargs': {'tone': 'plain'}} for t in 'abc']\n")
    with FakeOpenAIServer(responder=no_tags) as server:
        out = subprocess.run(
            [sys.executable, "-m", "datagen.cli", "run", str(tmp_path),
             "--set", f"base_url={server.base_url}", "--no-progress",
             "--max-failure-rate", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "datagen: hint: all of the first 3 items failed extraction (tag(draft))" in \
        out.stderr
