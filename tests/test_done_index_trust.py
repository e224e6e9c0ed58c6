"""The done index is trusted only as far as the files it describes: whatever happened to
the files or the index between two runs (lines removed, added or moved by hand, an index
copied from another run, a write that failed on a full disk), a resume's done keys are
exactly the keys the files hold. A key too many loses an item; a key too few writes it
twice."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
from test_resume_index import FakeOpenAIServer, echo, interrupted, pipe, pool_file, project, records

from datagen import runindex
from datagen.runindex import DROPPED, ENTRY, RESULTS, DoneLog, done_path, read_done
from datagen.store import key_of


def line(key: str, width: int = 120) -> bytes:
    """A record line of a fixed length whatever its key: the worst case, where a line
    removed by hand leaves another line ending where the removed one did."""
    body = orjson.dumps({"index": 0, "key": key, "output": ""})
    return body[:-2] + b"x" * (width - len(body) - 1) + b'"}\n'


def keys(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def write_run(folder: Path, results: list[str], dropped: list[str], indexed: int
              ) -> tuple[Path, Path]:
    """A run's files with an index whose first ``indexed`` entries survived (a kill
    loses the entries not yet written; they are found again by the tail read)."""
    res, drop = folder / "r.jsonl", folder / "r_dropped.jsonl"
    log = DoneLog(done_path(res), begin=True)
    for path, tag, names in ((res, RESULTS, results), (drop, DROPPED, dropped)):
        end = 0
        with open(path, "wb") as fh:
            for key in names:
                fh.write(line(key))
                end += len(line(key))
                log.add(key, tag, end)
    log.close()
    index = done_path(res)
    entries = index.read_bytes()
    index.write_bytes(entries[:indexed * ENTRY.size])
    return res, drop


def file_keys(path: Path) -> set[str]:
    return {k for x in path.read_bytes().splitlines(keepends=True)
            if (k := key_of(x)) is not None}


def damage(rng: random.Random, res: Path, drop: Path, how: str, other: Path) -> None:
    path = rng.choice([res, drop]) if how != "another run's index" else res
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "a line removed" and lines:
        del lines[rng.randrange(len(lines))]
    elif how == "a line added":
        lines.insert(rng.randrange(len(lines) + 1), line(keys(rng, 1)[0]))
    elif how == "a line moved" and lines:
        lines.insert(rng.randrange(len(lines)), lines.pop(rng.randrange(len(lines))))
    elif how == "cut short":
        lines = lines[:rng.randrange(len(lines) + 1)]
    elif how == "another run's index":
        done_path(res).write_bytes(done_path(other).read_bytes())
    path.write_bytes(b"".join(lines))


HOW = ["nothing", "a line removed", "a line added", "a line moved", "cut short",
       "another run's index"]


@pytest.mark.parametrize("how", HOW)
def test_resume_keys_are_exactly_the_files_keys_whatever_was_done_to_them(
        tmp_path: Path, how: str) -> None:
    rng = random.Random(how)
    for trial in range(40):
        folder = tmp_path / str(trial)
        (folder / "other").mkdir(parents=True)
        n, m = rng.randrange(1, 30), rng.randrange(0, 6)
        res, drop = write_run(folder, keys(rng, n), keys(rng, m),
                              indexed=rng.randrange(n + m + 1))
        write_run(folder / "other", keys(rng, n + 3), keys(rng, m),
                  indexed=rng.randrange(n + m + 1))
        damage(rng, res, drop, how, folder / "other" / "r.jsonl")
        found = read_done(res, drop, key_of)
        expected = file_keys(res) | file_keys(drop)
        assert all(k in found.keys for k in expected), (trial, how)
        assert len(found.keys) == len(expected), (trial, how)  # no key of another line
        assert found.records == len(file_keys(res))
        again = read_done(res, drop, key_of)  # the index it left is complete and trusted
        assert len(again.keys) == len(expected)
        assert done_path(res).stat().st_size == len(expected) * ENTRY.size


def test_a_lost_index_is_never_begun_again_from_the_middle_of_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume's tail entries cannot be written (a full disk): the index is removed.
    The run goes on writing records; its log must not start a new index holding only
    them, which the next resume would take for the whole run (every earlier record
    made again)."""
    rng = random.Random(1)
    res, drop = write_run(tmp_path, keys(rng, 20), [], indexed=5)
    real = DoneLog.flush
    failed: list[bool] = []

    def full_disk_once(self: DoneLog) -> None:
        if self._buffer and not failed:
            failed.append(True)
            self._break(OSError(28, "No space left on device"))
            return
        real(self)

    monkeypatch.setattr(DoneLog, "flush", full_disk_once)
    read_done(res, drop, key_of)
    assert failed and not done_path(res).exists()
    monkeypatch.undo()
    later = DoneLog(done_path(res))  # the run's own log, appending records 21..25
    more = keys(rng, 5)
    end = res.stat().st_size
    with open(res, "ab") as fh:
        for key in more:
            fh.write(line(key))
            end += len(line(key))
            later.add(key, RESULTS, end)
    later.close()
    found = read_done(res, drop, key_of)
    assert len(found.keys) == 25 and found.records == 25


def test_the_resumes_index_with_disk_full_then_resumed_again_writes_each_item_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, through runs: interrupted, its last entries lost; a resume whose tail
    entries hit a full disk; a last resume. Every item once."""
    real = DoneLog.flush
    failed: list[bool] = []

    def full_disk_once(self: DoneLog) -> None:
        if self._buffer and not failed:
            failed.append(True)
            self._break(OSError(28, "No space left on device"))
            return
        real(self)

    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        pool = pool_file(tmp_path, [f"t{i}" for i in range(30)])
        interrupted(config, pool, after=10)
        index = next((tmp_path / "out").glob("ix_*_done.idx"))
        index.write_bytes(index.read_bytes()[:4 * ENTRY.size])  # a kill lost 6 entries
        monkeypatch.setattr(runindex.DoneLog, "flush", full_disk_once)
        interrupted(config, pool, after=5, resume=True)
        monkeypatch.undo()
        assert failed
        pipe(config).run_sync(pool, resume=True)
    got = records(tmp_path / "out")
    assert sorted(r["output"] for r in got) == sorted(f"Say t{i}" for i in range(30))


def test_another_runs_index_copied_in_is_not_trusted(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=echo) as server:
        config = project(tmp_path, server.base_url)
        first = pool_file(tmp_path, [f"a{i:02d}" for i in range(30)], "a.jsonl")
        second = pool_file(tmp_path, [f"b{i:02d}" for i in range(30)], "b.jsonl")
        interrupted(config, first, after=8, experiment_name="a")
        interrupted(config, second, after=20, experiment_name="b")
        out = tmp_path / "out"
        (a_index,), (b_index,) = out.glob("a_*_done.idx"), out.glob("b_*_done.idx")
        b_index.write_bytes(a_index.read_bytes())  # records of the same shape and length
        pipe(config, experiment_name="b").run_sync(second, resume=True)
    (results,) = out.glob("b_*[0-9].jsonl")
    got = [orjson.loads(x)["output"] for x in results.read_bytes().splitlines()]
    assert sorted(got) == sorted(f"Say b{i:02d}" for i in range(30))
