"""Nothing lost, nothing paid twice: resume, torn lines, the response cache, rate limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft

from datagen import DataGenerationPipeline, extract
from datagen.llm import caller
from datagen.manifest import ResumeError
from datagen.testing import FakeOpenAIServer, FakeReply


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def pipe(project: Path, server: FakeOpenAIServer, **kw: Any) -> DataGenerationPipeline:
    return DataGenerationPipeline(config=project, base_url=server.base_url, **kw)


async def test_resume_sends_only_what_is_missing(project: Path,
                                                 server: FakeOpenAIServer) -> None:
    first = pipe(project, server, cache=False)
    first_result = await first.run(make_pool(10))
    assert server.request_count == 10
    pool = make_pool(15)[::-1]  # reordered and grown: keys are content, not positions
    second = pipe(project, server, cache=False)
    results = await second.run(pool, resume=True)
    assert results.files == first_result.files  # same files, appended
    assert server.request_count == 15  # only the 5 new items were sent
    assert len(results) == 5
    records = lines(first_result.files.results)
    assert len(records) == 15 and len({r["key"] for r in records}) == 15
    manifest = json.loads(first_result.files.manifest.read_text())
    assert manifest["counts"]["skipped_done"] == 10 and manifest["resumed"] is True
    assert manifest["counts"]["results_in_file"] == 15


async def test_resume_retries_failed_items(project: Path) -> None:
    calls = {"n": 0}

    def fails_first_time(body: dict[str, Any]) -> Any:
        calls["n"] += 1
        return FakeReply(status=400) if calls["n"] <= 2 else topic_draft(body)

    with FakeOpenAIServer(responder=fails_first_time) as server:
        p = pipe(project, server, cache=False)
        result = await p.run(make_pool(2), concurrency_limit=1)
        assert result == []
        assert len(lines(result.files.failures)) == 2
        again = await pipe(project, server, cache=False).run(make_pool(2), resume=True)
        assert len(again) == 2


async def test_resume_with_nothing_to_resume_starts_a_run(project: Path,
                                                          server: FakeOpenAIServer) -> None:
    assert len(await pipe(project, server).run(make_pool(2), resume=True)) == 2


async def test_torn_last_line_is_cut_not_parsed(project: Path, server: FakeOpenAIServer) -> None:
    p = pipe(project, server, cache=False)
    results = (await p.run(make_pool(4))).files.results
    whole = results.read_bytes()
    last_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    results.write_bytes(whole[: last_start + 25])  # a crash in the middle of the last write
    await pipe(project, server, cache=False).run(make_pool(4), resume=True)
    records = lines(results)  # every line parses
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]
    # only the torn item was redone, from the answer the run kept: with the cache off a
    # run still keeps its own paid answers for its resume (issue 12.8: never paid twice)
    assert server.request_count == 4


async def test_resume_after_template_change_is_refused(project: Path,
                                                       server: FakeOpenAIServer) -> None:
    await pipe(project, server).run(make_pool(2))
    (project.parent / "prompts" / "user.txt").write_text("Tell me about {{ topic }}, "
                                                         "{{ word_count }}.\n")
    with pytest.raises(ResumeError, match=r"(?s)template user changed.*resume='force'"):
        await pipe(project, server).run(make_pool(2), resume=True)
    with pytest.raises(ResumeError, match=r"temperature: 0\.0 -> 0\.5"):
        await pipe(project, server, temperature=0.5).run(make_pool(2), resume=True)
    with pytest.raises(ResumeError, match=r"extractor: raw -> tag\(draft\)"):
        await pipe(project, server).run(make_pool(2), resume=True,
                                        extract_function=extract.tag("draft"))
    forced = await pipe(project, server).run(make_pool(3), resume="force")
    assert [r["index"] for r in forced] == [2]  # done items are kept, the new one appended


async def test_cache_answers_a_repeated_request_without_sending(
    project: Path, server: FakeOpenAIServer
) -> None:
    first = await pipe(project, server).run(make_pool(6))
    assert server.request_count == 6
    p = pipe(project, server, experiment_name="again")
    second = await p.run(make_pool(6))
    assert server.request_count == 6  # all six from the cache
    assert [r["raw_response"] for r in second] == [r["raw_response"] for r in first]
    assert all(r["cached"] and r["attempts"] == 0 for r in second)
    manifest = json.loads(second.files.manifest.read_text())
    assert manifest["calls"]["cache_hits"] == 6 and manifest["calls"]["requests"] == 0


async def test_cache_key_covers_the_system_prompt(project: Path,
                                                  server: FakeOpenAIServer) -> None:
    await pipe(project, server).run(make_pool(1))
    pool = make_pool(1)
    pool[0]["system_prompt_kwargs"] = {"tone": "formal"}  # only the system prompt differs
    await pipe(project, server, experiment_name="formal").run(pool)
    assert server.request_count == 2


async def test_cache_off_and_salt_send_again(project: Path, server: FakeOpenAIServer) -> None:
    await pipe(project, server).run(make_pool(2))
    await pipe(project, server, experiment_name="b", cache=False).run(make_pool(2))
    assert server.request_count == 4
    await pipe(project, server, experiment_name="c", cache_salt="fresh").run(make_pool(2))
    assert server.request_count == 6


async def test_repeated_items_are_distinct_samples(project: Path,
                                                   server: FakeOpenAIServer) -> None:
    p = pipe(project, server)
    results = await p.run(make_pool(1) * 3)
    assert len(results) == 3 and len({r["key"] for r in results}) == 3
    assert server.request_count == 3
    # resume knows all three are done
    await pipe(project, server).run(make_pool(1) * 3, resume=True)
    assert server.request_count == 3


async def test_cache_survives_a_kill_between_response_and_record(
    project: Path, server: FakeOpenAIServer
) -> None:
    def explode(text: str) -> str:
        raise RuntimeError("extractor bug")

    p = pipe(project, server)
    await p.run(make_pool(3), extract_function=explode)  # responses paid, records failed
    # a renamed extractor changes the fingerprint: resuming needs "force"
    fixed = await pipe(project, server).run(make_pool(3), resume="force",
                                            extract_function=lambda t: t.upper())
    assert len(fixed) == 3 and server.request_count == 3  # all three from the cache


async def test_requests_per_minute_cap(project: Path, server: FakeOpenAIServer) -> None:
    await pipe(project, server, requests_per_minute=600, cache=False).run(
        make_pool(25), concurrency_limit=16)
    assert server.max_in_window(1.0) <= 10


async def test_tokens_per_minute_cap_paces_requests(project: Path,
                                                    server: FakeOpenAIServer) -> None:
    # ~90 tokens per request estimated (prompt + 4/message + max_tokens 64); 12000 tpm is
    # 200 tokens/s, so 6 requests cannot all go in the same second
    p = pipe(project, server, tokens_per_minute=12000, max_tokens=64, cache=False)
    await p.run(make_pool(6), concurrency_limit=6)
    assert server.request_count == 6
    assert server.max_in_window(1.0) < 6




async def test_resume_from_the_constructor_and_config(project: Path,
                                                      server: FakeOpenAIServer) -> None:
    await pipe(project, server).run(make_pool(3))
    await pipe(project, server, resume=True).run(make_pool(4))  # constructor keyword
    assert server.request_count == 4
    project.write_text(project.read_text().replace("run:\n", "run:\n  resume: true\n"))
    await pipe(project, server).run(make_pool(5))  # config.yaml
    assert server.request_count == 5


def test_two_runs_opening_one_new_cache_at_once_both_open(tmp_path: Path) -> None:
    """Two runs sharing an output folder open its cache together (two pipelines of one
    process, or two processes): SQLite's switch to WAL answered 'database is locked' at
    once to one of them (about 1 in 30 here), which failed before sending anything."""
    import random
    import threading
    import time

    from datagen.llm.cache import ResponseCache

    errors: list[BaseException] = []
    for attempt in range(150):  # a fresh file each time: the race is at its creation
        path = tmp_path / f"c{attempt}" / ".datagen_cache.sqlite"
        start = threading.Barrier(2)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            try:
                start.wait()
                time.sleep(random.random() * 0.003)
                cache = ResponseCache(path)
                time.sleep(0.005)
                cache.close()
            except BaseException as exc:  # collected for the assert
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
