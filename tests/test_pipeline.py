"""End-to-end runs against the fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

from datagen import DataGenerationPipeline, extract
from datagen.errors import (
    ConfigError,
    DataPoolError,
    OutputError,
    RunAbortedError,
    TemplateError,
)  # fmt: skip
from datagen.llm import caller
from datagen.testing import FakeOpenAIServer, FakeReply

SECRET = "sk-test-DATAGEN-SECRET-1234567890"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def pipeline(project: Path, server: FakeOpenAIServer, **kw: Any) -> DataGenerationPipeline:
    return DataGenerationPipeline(config=project, base_url=server.base_url, **kw)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_200_items_stream_to_a_timestamped_file_in_input_order(
    project: Path, server: FakeOpenAIServer
) -> None:
    server.latency = 0.02
    p = pipeline(project, server)
    results = await p.run(make_pool(200), concurrency_limit=16,
                          extract_function=p.make_default_extractor(pattern_name="draft"))
    files = results.files
    assert files is not None
    assert files.results.name.startswith("demo_") and len(files.results.stem) == len(
        "demo_20261122_101500")
    lines = read_jsonl(files.results)
    assert len(lines) == 200
    assert sorted(r["index"] for r in lines) == list(range(200))
    assert len({r["key"] for r in lines}) == 200
    assert [r["index"] for r in results] == list(range(200))
    assert results[5]["output"] == "Topic 5 is a subject worth study."
    assert results[5]["user_prompt_kwargs"] == {"topic": "topic 5", "word_count": "15 words"}
    assert results[5]["usage"]["total_tokens"] > 0
    assert results[5]["finish_reason"] == "stop"
    assert server.request_count == 200
    assert server.max_in_flight == 16
    assert not read_jsonl(files.failures)


async def test_request_carries_rendered_messages_and_sampling(
    project: Path, server: FakeOpenAIServer
) -> None:
    p = pipeline(project, server, temperature=0.9, max_tokens=2048, seed=7)
    await p.run(make_pool(1))
    body = server.bodies[0]
    assert body["messages"] == [
        {"role": "system", "content": "You write in a plain tone. Put the text between "
                                      "<draft> and </draft> tags."},
        {"role": "user", "content": "Write about topic 0 in about 10 words."},
    ]
    assert body["temperature"] == 0.9 and body["max_tokens"] == 2048 and body["seed"] == 7
    assert body["model"] == "test-model"


async def test_without_extractor_the_raw_text_is_kept(project: Path,
                                                      server: FakeOpenAIServer) -> None:
    results = await pipeline(project, server).run(make_pool(2))
    assert results[1]["output"] == topic_draft(server.bodies[-1]) or "<draft>" in results[1][
        "output"]
    assert results[0]["output"] == results[0]["raw_response"]


async def test_missing_template_variable_fails_before_any_request(
    project: Path, server: FakeOpenAIServer
) -> None:
    pool = make_pool(50)
    del pool[37]["user_prompt_kwargs"]["word_count"]
    p = pipeline(project, server)
    with pytest.raises(TemplateError) as err:
        await p.run(pool, concurrency_limit=8)
    assert "user.txt" in str(err.value) and "'word_count'" in str(err.value)
    assert "item 37" in str(err.value)
    assert server.request_count == 0
    assert not (project.parent / "output").exists()


async def test_missing_system_variable_is_found_too(project: Path,
                                                    server: FakeOpenAIServer) -> None:
    pool = make_pool(3)
    pool[2]["system_prompt_kwargs"] = {}
    with pytest.raises(TemplateError, match=r"system\.txt.*'tone'.*item 2"):
        await pipeline(project, server).run(pool)
    assert server.request_count == 0


async def test_generator_pool_is_read_lazily(project: Path, server: FakeOpenAIServer) -> None:
    pulled: list[int] = []

    def gen() -> Iterator[dict[str, Any]]:
        for i, item in enumerate(make_pool(30)):
            pulled.append(i)
            # never more than the workers' items ahead of what the server has seen
            assert i - server.request_count <= 4 + 1
            yield item

    results = await pipeline(project, server).run(gen(), concurrency_limit=4)
    assert len(results) == 30 and pulled == list(range(30))


async def test_generator_with_a_bad_item_stops_the_run(project: Path,
                                                       server: FakeOpenAIServer) -> None:
    def gen() -> Iterator[Any]:
        yield from make_pool(3)
        yield {"user_prompt_kwargs": {"topic": "x"}}  # word_count missing

    p = pipeline(project, server)
    with pytest.raises(TemplateError, match="item 3") as err:
        await p.run(gen(), concurrency_limit=1)
    files = err.value.result.files  # type: ignore[attr-defined]
    assert files is not None
    manifest = json.loads(files.manifest.read_text())
    assert manifest["status"] == "failed" and manifest["counts"]["succeeded"] == 3


async def test_generator_that_raises_is_a_clear_error(project: Path,
                                                      server: FakeOpenAIServer) -> None:
    def gen() -> Iterator[Any]:
        yield from make_pool(2)
        raise ValueError("source broke")

    with pytest.raises(DataPoolError, match="raised ValueError while producing item 2"):
        await pipeline(project, server).run(gen(), concurrency_limit=1)


async def test_async_generator_pool(project: Path, server: FakeOpenAIServer) -> None:
    async def agen() -> AsyncIterator[dict[str, Any]]:
        for item in make_pool(12):
            await asyncio.sleep(0)
            yield item

    results = await pipeline(project, server).run(agen(), concurrency_limit=5)
    assert [r["index"] for r in results] == list(range(12))


async def test_jsonl_file_pool(project: Path, server: FakeOpenAIServer, tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_bytes(b"\n".join(orjson.dumps(i) for i in make_pool(7)) + b"\n")
    results = await pipeline(project, server).run(pool_file)
    assert len(results) == 7


async def test_jsonl_pool_with_bad_line(project: Path, server: FakeOpenAIServer,
                                        tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text(orjson.dumps(make_pool(1)[0]).decode() + "\n{oops\n")
    with pytest.raises(DataPoolError, match=r"pool\.jsonl, line 2: not valid JSON"):
        await pipeline(project, server).run(pool_file)
    assert server.request_count == 0


@pytest.mark.parametrize(("pool", "message"), [
    (42, "must be a list, an iterable of items"),
    ({"user_prompt_kwargs": {}}, "single dict"),
    (["text"], "item 0 is a str, not a dict"),
    ([{"user_prompt_kwargs": {"topic": "a", "word_count": "1"},
       "system_prompt_kwargs": {"tone": "dry"}}, {"prompt": "x"}],
     "item 1 has no 'user_prompt_kwargs'"),
    ([{"user_prompt_kwargs": "topic"}], "'user_prompt_kwargs' must be a dict"),
])
async def test_malformed_pools(project: Path, server: FakeOpenAIServer, pool: Any,
                               message: str) -> None:
    with pytest.raises(DataPoolError, match=message):
        await pipeline(project, server).run(pool)
    assert server.request_count == 0


async def test_empty_pool_finishes_with_a_warning(project: Path,
                                                  server: FakeOpenAIServer) -> None:
    p = pipeline(project, server)
    with pytest.warns(UserWarning, match="data pool is empty"):
        results = await p.run([])
    assert results == []
    assert results.files is not None
    assert results.files.results.read_bytes() == b""
    manifest = json.loads(results.files.manifest.read_text())
    assert manifest["status"] == "completed" and manifest["counts"]["finished"] == 0


async def test_extractor_failures_become_failure_lines(project: Path,
                                                       server: FakeOpenAIServer) -> None:
    server.responder = lambda body: ("<draft>ok</draft>" if "topic 1" not in str(body)
                                     else "I refuse to use tags.")
    p = pipeline(project, server)
    results = await p.run(make_pool(3), extract_function=extract.tag("draft"))
    assert [r["index"] for r in results] == [0, 2]
    assert results.files is not None
    (failure,) = read_jsonl(results.files.failures)
    assert failure["index"] == 1 and failure["error"]["kind"] == "extraction"
    assert "no complete <draft>" in failure["error"]["message"]
    assert failure["raw_response"] == "I refuse to use tags."


async def test_custom_parse_response_sync_and_async(project: Path,
                                                    server: FakeOpenAIServer) -> None:
    def parse(text: str) -> dict[str, Any]:
        return {"words": len(text.split())}

    async def aparse(text: str) -> int:
        await asyncio.sleep(0)
        return len(text)

    p = pipeline(project, server)
    assert "words" in (await p.run(make_pool(1), parse_response=parse))[0]["output"]
    p2 = pipeline(project, server)
    assert isinstance((await p2.run(make_pool(1), extract_function=aparse))[0]["output"], int)


async def test_extractor_that_raises_anything_fails_only_that_item(
    project: Path, server: FakeOpenAIServer
) -> None:
    def explode(text: str) -> str:
        raise ZeroDivisionError("boom")

    p = pipeline(project, server)
    results = await p.run(make_pool(4), extract_function=explode)
    assert results == []
    assert results.files is not None
    failures = read_jsonl(results.files.failures)
    assert len(failures) == 4
    assert failures[0]["error"]["message"] == "ZeroDivisionError: boom"


async def test_unserialisable_output_is_an_item_failure(project: Path,
                                                        server: FakeOpenAIServer) -> None:
    p = pipeline(project, server)
    results = await p.run(make_pool(2), parse_response=lambda text: object())
    assert results == []
    assert results.files is not None
    failures = read_jsonl(results.files.failures)
    assert {f["error"]["kind"] for f in failures} == {"serialization"}
    assert "cannot be written as JSON" in failures[0]["error"]["message"]


async def test_pydantic_output_is_serialised(project: Path, server: FakeOpenAIServer) -> None:
    from pydantic import BaseModel

    class Out(BaseModel):
        n: int

    server.responder = lambda body: 'Result: {"n": 3}'
    results = await pipeline(project, server).run(make_pool(1),
                                                  extract_function=extract.json(Out))
    # in memory as in the file (issue 11.6): the model as JSON
    assert results[0]["output"] == {"n": 3} == Out(n=3).model_dump()


async def test_invalid_api_key_stops_the_run(project: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft, api_key="sk-the-right-key-000") as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url,
                                   api_key="sk-wrong-key-1234567")
        with pytest.raises(RunAbortedError) as err:
            await p.run(make_pool(40), concurrency_limit=4)
        assert err.value.kind == "auth"
        assert "api_key" in str(err.value) and "sk-wrong-key-1234567" not in str(err.value)
        assert server.request_count <= 4  # stopped at once, nothing retried
        files = err.value.result.files
        assert files is not None
        manifest = json.loads(files.manifest.read_text())
        assert manifest["status"] == "failed" and manifest["error"]["kind"] == "auth"
        # an aborted item is not an item failure: resume must redo it
        assert read_jsonl(files.failures) == []


async def test_429_with_retry_after_is_retried(project: Path) -> None:
    calls: dict[str, int] = {}

    def flaky(body: dict[str, Any]) -> Any:
        key = str(body["messages"])
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == 1:
            return FakeReply(status=429, headers={"Retry-After": "0.3"})
        return topic_draft(body)

    with FakeOpenAIServer(responder=flaky) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, max_retries=2)
        results = await p.run(make_pool(3))
        assert len(results) == 3 and all(r["attempts"] == 2 for r in results)
        assert server.request_count == 6  # the SDK's own retries are off: 1 + 1 per item
        assert results.files is not None
        manifest = json.loads(results.files.manifest.read_text())
        assert manifest["calls"]["rate_limited"] == 3 and manifest["calls"]["retries"] == 3


async def test_server_errors_retry_then_fail_with_kind(project: Path) -> None:
    with FakeOpenAIServer(responder=lambda body: FakeReply(status=503)) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, max_retries=2)
        results = await p.run(make_pool(1))
        assert results == []
        assert server.request_count == 3
        assert results.files is not None
        (failure,) = read_jsonl(results.files.failures)
        assert failure["error"]["kind"] == "server_error" and failure["error"]["attempts"] == 3


async def test_bad_request_is_not_retried(project: Path) -> None:
    with FakeOpenAIServer(responder=lambda body: FakeReply(status=400)) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, max_retries=3)
        results = await p.run(make_pool(2))
        assert results == []
        assert server.request_count == 2
        assert results.files is not None
        kinds = {f["error"]["kind"] for f in read_jsonl(results.files.failures)}
        assert kinds == {"bad_request"}


async def test_connection_refused_is_a_connection_failure(project: Path, tmp_path: Path) -> None:
    p = DataGenerationPipeline(config=project, base_url="http://127.0.0.1:9/v1")
    results = await p.run(make_pool(1))
    assert results == []
    assert results.files is not None
    (failure,) = read_jsonl(results.files.failures)
    assert failure["error"]["kind"] == "connection"


async def test_api_key_never_written(project: Path) -> None:
    with FakeOpenAIServer(responder=lambda b: "<draft>x</draft>", api_key=SECRET) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, api_key=SECRET)
        results = await p.run(make_pool(5), extract_function=extract.tag("draft"))
        assert len(results) == 5
        assert server.headers[0]["Authorization"] == f"Bearer {SECRET}"
    written = [f for f in (project.parent / "output").rglob("*") if f.is_file()]
    assert {f.suffix for f in written} >= {".jsonl", ".json", ".log", ".sqlite"}
    for f in written:
        assert SECRET.encode() not in f.read_bytes(), f


async def test_rate_limit_holds_in_every_second_at_the_server(project: Path,
                                                              server: FakeOpenAIServer) -> None:
    p = pipeline(project, server, rate_limit=20)
    await p.run(make_pool(50), concurrency_limit=16)
    assert server.request_count == 50
    assert server.max_in_window(1.0) <= 20


@pytest.mark.parametrize("transport", ["openai", "litellm"])
async def test_the_rate_window_counts_each_request_from_when_it_was_written(
        project: Path, server: FakeOpenAIServer, transport: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the window's grant and the request on the wire a transport spends its own
    CPU (litellm: milliseconds, tens under load): counted from the grant, the server saw
    101 in one second at a cap of 100. Every transport must report the write."""
    from datagen.llm import ratewindow

    written: list[float] = []
    real = ratewindow.Send.sent
    monkeypatch.setattr(ratewindow.Send, "sent",
                        lambda self, at: (written.append(at), real(self, at))[1])
    p = pipeline(project, server, rate_limit=50, transport=transport)
    await p.run(make_pool(12), concurrency_limit=4)
    assert server.request_count == 12
    assert len(written) >= 12  # one report per request (and the first one's answer)


