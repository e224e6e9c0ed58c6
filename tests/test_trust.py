"""Issue 12: one writer per run, answers that cannot be read, credentials kept out of
every file, user code that hangs, signals, a full disk, items that would corrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft

from benchmarks._project import draft_reply, make_project, write_pool
from datagen import DataGenerationPipeline, extract
from datagen.errors import DataPoolError
from datagen.llm import caller
from datagen.testing import FakeOpenAIServer, FakeReply
from datagen.testing.fake_server import last_user_message

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


RUN = """
import sys
from datagen import DataGenerationPipeline, extract
p = DataGenerationPipeline(config=sys.argv[1], progress=False)
p.run_sync(sys.argv[2], concurrency_limit=4, resume=True, extract_function=extract.tag("draft"))
"""


def start(config: Path, pool: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", RUN, str(config), str(pool)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def results_of(output: Path) -> Path:
    (path,) = [p for p in output.glob("bench_*.jsonl")
               if not p.stem.endswith(("_failures", "_dropped", "_meta"))]
    return path


def wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ---- 1. one writer per run ---------------------------------------------------------------

def test_two_processes_resuming_one_run_one_proceeds_the_other_is_refused(
        tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=draft_reply, latency=0.2) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 40)
        first = start(config, pool)
        wait_for(lambda: (tmp_path / "output").exists() and any(
            p.stat().st_size for p in (tmp_path / "output").glob("bench_*.jsonl")))
        second = start(config, pool)  # resume=True while the first is alive
        _, err = second.communicate(timeout=60)
        assert second.returncode != 0
        text = err.decode()
        assert "is being written by another process" in text
        assert f"pid {first.pid}" in text, text[-2000:]
        first.communicate(timeout=120)
        assert first.returncode == 0
        records = lines(results_of(tmp_path / "output"))
        assert len(records) == 40 and len({r["key"] for r in records}) == 40
        assert server.request_count == 40  # the refused one sent nothing


def test_a_lock_left_by_a_killed_run_is_not_a_live_writer(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=draft_reply, latency=0.3) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 30)
        first = start(config, pool)
        wait_for(lambda: (tmp_path / "output").exists() and any(
            p.stat().st_size for p in (tmp_path / "output").glob("bench_*.jsonl")))
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert list((tmp_path / "output").glob("*.lock"))  # the file stays: not the lock
        again = start(config, pool)
        again.communicate(timeout=120)
        assert again.returncode == 0
        records = lines(results_of(tmp_path / "output"))
        assert len(records) == 30 and len({r["key"] for r in records}) == 30


# ---- 2. answers that cannot be read ------------------------------------------------------

MALFORMED: dict[str, Any] = {
    "topic 1": {"choices": ["hello"]},
    "topic 2": {"choices": [{"message": "hello"}]},
    "topic 3": {"choices": [{"message": {"content": "<draft>x</draft>"}}], "usage": [1]},
    "topic 4": {"choices": [{"message": {"content": "<draft>x</draft>"}}],
                "usage": {"prompt_tokens": "n/a", "completion_tokens": 1}},
    "topic 5": {"error": {"message": "upstream is overloaded", "type": "server_error"}},
    "topic 6": b'{"choices": [{"mess',
}


def malformed_server(body: dict[str, Any]) -> Any:
    topic = last_user_message(body).removeprefix("Write about ").split(" in about")[0]
    shape = MALFORMED.get(topic)
    return FakeReply(body=shape) if shape is not None else topic_draft(body)


@pytest.mark.parametrize("transport", ["openai", "litellm"])
def test_answers_that_cannot_be_read_fail_their_item_only(project: Path, transport: str
                                                          ) -> None:
    with FakeOpenAIServer(responder=malformed_server) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url,
                                   transport=transport, max_retries=1, cache=False)
        result = p.run_sync(make_pool(10), concurrency_limit=4,
                            extract_function=extract.tag("draft"))
    assert result.status == "completed"
    assert sorted(r["index"] for r in result) == [0, 7, 8, 9]
    failures = {f["index"]: f["error"] for f in lines(result.files.failures)}
    assert sorted(failures) == [1, 2, 3, 4, 5, 6]
    for index in (1, 2, 3, 4):
        assert failures[index]["kind"] == "malformed_response", failures[index]
        assert failures[index]["attempts"] == 2 and failures[index]["message"]
    assert failures[5]["kind"] == "bad_request"  # an error in a 200 (no status in it)
    assert failures[6]["kind"] == "server_error"  # not JSON at all


# ---- 3. credentials never reach a file, a log or the terminal ---------------------------

CANARIES = {
    "main": "sk-canary-MAIN-0001112223",
    "named": "sk-canary-NAMED-4445556667",
    "extra": "canary-EXTRA-token-7778889990",
    "query": "canaryQUERYkey1234567",
    "header": "canary-HEADER-value-55566677",
}


def echo_credentials(body: dict[str, Any], headers: dict[str, str]) -> str:
    return "<draft>" + json.dumps(headers) + json.dumps(body) + "</draft>"


def test_canary_keys_appear_in_no_file_and_no_output(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    class Server(FakeOpenAIServer):
        def gate(self, body: dict[str, Any], headers: Any) -> FakeReply | None:
            seen.append(dict(headers))
            if body.get("model") == "named-model":  # a 401 that echoes everything it got
                return FakeReply(status=401, body={"error": {"message": "bad key: " + str(
                    dict(headers)) + " " + json.dumps(body), "type": "authentication_error"}})
            return None

    with Server(responder=lambda b: "<draft>" + json.dumps(seen[-1]) + json.dumps(b)
                + "</draft>") as server:
        folder = tmp_path / "pipe"
        (folder / "prompts").mkdir(parents=True)
        (folder / "prompts" / "a.txt").write_text("Say {{ text }}")
        (folder / "config.yaml").write_text(f"""
