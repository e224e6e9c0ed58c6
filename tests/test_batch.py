"""Batch mode (issue: half-price runs through provider batch APIs, exactly once): the
same records as online, only what is missing sent again, mixed pipelines, the cache, the
commands, the cost. Kill -9 in every phase is tests/test_batch_kills.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

from datagen import DataGenerationPipeline, extract
from datagen.cli import main
from datagen.config import ModelConfig
from datagen.costs import batch_prices_for
from datagen.engine import RunInterrupted
from datagen.errors import ConfigError
from datagen.report import report_data, write_report
from datagen.testing import FakeBatchServer, FakeOpenAIServer, FakeReply
from datagen.testing.fake_server import last_user_message

FAST = "  batch: true\n  batch_poll_interval: 0.02\n  batch_poll_max: 0.1\n"
DRAFT = extract.tag("draft")


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def paid_once(server: FakeBatchServer) -> dict[str, Any]:
    """The server's proof that nothing was submitted or answered twice."""
    stats = server.stats()
    assert stats["submitted_twice"] == [] and stats["succeeded_twice"] == []
    assert stats["bodies_succeeded_twice"] == []
    return stats


def batch_pipe(tmp_path: Path, server: Any, **overrides: Any) -> DataGenerationPipeline:
    config = write_project(tmp_path, extra_yaml=FAST)
    return DataGenerationPipeline(config=config, base_url=server.base_url,
                                  **{"model": "gpt-4o-mini", **overrides})


@pytest.fixture
def server() -> Iterator[FakeBatchServer]:
    with FakeBatchServer(responder=topic_draft) as running:
        yield running


# ---- the same run, at half the price ---------------------------------------------------


def test_a_batch_run_writes_what_the_online_run_writes(tmp_path: Path,
                                                      server: FakeBatchServer) -> None:
    result = batch_pipe(tmp_path / "b", server).run_sync(make_pool(12),
                                                         extract_function=DRAFT)
    with FakeOpenAIServer(responder=topic_draft) as online_server:
        config = write_project(tmp_path / "o")
        online = DataGenerationPipeline(config=config, base_url=online_server.base_url,
                                        model="gpt-4o-mini").run_sync(
            make_pool(12), extract_function=DRAFT)
    assert result.status == "completed"
    shape = {(r["key"], r["output"], r["raw_response"]) for r in online}
    assert {(r["key"], r["output"], r["raw_response"]) for r in result} == shape
    assert set(lines(result.files.results)[0]) == set(lines(online.files.results)[0])
    stats = paid_once(server)
    assert stats["batches_created"] == 1 and stats["requests_submitted"] == 12
    assert stats["requests"] == 0 or server.request_count == stats["requests"]
    section = result.manifest["batches"]
    (batch,) = section["batches"]
    assert batch["requests"] == batch["completed"] == 12 and batch["status"] == "completed"
    assert section["totals"]["requests"] == 12
    cost = section["cost"]  # gpt-4o-mini: litellm lists its batch price
    assert cost["batch_usd"] == pytest.approx(cost["online_usd"] / 2)
    assert result.manifest["cost_usd"] == pytest.approx(cost["batch_usd"], abs=1e-6)
    assert section["summary"].startswith("12 requests in 1 batch(es), $")
    assert "online it would have cost $" in section["summary"]
    assert any("12 requests were sent in 1 batch" in x for x in section["explanation"])
    shown = report_data(result.files.results)["batches"]  # datagen report: per batch
    assert shown["rows"][0][1] == batch["id"] and shown["rows"][0][4:6] == [12, 12]
    assert "batch-table" in write_report(result.files.results).read_text()
    # nothing left behind: the request file, the provider's copies of every file
    assert not list(result.files.batch_dir.glob("*.jsonl"))
    assert server.book.files == {}


def test_requests_that_errored_are_sent_again_alone(tmp_path: Path) -> None:
    with FakeBatchServer(responder=topic_draft, error_rate=0.1, seed=7) as server:
        result = batch_pipe(tmp_path, server, max_retries=3).run_sync(
            make_pool(60), extract_function=DRAFT)
        stats = paid_once(server)
    assert result.status == "completed" and len(result) == 60
    first_errors = result.manifest["batches"]["batches"][0]["failed"]
    assert 2 <= first_errors <= 15
    second = result.manifest["batches"]["batches"][1]
    assert second["requests"] == first_errors  # only what was missing
    assert stats["requests_succeeded"] == 60
    assert stats["requests_submitted"] == 60 + stats["requests_errored"]
    totals = result.manifest["batches"]["totals"]
    assert totals["sent_again"] == stats["requests_errored"]
    assert totals["completed"] == 60 and totals["failed_for_good"] == 0


