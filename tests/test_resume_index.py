"""The done index and the pool index (datagen.runindex): a resume reads them instead of
every record and every pool line, and never trusts them further than its files."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

import datagen.prepare as prepare
from datagen import DataGenerationPipeline
from datagen.runindex import ENTRY, done_path, pool_path
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def project(tmp: Path, base_url: str) -> Path:
    (tmp / "prompts").mkdir(exist_ok=True)
    (tmp / "prompts" / "s.txt").write_text("Say {{ text }}")
    (tmp / "config.yaml").write_text(
        f"model: {{provider: openai, model: m, max_retries: 0, base_url: '{base_url}'}}\n"
        f"output_data: {{output_dir: '{tmp / 'out'}', experiment_name: ix}}\n"
        "run: {progress: false, cache: false}\n")
    return tmp / "config.yaml"


def pool_file(tmp: Path, texts: list[str], name: str = "pool.jsonl") -> Path:
    path = tmp / name
    path.write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
    return path


def pipe(config: Path, **kw: Any) -> DataGenerationPipeline:
    return DataGenerationPipeline(config=config, **kw).step("s", prompt="s.txt")


def records(out: Path) -> list[dict[str, Any]]:
    (results,) = [p for p in out.glob("ix_*.jsonl") if p.stem.count("_") == 2]
    return [orjson.loads(x) for x in results.read_bytes().splitlines()]


def interrupted(config: Path, pool: Path, after: int, resume: bool = False, **kw: Any
                ) -> None:
    """A run left after ``after`` records (the loop left: manifest 'interrupted')."""
    async def go() -> None:
        stream = pipe(config, **kw).stream(pool, concurrency_limit=1, resume=resume)
        n = 0
        async for _ in stream:
            n += 1
            if n >= after:
                break
        await stream.aclose()

    asyncio.run(go())


def echo(body: dict[str, Any]) -> str:
    return last_user_message(body)


@pytest.fixture()
def prechecks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many pool items each full pre-check read (a resume from the pool index reads
    none)."""
    seen: list[int] = []
    real = prepare.precheck

    def counting(pool: Any, plan: Any, samples: int) -> Any:
        positions = real(pool, plan, samples)
        seen.append(len(positions) if positions is not None else -1)
        return positions

    monkeypatch.setattr(prepare, "precheck", counting)
    return seen


def test_resume_skips_done_items_of_an_unchanged_pool_file_unread(
        tmp_path: Path, prechecks: list[int]) -> None:
    texts = [f"t{i}" for i in range(40)] + ["same"] * 5  # repeats keep their numbers
    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, texts)
        interrupted(config, pool, after=17)
        assert prechecks == [45]
        result = pipe(config).run_sync(pool, resume=True)
        assert prechecks == [45]  # the resume read the pool index, not the pool
    got = records(tmp_path / "out")
    assert len(got) == 45 and len({r["key"] for r in got}) == 45
    assert Counter(r["output"] for r in got)["Say same"] == 5
    assert result.counts["skipped_done"] >= 17
    assert len(result) + result.counts["skipped_done"] == 45
    assert result.files is not None
    assert done_path(result.files.results).stat().st_size == 45 * ENTRY.size


def test_a_changed_pool_file_is_read_and_checked_again(tmp_path: Path,
                                                       prechecks: list[int]) -> None:
    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, [f"t{i}" for i in range(20)])
        interrupted(config, pool, after=8)
        pool = pool_file(tmp_path, ["new"] + [f"t{i}" for i in range(20)])  # same name
        pipe(config).run_sync(pool, resume=True)
        assert prechecks == [20, 21]
    got = records(tmp_path / "out")
    assert sorted(r["output"] for r in got) == sorted(
        ["Say new"] + [f"Say t{i}" for i in range(20)])