async def test_manifest_and_log(project: Path, server: FakeOpenAIServer) -> None:
    p = pipeline(project, server, api_key="sk-manifest-secret-99")
    results = await p.run(make_pool(4), extract_function=extract.tag("draft"))
    assert results.files is not None
    manifest = json.loads(results.files.manifest.read_text())
    assert manifest["status"] == "completed"
    assert manifest["counts"] == {"finished": 4, "succeeded": 4, "failed": 0,
                                  "failed_by_kind": {}, "skipped_done": 0,
                                  "results_in_file": 4}
    assert manifest["calls"]["cache_misses"] == 4 and manifest["calls"]["cache_hits"] == 0
    assert manifest["calls"]["requests"] == 4
    assert manifest["tokens"]["total"] == sum(
        r["usage"]["total_tokens"] for r in read_jsonl(results.files.results))
    assert manifest["extractor"] == "tag(draft)"
    assert manifest["config"]["model"]["api_key"] == "<redacted>"
    log = results.files.log.read_text()
    assert "run completed: 4 succeeded, 0 failed; 4 requests, 0 retries" in log
    assert "sk-manifest-secret-99" not in log


async def test_unknown_provider_fails_before_any_request(project: Path,
                                                         server: FakeOpenAIServer) -> None:
    p = pipeline(project, server, provider="opnai")
    with pytest.raises(ConfigError, match="unknown model provider 'opnai'.*'openai'"):
        await p.run(make_pool(1))
    assert server.request_count == 0