def test_an_expired_batch_is_completed_by_sending_only_what_is_missing(
        tmp_path: Path) -> None:
    with FakeBatchServer(responder=topic_draft, completion_delay=100,
                         expire_after=50) as server:
        pipe = batch_pipe(tmp_path, server)

        async def run() -> Any:
            task = asyncio.ensure_future(pipe.run(make_pool(40), extract_function=DRAFT))
            for _ in range(500):  # the first batch expires half done; the rest finish
                await asyncio.sleep(0.02)
                batches = server.stats()["batches"]
                if len(batches) == 1 and "expired" not in batches.values():
                    server.advance(60)
                elif len(batches) > 1:
                    server.completion_delay = 0
                    server.expire_after = None
                    for batch_id, status in batches.items():
                        if status == "in_progress":
                            server.finish(batch_id)
                if task.done():
                    break
            return await task

        result = asyncio.run(run())
        stats = paid_once(server)
    assert result.status == "completed" and len(result) == 40
    first, second = result.manifest["batches"]["batches"]
    assert first["status"] == "expired" and first["completed"] == 20
    assert first["expired"] == 20 and second["requests"] == 20
    assert stats["requests_succeeded"] == 40 and stats["requests_expired"] == 20


def test_a_4xx_inside_a_batch_fails_its_item_as_online(tmp_path: Path) -> None:
    def refuse(custom_id: str, body: dict[str, Any]) -> FakeReply | None:
        if "topic 3 " in last_user_message(body):
            return FakeReply(status=400, body={"error": {
                "message": "Invalid content", "type": "invalid_request_error"}})
        return None

    with FakeBatchServer(responder=topic_draft, error_for=refuse) as server:
        result = batch_pipe(tmp_path, server, max_retries=3).run_sync(
            make_pool(6), extract_function=DRAFT)
        # resumed, the failed item is tried again: the ledger holds the same 400
        again = batch_pipe(tmp_path, server, max_retries=3).run_sync(
            make_pool(6), extract_function=DRAFT, resume=True)
        stats = paid_once(server)
    assert stats["batches_created"] == 1  # a 4xx is not sent again
    (failure,) = lines(result.files.failures)  # and not written twice
    assert failure["index"] == 3
    assert failure["error"]["kind"] == "bad_request" and "Invalid content" in \
        failure["error"]["message"]
    assert result.manifest["batches"]["totals"]["failed_for_good"] == 1
    assert again.counts["failed"] == 1 and again.counts["skipped_done"] == 5
    assert any("not written twice" in x for x in again.manifest["batches"]["explanation"])


def test_anthropic_message_batches(tmp_path: Path) -> None:
    with FakeBatchServer(responder=topic_draft, error_rate=0.2, seed=3) as server:
        result = batch_pipe(tmp_path, server, provider="anthropic",
                            model="claude-sonnet-4-5", max_retries=3).run_sync(
            make_pool(25), extract_function=DRAFT)
        stats = paid_once(server)
    assert result.status == "completed" and len(result) == 25
    assert all(r["output"] == r["user_prompt_kwargs"]["topic"].capitalize()
               + " is a subject worth study." for r in result)
    assert stats["files_uploaded"] == 0 and stats["batches_created"] >= 2
    assert stats["requests_succeeded"] == 25
    assert all(b["api"] == "anthropic" for b in result.manifest["batches"]["batches"])


def test_request_files_are_split_at_the_limits(tmp_path: Path,
                                               server: FakeBatchServer) -> None:
    result = batch_pipe(tmp_path, server, batch_max_requests=7).run_sync(
        make_pool(20), extract_function=DRAFT)
    assert len(result) == 20
    assert [b["requests"] for b in result.manifest["batches"]["batches"]] == [7, 7, 6]
    paid_once(server)


# ---- pipelines: mixed, retries, fan-out, generators -------------------------------------


def ideas_reply(body: dict[str, Any]) -> str:
    text = last_user_message(body)
    if text.startswith("List ideas"):
        topic = text.split("about ")[1].split(".")[0]
        if topic.endswith("3") and "Fix" not in text:
            return "no list here"
        return f"<ideas>{topic} A|{topic} B</ideas>"
    if text.startswith("Expand"):
        return f"<x>expanded {text.removeprefix('Expand ')}</x>"
    return "<x>good</x>"


