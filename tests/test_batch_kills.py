"""Batch mode, exactly once across crashes: a batch run is killed with SIGKILL in every
phase (writing request files, uploading, after upload before create, a create whose
answer is lost, polling, downloading, writing records) and resumed, against the fake
batch server, which counts everything: exactly one record per item, no request submitted
or answered twice, no answer lost, no file left at the provider."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import topic_draft

from datagen.testing.fake_batch_server import FakeBatchServer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
ITEMS = 150
CHILD = """
import os, sys, time
from datagen import DataGenerationPipeline, extract
before, after = float(os.environ.get("SLOW_RENDER", 0)), float(os.environ.get("SLOW_EXTRACT", 0))
draft = extract.tag("draft")
def slow_input(context):
    time.sleep(before)
    return context
def slow_extract(text):
    time.sleep(after)
    return draft(text)
p = DataGenerationPipeline(config=sys.argv[1])
p.step("answer", "user.txt", extract=slow_extract, input_processor=slow_input if before else None)
p.run_sync(sys.argv[2], concurrency_limit=4, resume=True)
"""


class Gate:
    """Holds one call to a route: ``before`` it is handled (``refuse``: then answer 503,
    handling nothing) or ``after`` (handled, its answer held: a lost answer)."""

    def __init__(self, when: str, refuse: bool = False) -> None:
        self.when, self.refuse = when, refuse
        self.arrived, self.release = threading.Event(), threading.Event()

    async def hold(self) -> None:
        self.arrived.set()
        deadline = time.monotonic() + 60
        while not self.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class GatedServer(FakeBatchServer):
    """The fake batch server with a gate on the next call of a route."""

    gates: dict[str, Gate]

    async def _through(self, name: str, handler: Callable[[Any], Awaitable[Any]],
                       request: Any) -> Any:
        from aiohttp import web

        gate = self.gates.pop(name, None)
        if gate is None:
            return await handler(request)
        if gate.when == "before":
            await gate.hold()
            if gate.refuse:
                return web.Response(status=503, text="gone")
            return await handler(request)
        response = await handler(request)
        await gate.hold()
        return response

    async def _upload(self, request: Any) -> Any:
        return await self._through("upload", super()._upload, request)

    async def _create_batch(self, request: Any) -> Any:
        return await self._through("create", super()._create_batch, request)

    async def _create_message_batch(self, request: Any) -> Any:
        return await self._through("create", super()._create_message_batch, request)

    async def _file_content(self, request: Any) -> Any:
        return await self._through("download", super()._file_content, request)

    async def _message_batch_results(self, request: Any) -> Any:
        return await self._through("download", super()._message_batch_results, request)


@pytest.fixture
def server() -> Iterator[GatedServer]:
    with GatedServer(responder=topic_draft) as running:
        running.gates = {}
        yield running


def project(root: Path, base_url: str, provider: str = "openai") -> tuple[Path, Path]:
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "user.txt").write_text(
        "Write about {{ topic }} in about {{ word_count }}.\n")
    model = "gpt-4o-mini" if provider == "openai" else "claude-sonnet-4-5"
    (root / "config.yaml").write_text(
        f"model:\n  provider: {provider}\n  model: {model}\n  base_url: {base_url}\n"
        "  max_tokens: 32\n  max_retries: 3\n"
        f"output_data:\n  output_dir: {root / 'output'}\n  experiment_name: kill\n"
        "run:\n  progress: false\n  batch: true\n  batch_poll_interval: 0.05\n"
        "  batch_poll_max: 0.2\n")
    pool = root / "pool.jsonl"
    pool.write_bytes(b"".join(orjson.dumps({"topic": f"topic {i}", "word_count": "9 words"})
                              + b"\n" for i in range(ITEMS)))
    return root / "config.yaml", pool


def start(config: Path, pool: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(config), str(pool)],
                            env={**ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)


def resume(config: Path, pool: Path) -> None:
    child = start(config, pool)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()[-3000:]


def wait_for(predicate: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the phase"
        time.sleep(0.01)


def results_file(root: Path) -> Path | None:
    found = [p for p in (root / "output").glob("kill_*.jsonl")
             if not p.stem.endswith(("_failures", "_dropped", "_pool"))]
    return found[0] if found else None


def written(root: Path) -> int:
    """Whole lines in the results file so far (read while the child writes it)."""
    path = results_file(root) if (root / "output").exists() else None
    return path.read_bytes().count(b"\n") if path is not None else 0


def results(root: Path) -> list[dict[str, Any]]:
    path = results_file(root)
    assert path is not None
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def log_of(root: Path) -> str:
    return "".join(p.read_text() for p in (root / "output").glob("kill_*.log"))


def exactly_once(root: Path, server: FakeBatchServer) -> dict[str, Any]:
    records = results(root)
    assert len(records) == ITEMS, len(records)
    assert len({r["key"] for r in records}) == ITEMS  # one record per item, none twice
    stats = server.stats()
    assert stats["submitted_twice"] == [] and stats["succeeded_twice"] == []
    assert stats["bodies_succeeded_twice"] == []  # no answer paid twice
    assert stats["requests_succeeded"] == ITEMS  # and every one used: none lost
    assert not [f for f in server.book.files.values()]  # every file deleted at the end
    manifest = orjson.loads(next((root / "output").glob("kill_*_manifest.json")).read_bytes())
    assert manifest["status"] == "completed"
    assert manifest["batches"]["totals"]["completed"] == ITEMS
    return stats


def test_killed_while_writing_request_files(tmp_path: Path, server: GatedServer) -> None:
    config, pool = project(tmp_path, server.base_url)
    child = start(config, pool, SLOW_RENDER="0.01")
    wait_for(lambda: any(p.stat().st_size for p in (tmp_path / "output").glob(
        "kill_*_batches/*.jsonl")))
    kill(child)
    assert server.stats()["files_uploaded"] == 0  # killed before anything went up
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    assert stats["bodies_submitted_twice"] == []
    assert "was being written when the run stopped: discarded" in log_of(tmp_path)


@pytest.mark.parametrize("phase", ["upload answer lost", "after upload, before create",
                                   "create answer lost", "downloading"])
def test_killed_at_a_provider_call(tmp_path: Path, server: GatedServer, phase: str) -> None:
    gate = {"upload answer lost": ("upload", Gate("after")),
            "after upload, before create": ("create", Gate("before", refuse=True)),
            "create answer lost": ("create", Gate("after")),
            "downloading": ("download", Gate("before"))}[phase]
    server.gates = dict([gate])
    config, pool = project(tmp_path, server.base_url)
    child = start(config, pool)
    assert gate[1].arrived.wait(60), "the child never reached the gate"
    kill(child)
    gate[1].release.set()
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["batches_created"] == 1 and stats["bodies_submitted_twice"] == []
    assert stats["files_uploaded"] == 1  # a lost upload was found, not sent again
    if phase == "downloading":
        assert stats["downloads"] >= 2
    found = {"upload answer lost": "its file was uploaded before the run stopped",
             "create answer lost": "created before the run stopped, adopted"}.get(phase)
    assert found is None or found in log_of(tmp_path)


def test_killed_while_polling_then_resumed_another_day(tmp_path: Path,
                                                       server: GatedServer) -> None:
    server.completion_delay = 3600
    config, pool = project(tmp_path, server.base_url)
    child = start(config, pool)
    wait_for(lambda: server.stats()["polls"] >= 3)
    kill(child)
    server.advance(24 * 3600 - 60)  # a day later, the batch long done
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["batches_created"] == 1 and stats["bodies_submitted_twice"] == []


def test_killed_while_writing_records(tmp_path: Path, server: GatedServer) -> None:
    config, pool = project(tmp_path, server.base_url)
    child = start(config, pool, SLOW_EXTRACT="0.02")
    wait_for(lambda: written(tmp_path) >= 10)
    kill(child)
    assert written(tmp_path) < ITEMS
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["batches_created"] == 1 and stats["bodies_submitted_twice"] == []


def test_killed_while_polling_a_batch_with_errors(tmp_path: Path,
                                                  server: GatedServer) -> None:
    """10% of the first batch errors; killed while the batch of those is polled."""
    server.error_rate = 0.1
    config, pool = project(tmp_path, server.base_url)
    child = start(config, pool)
    wait_for(lambda: server.stats()["batches_created"] == 1
             and server.stats()["requests_errored"] > 0)
    server.error_rate, server.completion_delay = 0.0, 3600
    wait_for(lambda: server.stats()["batches_created"] == 2)
    first_errors = server.stats()["requests_errored"]
    wait_for(lambda: server.stats()["polls"] >= 4)
    kill(child)
    server.advance(3600)
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["batches_created"] == 2
    assert stats["requests_submitted"] == ITEMS + first_errors  # only what was missing
    assert len(stats["bodies_submitted_twice"]) == first_errors


def test_anthropic_create_answer_lost(tmp_path: Path, server: GatedServer) -> None:
    """No metadata on a Message Batch: the lost one is found by time and size."""
    gate = Gate("after")
    server.gates = {"create": gate}
    config, pool = project(tmp_path, server.base_url, provider="anthropic")
    child = start(config, pool)
    assert gate.arrived.wait(60)
    kill(child)
    gate.release.set()
    resume(config, pool)
    stats = exactly_once(tmp_path, server)
    assert stats["batches_created"] == 1 and stats["bodies_submitted_twice"] == []
    assert "created before the run stopped, adopted" in log_of(tmp_path)