model:
  provider: openai
  model: main-model
  api_key: {CANARIES['main']}
  base_url: {server.base_url}?key={CANARIES['query']}
  headers: {{X-Custom-Auth: {CANARIES['header']}}}
  extra_params: {{user_api_token: {CANARIES['extra']}}}
  max_retries: 0
models:
  named:
    model: named-model
    api_key: {CANARIES['named']}
output_data: {{output_dir: {tmp_path / 'out'}, experiment_name: canary}}
run: {{debug: true, meta_datagen: true, progress: false}}
""")
        (folder / "pipeline.py").write_text(
            "def build(pipeline):\n"
            "    pipeline.step('a', prompt='a.txt')\n"
            "    return pipeline.step('b', prompt='a.txt', model='named')\n"
            "def data_pool(pipeline):\n"
            "    return [{'text': 'hello'}, {'text': 'world'}]\n")
        cli = [sys.executable, "-m", "datagen.cli", "run", str(folder)]
        done = subprocess.run(cli, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2, done.stderr  # the 401 stops the run
    assert any(CANARIES["main"] in str(h) for h in seen)  # the keys were really sent
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) >= 5
    for canary in CANARIES.values():
        for path in written:
            assert canary.encode() not in path.read_bytes(), (canary, path)
        assert canary not in done.stdout and canary not in done.stderr, canary


# ---- 5, 6, 7. user code, signals, a day-long Retry-After --------------------------------

def test_user_code_that_blocks_or_hangs_fails_its_item_by_name(project: Path,
                                                               server: FakeOpenAIServer
                                                               ) -> None:
    def blocking(text: str) -> str:
        if "Topic 1 " in text:
            time.sleep(30)
        return text

    async def hanging(text: str, item: Any) -> bool:
        import asyncio

        if "Topic 2 " in text:
            await asyncio.sleep(30)
        return True

    p = (DataGenerationPipeline(config=None, base_url=server.base_url, model="m",
                                output_dir=str(project.parent / "out"), progress=False,
                                user_code_timeout=0.5)
         .step("draft", prompt=project.parent / "prompts" / "user.txt", extract=blocking,
               validate=hanging, max_retries=0))
    started = time.monotonic()
    records = [{"topic": f"topic {i}", "word_count": "1 word"} for i in range(4)]
    result = p.run_sync(records, concurrency_limit=4)
    assert time.monotonic() - started < 10
    assert sorted(r["index"] for r in result) == [0, 3]
    errors = {f["index"]: f["error"] for f in lines(result.files.failures)}
    assert errors[1]["kind"] == "extraction" and "did not return within 0.5 s" in \
        errors[1]["message"] and errors[1]["function"].endswith("blocking")
    assert errors[2]["kind"] == "validation" and errors[2]["function"].endswith("hanging")


def test_on_record_that_raises_does_not_stop_the_run(project: Path,
                                                     server: FakeOpenAIServer) -> None:
    def broken(record: dict[str, Any]) -> None:
        raise RuntimeError("my database is down")

    p = DataGenerationPipeline(config=project, base_url=server.base_url)
    result = p.run_sync(make_pool(3), on_record=broken)
    assert len(result) == 3 and result.status == "completed"
    assert result.manifest["callbacks"]["on_record_errors"] == 3


SLOW_EXTRACTOR = """
import sys, time
from datagen import DataGenerationPipeline
def stuck(text):
    time.sleep(3600)