def ideas_project(root: Path) -> Path:
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "ideas.txt").write_text(
        "List ideas about {{ topic }}.{% if error_message %} Fix: {{ error_message }}"
        "{% endif %}\n")
    (root / "prompts" / "expand.txt").write_text("Expand {{ ideas }}\n")
    (root / "prompts" / "judge.txt").write_text("Judge {{ expand }}\n")
    (root / "config.yaml").write_text(
        "model:\n  provider: openai\n  model: gpt-4o-mini\n  max_tokens: 64\n"
        f"output_data:\n  output_dir: {root / 'output'}\n  experiment_name: ideas\n"
        "run:\n  progress: false\n  batch_poll_interval: 0.02\n  batch_poll_max: 0.1\n")
    return root / "config.yaml"


def split_ideas(text: str) -> list[str]:
    return str(extract.tag("ideas")(text)).split("|")


def ideas_pipeline(config: Path, base_url: str, batch: tuple[bool, bool, bool]
                   ) -> DataGenerationPipeline:
    p = DataGenerationPipeline(config=config, base_url=base_url)
    p.step("ideas", "ideas.txt", extract=split_ideas, one_to_many=True, batch=batch[0])
    p.step("expand", "expand.txt", extract=extract.tag("x"), batch=batch[1])
    p.step("judge", "judge.txt", extract=extract.tag("x"), batch=batch[2])
    return p


def test_a_mixed_multi_step_pipeline_runs_in_rounds(tmp_path: Path) -> None:
    config = ideas_project(tmp_path)
    with FakeBatchServer(responder=ideas_reply) as server:
        pipe = ideas_pipeline(config, server.base_url, (True, False, True))

        def pool() -> Iterator[dict[str, str]]:  # a generator: spilled, read each round
            yield from ({"topic": f"topic {i}"} for i in range(8))

        result = pipe.run_sync(pool())
        stats = paid_once(server)
        online_calls = server.request_count
        # the same requests online: every one answered before, nothing is paid again
        again = ideas_pipeline(config, server.base_url, (False, False, False))
        rerun = again.run_sync([{"topic": f"topic {i}"} for i in range(8)],
                               resume=False)
        # only the answer validation rejected (never kept, as online) is asked again
        assert server.request_count - online_calls == 1
    assert result.status == "completed" and len(result) == 16
    records = lines(result.files.results)
    assert len({r["key"] for r in records}) == 16
    assert {r["output"] for r in records} == {"good"}
    # ideas: 8 + 1 validation retry; judge: 16 (two per item); expand went online
    assert stats["requests_submitted"] == 25 and online_calls == 16
    steps = result.manifest["steps"]
    assert steps["ideas"] == {"done": 8, "validation_retries": 1, "failed": 0, "dropped": 0}
    assert steps["expand"]["done"] == steps["judge"]["done"] == 16
    assert result.manifest["batches"]["answers_by_step"] == {"ideas": 9, "judge": 16}
    assert [r["output"] for r in rerun] == [r["output"] for r in result]


def test_a_provider_without_a_batch_api_fails_before_anything_is_uploaded(
        tmp_path: Path, server: FakeBatchServer) -> None:
    pipe = batch_pipe(tmp_path, server, provider="deepseek")
    with pytest.raises(ConfigError, match="has none datagen can use"):
        pipe.run_sync(make_pool(3), extract_function=DRAFT)
    assert server.stats()["files_uploaded"] == 0 and server.request_count == 0
    assert not (tmp_path / "output").exists() or not list(
        (tmp_path / "output").glob("*.jsonl"))


def test_batch_prices_map_then_discount_then_config() -> None:
    mapped, source = batch_prices_for(ModelConfig(provider="openai", model="gpt-4o-mini"))
    assert mapped == pytest.approx((7.5e-08, 3e-07)) and "litellm" in source
    half, source = batch_prices_for(ModelConfig(
        provider="openai", model="mine", input_cost_per_million=2,
        output_cost_per_million=8))
    assert half == pytest.approx((1e-6, 4e-6)) and "half" in source
    own, source = batch_prices_for(ModelConfig(
        provider="openai", model="gpt-4o-mini", batch_input_cost_per_million=1))
    assert own == pytest.approx((1e-6, 0.0)) and source == "config"


# ---- status, cancel, resume on another day ------------------------------------------------


