"""The fast OpenAI-compatible transport and the litellm transport behave the same:
same error kinds, same retries, same Retry-After handling, same records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft

from datagen import DataGenerationPipeline, extract
from datagen.errors import ConfigError, RunAbortedError
from datagen.llm import caller
from datagen.testing import FakeOpenAIServer, FakeReply, FaultPlan
from datagen.testing.fake_server import completion_body

TRANSPORTS = ["openai", "litellm"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def run(project: Path, server: FakeOpenAIServer, transport: str, n: int = 1,
        **kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    p = DataGenerationPipeline(config=project, base_url=server.base_url, transport=transport,
                               cache=False, **kw)
    assert p.transport_name() == transport
    results = p.run_sync(make_pool(n), extract_function=extract.tag("draft"))
    assert results.files is not None
    failures = [orjson.loads(x) for x in results.files.failures.read_bytes().splitlines()] \
        if results.files.failures.exists() else []
    return results, failures


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_success_records_are_the_same(project: Path, server: FakeOpenAIServer,
                                      transport: str) -> None:
    results, _ = run(project, server, transport, n=20, max_tokens=64)
    assert [r["output"] for r in results] == [
        f"Topic {i} is a subject worth study." for i in range(20)]
    assert results[0]["usage"] == {"prompt_tokens": 22, "completion_tokens": 13,
                                   "total_tokens": 35}
    assert results[0]["finish_reason"] == "stop" and results[0]["model"] == "test-model"
    assert server.bodies[0]["max_tokens"] == 64 and server.bodies[0]["model"] == "test-model"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("reply", "kind", "attempts"), [
    (FakeReply(status=503), "server_error", 3),
    (FakeReply(status=500), "server_error", 3),
    (FakeReply(status=400), "bad_request", 1),
    (FakeReply(status=422), "bad_request", 1),
    (FakeReply(status=400, body={"error": {"message": "This model's maximum context length is "
                                           "4096 tokens", "code": "context_length_exceeded"}}),
     "context_window", 1),
    (FakeReply(status=429), "rate_limit", 3),
    (FakeReply(body=b'{"choices": [{"mess'), "server_error", 3),
    (FakeReply(body={"choices": [], "usage": {}}), "empty_response", 3),
])
def test_error_kinds_and_retries(project: Path, transport: str, reply: FakeReply, kind: str,
                                 attempts: int) -> None:
    with FakeOpenAIServer(responder=lambda body: reply) as server:
        results, failures = run(project, server, transport, max_retries=2)
        assert results == []
        assert failures[0]["error"]["kind"] == kind
        assert failures[0]["error"]["attempts"] == attempts
        assert server.request_count == attempts  # no hidden retries below us


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_after_is_honoured(project: Path, transport: str) -> None:
    seen: dict[str, int] = {}

    def once_429(body: dict[str, Any]) -> Any:
        key = str(body["messages"])
        seen[key] = seen.get(key, 0) + 1
        return FakeReply(status=429, headers={"Retry-After": "0.4"}) if seen[key] == 1 \
            else topic_draft(body)

    with FakeOpenAIServer(responder=once_429) as server:
        results, _ = run(project, server, transport, n=2, max_retries=1)
        assert len(results) == 2 and server.request_count == 4
        first, retry = sorted(server.arrivals)[0], sorted(server.arrivals)[2]
        assert retry - first >= 0.39  # nobody went before the Retry-After had passed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hang_is_a_timeout(project: Path, transport: str) -> None:
    with FakeOpenAIServer(responder=topic_draft,
                          faults=FaultPlan(rate_hang=1.0, hang_seconds=3)) as server:
        _, failures = run(project, server, transport, max_retries=0, timeout=0.5)
        assert failures[0]["error"]["kind"] == "timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("status", "kind"), [(401, "auth"), (403, "auth"), (404, "not_found")])
def test_fatal_statuses_stop_the_run(project: Path, transport: str, status: int,
                                     kind: str) -> None:
    with FakeOpenAIServer(responder=lambda body: FakeReply(status=status)) as server:
        with pytest.raises(RunAbortedError) as err:
            run(project, server, transport, n=3)
        assert err.value.kind == kind


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_refused(project: Path, transport: str) -> None:
    p = DataGenerationPipeline(config=project, base_url="http://127.0.0.1:9/v1",
                               transport=transport, max_retries=1, cache=False)
    result = p.run_sync(make_pool(1))
    assert result == []
    failure = orjson.loads(result.files.failures.read_bytes())
    assert failure["error"]["kind"] == "connection" and failure["error"]["attempts"] == 2


def test_auto_picks_the_fast_path_only_for_openai_compatible_endpoints(project: Path) -> None:
    assert DataGenerationPipeline(config=project).transport_name() == "openai"
    # issue 16: Anthropic's Messages API has a fast path of its own; the embedded model
    # is served in process by its own transport (no litellm on that path either)
    assert DataGenerationPipeline(config=project, provider="anthropic",
                                  base_url=None).transport_name() == "anthropic"
    assert DataGenerationPipeline(config=project, provider="local", model="smollm2",
                                  base_url=None).transport_name() == "local"
    assert DataGenerationPipeline(config=project, provider="gemini", model="gemini-2.0-flash",
                                  base_url=None).transport_name() == "litellm"
    assert DataGenerationPipeline(config=project, provider="local",
                                  base_url="http://127.0.0.1:1/v1").transport_name() == "openai"
    with pytest.raises(ConfigError, match="transport 'openai' needs an OpenAI-compatible"):
        DataGenerationPipeline(config=project, provider="anthropic",
                               transport="openai").transport_name()


def test_the_fast_path_does_not_import_litellm(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import write_project

    cfg = write_project(tmp_path)
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_pool, topic_draft
from datagen import DataGenerationPipeline
from datagen.testing import FakeOpenAIServer
with FakeOpenAIServer(responder=topic_draft) as server:
    p = DataGenerationPipeline(config={str(cfg)!r}, base_url=server.base_url)
    assert len(p.run_sync(make_pool(3))) == 3
print("litellm" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_local_model_served_over_http_gets_the_grammar(project: Path) -> None:
    with FakeOpenAIServer(responder=lambda body: "<draft>x</draft>") as server:
        p = DataGenerationPipeline(config=project, provider="local", model="smollm2",
                                   base_url=server.base_url, cache=False)
        p.run_sync(make_pool(1), extract_function=extract.tag("draft"))
        assert server.bodies[0]["grammar"].startswith('root ::= "<draft>"')
        assert server.bodies[0]["model"] == "smollm2"
        plain = DataGenerationPipeline(config=project, base_url=server.base_url, cache=False)
        plain.run_sync(make_pool(1), extract_function=extract.tag("draft"))
        assert "grammar" not in server.bodies[1]  # an OpenAI model gets no grammar


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_used_up_limit_in_the_headers_holds_every_worker_until_it_resets(
        project: Path, transport: str) -> None:
    """The third answer says no requests are left for 1.5 s: nobody sends in that time
    (a send there would have been a 429 from a real provider)."""
    state = {"answered": 0, "closed_until": 0.0, "early": 0}

    def limited(body: dict[str, Any]) -> Any:
        now = time.monotonic()
        if now < state["closed_until"]:
            state["early"] += 1
            return FakeReply(status=429, headers={"Retry-After": "1"})
        state["answered"] += 1
        remaining = max(0, 3 - state["answered"])
        if remaining == 0:
            state["closed_until"] = now + 1.5
        return FakeReply(body=completion_body(body, topic_draft(body)), headers={
            "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": "1.5s"})

    with FakeOpenAIServer(responder=limited) as server:
        results, failures = run(project, server, transport, n=5, max_retries=2,
                                concurrency_limit=1)
    assert len(results) == 5 and failures == []
    assert state["early"] == 0  # held back by the headers, not told off by a 429