p = DataGenerationPipeline(config=sys.argv[1], progress=False, shutdown_timeout=1)
p.run_sync(sys.argv[2], concurrency_limit=2, extract_function=stuck)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_run_whose_extractor_blocks(tmp_path: Path, sig: int) -> None:
    with FakeOpenAIServer(responder=draft_reply) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 10)
        proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACTOR, str(config), str(pool)],
                                env=ENV, stderr=subprocess.PIPE)
        wait_for(lambda: server.request_count >= 2)
        time.sleep(0.3)
        proc.send_signal(sig)
        try:
            proc.communicate(timeout=20)  # the extractor sleeps an hour: it must not matter
        finally:
            proc.kill()
        manifest = json.loads(next((tmp_path / "output").glob("*_manifest.json")).read_text())
        assert manifest["status"] == "interrupted"


def test_sigterm_through_the_cli_exits_143(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=draft_reply, latency=0.5) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 40)
        proc = subprocess.Popen([sys.executable, "-m", "datagen.cli", "run", str(config),
                                 "--pool", str(pool), "--no-progress"], env=ENV,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: server.request_count >= 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert "--resume" in err and "records in" in err
        manifest = json.loads(next((tmp_path / "output").glob("*_manifest.json")).read_text())
        assert manifest["status"] == "interrupted"


def test_a_day_long_retry_after_is_capped_and_said(project: Path, tmp_path: Path) -> None:
    calls: list[float] = []

    def day(body: dict[str, Any]) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return FakeReply(status=429, headers={"Retry-After": "86400"})
        return topic_draft(body)

    with FakeOpenAIServer(responder=day) as server:
        p = DataGenerationPipeline(config=project, base_url=server.base_url, max_retry_after=1,
                                   max_retries=1)
        result = p.run_sync(make_pool(1))
    assert len(result) == 1 and 0.9 < calls[1] - calls[0] < 5
    log = result.files.log.read_text()
    assert "asked for a pause of 86400 s" in log and "model.max_retry_after" in log
    assert "every request waits" in log and "until" in log


# ---- 8. a full disk ---------------------------------------------------------------------

def test_a_write_error_stops_the_run_names_the_file_and_nothing_paid_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    import errno

    from datagen.cli import main
    from datagen.store import JsonlSink

    written = {"n": 0}
    real = JsonlSink.write_line

    class Full:  # the results file's handle once the disk is full
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            return None

        def close(self) -> None:
            return None

    def full_disk(self: JsonlSink, line: bytes, key: str | None = None) -> bytes:
        if self.path == results_path():
            written["n"] += 1
            if written["n"] > 30:
                self._fh = Full()  # type: ignore[assignment]
        return real(self, line, key)

    def results_path() -> Path:
        return results_of(tmp_path / "output")

    with FakeOpenAIServer(responder=draft_reply, latency=0.01) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 200)
        monkeypatch.setattr(JsonlSink, "write_line", full_disk)
        code = main(["run", str(config), "--pool", str(pool), "--no-progress",
                     "--concurrency", "8"])
        err = capsys.readouterr().err
        assert code == 3, err
        assert "cannot write" in err and "No space left on device" in err
        assert "the disk is full: free space, then resume" in err
        output = tmp_path / "output"
        assert not list(output.glob("*.tmp"))
        manifest = json.loads(next(output.glob("*_manifest.json")).read_text())
        assert manifest["status"] == "failed" and manifest["error"]["kind"] == "write_error"
        records = lines(results_of(output))
        assert len(records) == 30
        paid = server.request_count
        assert paid < 200  # it stopped paying at once
        monkeypatch.setattr(JsonlSink, "write_line", real)  # space was freed
        assert main(["run", str(config), "--pool", str(pool), "--no-progress", "--resume"]
                    ) == 0
    records = lines(results_of(output))
    assert len(records) == 200 and len({r["key"] for r in records}) == 200
    # the answers in flight when the disk filled were waited for and kept (the cache):
    # nothing was paid twice
    assert server.request_count == 200