async def test_output_dir_not_writable(project: Path, server: FakeOpenAIServer,
                                       tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = pipeline(project, server, output_dir=str(blocker / "sub"))
    with pytest.raises(OutputError, match="cannot create the output directory"):
        await p.run(make_pool(1))
    assert server.request_count == 0


async def test_existing_output_without_timestamp_is_not_overwritten(
    project: Path, server: FakeOpenAIServer
) -> None:
    p = pipeline(project, server, need_time_stamp=False)
    results = await p.run(make_pool(1))
    assert results.files is not None
    before = results.files.results.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        await pipeline(project, server, need_time_stamp=False).run(make_pool(1))
    assert results.files.results.read_bytes() == before


async def test_two_runs_in_one_second_get_separate_files(project: Path,
                                                         server: FakeOpenAIServer) -> None:
    p1, p2 = pipeline(project, server), pipeline(project, server)
    r1 = await p1.run(make_pool(1))
    r2 = await p2.run(make_pool(1))
    assert r1.files != r2.files


async def test_plain_progress_when_not_a_terminal(project: Path, server: FakeOpenAIServer,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    await pipeline(project, server).run(make_pool(3), progress=True)
    err = capsys.readouterr().err
    assert "datagen demo: started, 3 items" in err
    assert "3/3 items, 3 done, 0 failed" in err
    await pipeline(project, server).run(make_pool(3), progress=False)
    assert capsys.readouterr().err == ""


def test_run_sync(project: Path, server: FakeOpenAIServer) -> None:
    assert len(pipeline(project, server).run_sync(make_pool(2))) == 2


async def test_no_system_prompt(tmp_path: Path, server: FakeOpenAIServer) -> None:
    cfg = write_project(tmp_path, system=None)
    p = DataGenerationPipeline(config=cfg, base_url=server.base_url)
    await p.run(make_pool(1, tone=False))
    assert [m["role"] for m in server.bodies[0]["messages"]] == ["user"]


async def test_both_extractor_arguments_is_an_error(project: Path,
                                                    server: FakeOpenAIServer) -> None:
    with pytest.raises(ConfigError, match="either extract_function or parse_response"):
        await pipeline(project, server).run(make_pool(1), extract_function=str,
                                            parse_response=str)


async def test_stream_yields_records_as_they_are_written(project: Path,
                                                         server: FakeOpenAIServer) -> None:
    p = pipeline(project, server)
    seen = []
    stream = p.stream(make_pool(30), concurrency_limit=4)
    async for record in stream:
        assert stream.files is not None
        on_disk = stream.files.results.read_bytes().count(b"\n")
        assert on_disk >= len(seen) + 1  # it was written before it was yielded
        seen.append(record["index"])
    assert sorted(seen) == list(range(30))


async def test_breaking_out_of_a_stream_stops_the_run(project: Path,
                                                      server: FakeOpenAIServer) -> None:
    server.latency = 0.05
    p = pipeline(project, server)
    stream = p.stream(make_pool(200), concurrency_limit=2)
    async for _ in stream:
        break
    await stream.aclose()
    assert stream.files is not None
    assert server.request_count < 20
    manifest = json.loads(stream.files.manifest.read_text())
    assert manifest["status"] == "interrupted"
    rest = await pipeline(project, server).run(make_pool(200), resume=True)
    assert len(rest) + manifest["counts"]["succeeded"] == 200


async def test_on_record_callback(project: Path, server: FakeOpenAIServer) -> None:
    got: list[int] = []

    async def keep(record: dict[str, Any]) -> None:
        got.append(record["index"])

    await pipeline(project, server).run(make_pool(5), on_record=keep)
    assert sorted(got) == [0, 1, 2, 3, 4]


async def test_leaving_a_stream_with_a_full_queue_does_not_hang(
    project: Path, server: FakeOpenAIServer
) -> None:
    p = pipeline(project, server)
    stream = p.stream(make_pool(100), concurrency_limit=8)
    first = await stream.__anext__()
    await asyncio.sleep(0.3)  # the workers fill the queue (2 x 8) and block on it
    await asyncio.wait_for(stream.aclose(), 5)
    assert first["index"] >= 0
