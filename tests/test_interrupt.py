"""Ctrl+C: the first stops taking items and finishes the ones in flight; files stay valid
and the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from benchmarks._project import draft_reply, make_project, write_pool
from datagen.testing import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import sys
from datagen import DataGenerationPipeline, extract
p = DataGenerationPipeline(config=sys.argv[1], progress=False)
p.run_sync(sys.argv[2], concurrency_limit=4, resume=True, extract_function=extract.tag("draft"))
"""


def start(config: Path, pool: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(config), str(pool)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE)


def wait_for_lines(path_glob: Path, at_least: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        files = [p for p in path_glob.glob("bench_*.jsonl") if "_failures" not in p.name]
        if files and files[0].read_bytes().count(b"\n") >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("the pipeline wrote nothing")


def test_first_ctrl_c_finishes_in_flight_items_then_resume_completes(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=draft_reply, latency=0.3) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 60)
        proc = start(config, pool)
        wait_for_lines(tmp_path / "output", 4, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0  # 130 from the shell's point of view (-2 here)
        assert b"resume=True continues the run" in err
        (results,) = [p for p in (tmp_path / "output").glob("bench_*.jsonl")
                      if "_failures" not in p.name]
        done = [orjson.loads(x) for x in results.read_bytes().splitlines()]  # all parse
        assert 4 <= len(done) < 60
        sent = server.request_count
        assert len(done) == sent  # the in-flight items were finished, not dropped
        manifest = json.loads(results.with_name(results.stem + "_manifest.json").read_text())
        assert manifest["status"] == "interrupted"

        again = start(config, pool)
        assert again.wait(60) == 0
        done = [orjson.loads(x) for x in results.read_bytes().splitlines()]
        assert sorted(r["index"] for r in done) == list(range(60))
        assert server.request_count == 60  # nothing paid twice


def test_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=draft_reply, latency=5.0) as server:
        config = make_project(tmp_path, server.base_url)
        pool = write_pool(tmp_path / "pool.jsonl", 20)
        proc = start(config, pool)
        deadline = time.monotonic() + 60
        while server.request_count < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        (manifest,) = (tmp_path / "output").glob("bench_*_manifest.json")
        assert json.loads(manifest.read_text())["status"] == "interrupted"
        # the in-flight items were cancelled, not waited for (after one Ctrl+C they would
        # have been written when their 5 s replies came back)
        (results,) = [p for p in (tmp_path / "output").glob("bench_*.jsonl")
                      if "_failures" not in p.name]
        assert results.read_bytes() == b""