FULL_DISK = """
set -e
mount -t tmpfs -o size=48k tmpfs "$1/output"
set +e
"$2" -m datagen.cli run "$3" --pool "$4" --no-progress --set cache_path="$1/cache.sqlite"
echo "first=$?"
ls "$1/output" > "$1/listing.txt"
cp "$1"/output/*_manifest.json "$1/manifest_at_failure.json"
mount -o remount,size=10m "$1/output"
"$2" -m datagen.cli run "$3" --pool "$4" --no-progress --resume --set cache_path="$1/cache.sqlite"
echo "second=$?"
cp "$1"/output/bench_*.jsonl "$1/" 2>/dev/null
"""


def test_a_real_full_disk_exit_3_then_resume(tmp_path: Path) -> None:
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    with FakeOpenAIServer(responder=draft_reply) as server:
        config = make_project(tmp_path, server.base_url)
        (tmp_path / "output").mkdir()
        pool = write_pool(tmp_path / "pool.jsonl", 300)
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               FULL_DISK, "sh", str(tmp_path), sys.executable, str(config),
                               str(pool)], capture_output=True, text=True, env=ENV,
                              timeout=300)
        out = done.stdout + done.stderr
        assert "first=3" in out and "second=0" in out, out[-3000:]
        assert "No space left on device" in out and "Traceback" not in out
        assert ".tmp" not in (tmp_path / "listing.txt").read_text()
        manifest = json.loads((tmp_path / "manifest_at_failure.json").read_text())
        assert manifest["status"] == "failed" and manifest["error"]["kind"] == "write_error"
        (results,) = [p for p in tmp_path.glob("bench_*.jsonl")
                      if not p.stem.endswith(("_failures", "_dropped", "_meta"))]
        records = lines(results)
        assert len(records) == 300 and len({r["key"] for r in records}) == 300
        assert server.request_count == 300  # nothing paid twice


# ---- 10. items that would corrupt quietly ---------------------------------------------

def test_a_generator_that_reuses_one_dict_gives_each_record_its_own_item(
        project: Path, server: FakeOpenAIServer) -> None:
    def reused() -> Any:
        item: dict[str, Any] = {"user_prompt_kwargs": {}, "system_prompt_kwargs": {"tone": "x"}}
        for i in range(30):
            item["user_prompt_kwargs"]["topic"] = f"topic {i}"
            item["user_prompt_kwargs"]["word_count"] = f"{i} words"
            yield item

    result = DataGenerationPipeline(config=project, base_url=server.base_url).run_sync(
        reused(), concurrency_limit=8)
    assert len(result) == 30
    for record in result:
        sent = record["messages"][-1]["content"]
        assert sent == (f"Write about {record['user_prompt_kwargs']['topic']} in about "
                        f"{record['user_prompt_kwargs']['word_count']}.")