def test_samples_and_repeats_resume_from_the_pool_index(tmp_path: Path,
                                                        prechecks: list[int]) -> None:
    texts = ["a", "b", "a", "c", "a"]
    with FakeOpenAIServer(responder=lambda body: f"{echo(body)} {body.get('seed')}") as s:
        config = project(tmp_path, s.base_url)
        pool = pool_file(tmp_path, texts)
        interrupted(config, pool, after=7, samples=3)
        pipe(config, samples=3).run_sync(pool, resume=True)
        assert prechecks == [5]
    got = records(tmp_path / "out")
    assert len(got) == 15 and len({r["key"] for r in got}) == 15
    assert Counter(r["output"].split()[1] for r in got) == {"a": 9, "b": 3, "c": 3}


@pytest.mark.parametrize("damage", ["entries lost", "torn entry", "results edited",
                                    "index of another run", "no index"])
def test_an_index_that_does_not_fit_its_files_is_not_trusted(tmp_path: Path,
                                                            damage: str) -> None:
    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, [f"t{i}" for i in range(30)])
        interrupted(config, pool, after=12)
        out = tmp_path / "out"
        index = next(out.glob("ix_*_done.idx"))
        results = index.with_name(index.name.replace("_done.idx", ".jsonl"))
        data = index.read_bytes()
        assert len(data) == 12 * ENTRY.size
        lines = results.read_bytes().splitlines(keepends=True)
        if damage == "entries lost":  # a kill before the last block of entries was written
            index.write_bytes(data[:5 * ENTRY.size])
        elif damage == "torn entry":
            index.write_bytes(data[:-7])
        elif damage == "results edited":  # records removed by hand, to be made again
            results.write_bytes(b"".join(lines[:4]))
        elif damage == "index of another run":
            index.write_bytes(data[ENTRY.size:] + data[:ENTRY.size])  # out of order
        else:
            index.unlink()
        pipe(config).run_sync(pool, resume=True)
    got = records(tmp_path / "out")
    assert sorted(r["output"] for r in got) == sorted(f"Say t{i}" for i in range(30))
    assert index.stat().st_size == 30 * ENTRY.size  # complete again


KILLED = """
import sys
from datagen import DataGenerationPipeline
p = DataGenerationPipeline(config=sys.argv[1]).step("s", prompt="s.txt")
p.run_sync(sys.argv[2], concurrency_limit=8)
"""


def test_kill_9_mid_run_then_resume_no_duplicate_no_loss(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=echo, latency=0.01) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, [f"t{i}" for i in range(3000)])
        proc = subprocess.Popen([sys.executable, "-c", KILLED, str(config), str(pool)],
                                env=ENV, stderr=subprocess.PIPE)
        out = tmp_path / "out"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [p for p in out.glob("ix_*.jsonl") if p.stem.count("_") == 2]
            if found and found[0].stat().st_size > 40_000:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before = len(records(out))
        assert 0 < before < 3000
        pipe(config).run_sync(pool, resume=True, concurrency_limit=8)
    got = records(out)
    assert len(got) == 3000 and len({r["key"] for r in got}) == 3000


def test_a_done_index_that_cannot_be_written_is_removed(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    from datagen import runindex

    real = runindex.DoneLog.flush

    def failing(self: runindex.DoneLog) -> None:
        if self._buffer and self._fh is None and self.path.exists():
            self._break(OSError(28, "No space left on device"))
            return
        real(self)

    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, [f"t{i}" for i in range(20)])
        interrupted(config, pool, after=6)
        monkeypatch.setattr(runindex, "_FLUSH_BYTES", ENTRY.size)  # a block per entry
        monkeypatch.setattr(runindex.DoneLog, "flush", failing)
        interrupted(config, pool, after=4, resume=True)  # its entries cannot be written
        index = next((tmp_path / "out").glob("ix_*_done.idx"), None)
        assert index is None  # a gap would hide records: no index rather than a wrong one
        monkeypatch.undo()
        pipe(config).run_sync(pool, resume=True)
    got = records(tmp_path / "out")
    assert sorted(r["output"] for r in got) == sorted(f"Say t{i}" for i in range(20))


def test_pool_index_names_its_file(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, ["x", "y"])
        result = pipe(config).run_sync(pool)
    assert result.files is not None
    header = orjson.loads(pool_path(result.files.results).read_bytes().split(b"\n")[0])
    assert header["positions"] == 2 and header["pool"]["path"] == str(pool)