def run_in_thread(pipe: DataGenerationPipeline, pool: list[Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {}

    def go() -> None:
        try:
            outcome["result"] = pipe.run_sync(pool, extract_function=DRAFT)
        except BaseException as exc:  # RunInterrupted is a KeyboardInterrupt
            outcome["error"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    outcome["thread"] = thread
    return outcome


def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_status_and_cancel_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    with FakeBatchServer(responder=topic_draft, completion_delay=1000) as server:
        pipe = batch_pipe(tmp_path, server)
        running = run_in_thread(pipe, make_pool(10))
        wait_until(lambda: server.stats()["polls"] >= 2)
        server.advance(500)  # half of it answered
        assert main(["status", str(tmp_path / "output")]) == 0
        shown = capsys.readouterr().out
        assert "in_progress" in shown and "a run is waiting on them" in shown
        row = next(x for x in shown.splitlines() if x.strip().startswith("1 "))
        assert row.split()[4:7] == ["10", "5", "0"], row  # requests, completed, failed
        assert main(["cancel", str(tmp_path / "output")]) == 0
        assert "cancelling" in capsys.readouterr().out
        running["thread"].join(30)
        stopped = running["error"]
        assert isinstance(stopped, RunInterrupted)
        assert stopped.result.manifest["status"] == "interrupted"
        assert stopped.result.manifest["error"]["kind"] == "cancelled"
        server.completion_delay = 0
        done = batch_pipe(tmp_path, server).run_sync(make_pool(10), resume=True,
                                                     extract_function=DRAFT)
        stats = paid_once(server)
    assert done.status == "completed" and len(lines(done.files.results)) == 10
    first, second = done.manifest["batches"]["batches"]
    assert first["status"] == "cancelled" and first["completed"] == 5
    assert first["cancelled"] == 5 and second["requests"] == 5
    assert stats["requests_succeeded"] == 10
    assert main(["status", str(done.files.results), "--offline"]) == 0
    assert "totals: 15 requests, 10 completed" in capsys.readouterr().out


def test_resuming_a_batch_run_online_with_open_batches_is_refused(tmp_path: Path) -> None:
    with FakeBatchServer(responder=topic_draft, completion_delay=1000) as server:
        pipe = batch_pipe(tmp_path, server, batch_max_wait_hours=0.0001)
        with pytest.raises(Exception, match="still open after"):
            pipe.run_sync(make_pool(4), extract_function=DRAFT)
        online = batch_pipe(tmp_path, server, batch=False)
        with pytest.raises(ConfigError, match="still open at the provider"):
            online.run_sync(make_pool(4), extract_function=DRAFT, resume=True)
        assert server.stats()["batches_created"] == 1 and server.request_count == 0


def test_ctrl_c_while_waiting_leaves_the_batch_running_and_resume_collects_it(
        tmp_path: Path) -> None:
    with FakeBatchServer(responder=topic_draft, completion_delay=1000) as server:
        pipe = batch_pipe(tmp_path, server)
        timer = threading.Thread(target=lambda: (
            wait_until(lambda: server.stats()["polls"] >= 2),
            os.kill(os.getpid(), signal.SIGINT)))
        timer.start()
        with pytest.raises(RunInterrupted) as stopped:
            pipe.run_sync(make_pool(8), extract_function=DRAFT)
        timer.join()
        assert stopped.value.result.manifest["status"] == "interrupted"
        assert server.stats()["batches"] == {
            stopped.value.result.manifest["batches"]["batches"][0]["id"]: "in_progress"}
        server.advance(1000)
        done = batch_pipe(tmp_path, server).run_sync(make_pool(8), resume=True,
                                                     extract_function=DRAFT)
        stats = paid_once(server)
    assert len(lines(done.files.results)) == 8 and stats["batches_created"] == 1
    assert stats["bodies_submitted_twice"] == []


def test_datagen_run_batch_on_the_command_line(tmp_path: Path, server: FakeBatchServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "five_topics"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "five_topics",
                    folder)
    code = main(["run", str(folder), "--batch", "--set", f"base_url={server.base_url}",
                 "--set", "batch_poll_interval=0.02", "--output", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "(5 records)" in capsys.readouterr().out
    stats = paid_once(server)
    assert stats["batches_created"] == 1 and stats["requests_submitted"] == 5
    assert main(["status", str(tmp_path / "out"), "--offline"]) == 0
    assert "completed" in capsys.readouterr().out