def deep(n: int) -> Any:
    value: Any = "x"
    for _ in range(n):
        value = {"k": value}
    return value


@pytest.mark.parametrize(("value", "message"), [
    ({1: "a"}, r"item 3: field user_prompt_kwargs\.topic\.1 has a key that is an int, "
               r"not a string"),
    (b"bytes", r"item 3: field user_prompt_kwargs\.topic is bytes: decode it"),
    (float("nan"), r"item 3: field user_prompt_kwargs\.topic is nan: JSON has no NaN"),
    (deep(300), r"item 3: .*nested deeper than 64 levels"),
    (object(), r"item 3: field user_prompt_kwargs\.topic is an object: items hold JSON"),
])
def test_an_item_that_is_not_json_is_refused_before_anything_is_sent(
        project: Path, server: FakeOpenAIServer, value: Any, message: str) -> None:
    pool = make_pool(6)
    pool[3]["user_prompt_kwargs"]["topic"] = value
    with pytest.raises(DataPoolError, match=message):
        DataGenerationPipeline(config=project, base_url=server.base_url).run_sync(pool)
    assert server.request_count == 0
    assert not (project.parent / "output").exists()


# ---- 11. a failed item on resume asks the model again -----------------------------------

def test_an_item_whose_answer_was_rejected_is_asked_again_on_resume(
        project: Path) -> None:
    answers = iter(["no tags here", "<draft>second time lucky</draft>"])
    with FakeOpenAIServer(responder=lambda body: next(answers)) as server:
        def pipe() -> DataGenerationPipeline:
            return DataGenerationPipeline(config=project, base_url=server.base_url)

        first = pipe().run_sync(make_pool(1), extract_function=extract.tag("draft"))
        assert first == [] and len(lines(first.files.failures)) == 1
        again = pipe().run_sync(make_pool(1), resume=True,
                                extract_function=extract.tag("draft"))
    assert [r["output"] for r in again] == ["second time lucky"]
    assert server.request_count == 2


ANSWERS: list[Any] = [
    [1, 2], {"choices": {"0": {}}}, {"choices": ["hello"]}, {"choices": [{"message": "hi"}]},
    {"choices": [{"message": {"content": 42}}]}, {"choices": [{"message": {"content": "x"}}],
                                                  "usage": [1]},
    {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "n/a"}},
    {"choices": []}, b"<html>502 Bad Gateway</html>",
    {"error": {"message": "Rate limit exceeded", "code": 429}},
    {"error": {"message": "No auth credentials found", "code": 401}},
    {"error": {"message": "Provider returned error", "code": 502}},
    {"error": {"message": "This model's maximum context length is 8192 tokens"}},
    {"error": {"message": "bad", "type": "authentication_error"}}, {"error": "went wrong"},
]


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: str(a)[:40])
async def test_both_transports_classify_every_odd_answer_alike(answer: Any) -> None:
    from datagen.llm.errors import CallError
    from datagen.llm.litellm_transport import LiteLLMTransport
    from datagen.llm.openai_transport import OpenAITransport
    from datagen.llm.types import ChatRequest

    kinds = []
    with FakeOpenAIServer(responder=lambda body: FakeReply(body=answer)) as server:
        for transport in (LiteLLMTransport(), OpenAITransport("openai", server.base_url, "k")):
            request = ChatRequest(model="openai/m", messages=[{"role": "user", "content": "x"}],
                                  provider="openai", base_url=server.base_url, api_key="k")
            try:
                await transport.complete(request)
                kinds.append("ok")
            except CallError as err:
                kinds.append(err.kind)
            finally:
                await transport.aclose()
    assert kinds[0] == kinds[1], kinds
