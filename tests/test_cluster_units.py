"""The pieces of a cluster run that need no cluster (they run without Ray): shard
assignment, the spill and the shards' readers, the lease that fences a shard's files, the
cluster's send slots and adaptive concurrency, the workers' limits against an in-process
budget, the merge of part files, and templates that pickle."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen import DataGenerationPipeline
from datagen.errors import ConfigError
from datagen.executors.ray_merge import Merger
from datagen.lease import ShardLease, StaleAttempt, read_epoch
from datagen.llm.cluster import ClusterEndpoints, ClusterLimits
from datagen.llm.clusterbudget import ClusterBudget, Concurrency, SlotLog
from datagen.llm.throttle import RateSpec, Throttle, endpoint_limits, limits_from
from datagen.pool import Pool, open_pool, plain_item, to_item
from datagen.shards import ShardLayout, ShardRun, shard_items, shard_of, spill
from datagen.source import ItemSource
from datagen.store import JsonlSink, RunFiles
from datagen.testing import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent


# ---- shards ------------------------------------------------------------------------

def test_shard_of_is_the_same_in_every_process() -> None:
    keys = [to_item(i, item).content_key for i, item in enumerate(make_pool(50))]
    here = [shard_of(k, 7) for k in keys]
    code = ("import sys, json; from datagen.shards import shard_of; "
            "print(json.dumps([shard_of(k, 7) for k in json.loads(sys.argv[1])]))")
    there = subprocess.run([sys.executable, "-c", code, orjson.dumps(keys).decode()],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    assert orjson.loads(there.stdout) == here
    assert set(here) == set(range(7))  # spread over every shard


async def keys_of(source: ItemSource) -> list[tuple[int, str]]:
    out = []
    while (item := await source.next()) is not None:
        out.append((item.index, item.key))
    return out


@pytest.mark.parametrize("kind", ["generator", "jsonl"])
async def test_shards_number_items_as_one_process_does(tmp_path: Path, kind: str) -> None:
    """Repeats of an item (keyed -1, -2...) and samples land in one shard, numbered there
    in pool order: the union of the shards' keys is one process's keys, each once."""
    raw = [{"topic": f"t{i % 37}", "n": i % 5} for i in range(300)]  # many repeats
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in raw))
    whole = await keys_of(ItemSource(open_pool(raw), plain_item, samples=2))
    layout = ShardLayout(tmp_path / "x.shards", "x")
    if kind == "generator":
        spilled = await spill(open_pool(iter(raw)), plain_item, None, layout, 4)
        assert sum(spilled.counts) == 300
    sharded: list[tuple[int, str]] = []
    for i in range(4):
        run = ShardRun(i, 4, layout.part(i), layout.lease(i),
                       layout.input(i) if kind == "generator" else path,
                       kind == "generator", tmp_path / "c.sqlite", 4)
        pool = Pool(shard_items(run, plain_item), None, reiterable=False, indexed=True)
        sharded += await keys_of(ItemSource(pool, plain_item, samples=2))
    assert sorted(sharded) == sorted(whole) and len(set(sharded)) == 600


# ---- the lease -----------------------------------------------------------------------

def test_a_newer_attempt_fences_the_old_one(tmp_path: Path) -> None:
    old, new = ShardLease(tmp_path / "p.lease"), ShardLease(tmp_path / "p.lease")
    assert old.take() == 1
    sink = JsonlSink(tmp_path / "part.jsonl", fence=old.held)
    sink.write_line(b'{"key":"a"}\n')
    assert new.take() == 2 and read_epoch(tmp_path / "p.lease") == 2
    with pytest.raises(StaleAttempt, match="superseded by attempt 2"):
        sink.write_line(b'{"key":"b"}\n')
    sink.close()
    assert (tmp_path / "part.jsonl").read_bytes() == b'{"key":"a"}\n'


def test_taking_the_lease_waits_for_an_append_in_progress(tmp_path: Path) -> None:
    """So the new attempt's resume index sees that append: never a duplicate."""
    old, new = ShardLease(tmp_path / "p.lease"), ShardLease(tmp_path / "p.lease")
    old.take()
    taken_at: list[float] = []
    with old.held():
        thread = threading.Thread(target=lambda: (new.take(), taken_at.append(
            time.monotonic())))
        thread.start()
        time.sleep(0.2)
        assert not taken_at  # blocked while the old attempt appends
        released = time.monotonic()
    thread.join(5)
    assert taken_at and taken_at[0] >= released


# ---- the cluster's budget --------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.floats(0, 0.2), st.floats(0, 0.5)),
                min_size=5, max_size=120), st.sampled_from([1, 3, 10, 100, 0.5]))
def test_any_cap_plus_one_sends_span_the_window(leases: list[tuple[int, float, float]],
                                                cap: float) -> None:
    """Workers lease slices of slots; the first slot of each is sent late (up to half a
    second) and reported, which moves it: still no window holds more than the cap."""
    log = SlotLog.for_rate(cap, 0.03)
    now, sent = 0.0, []
    for n, pause, late in leases:
        now += pause
        slots = log.grant(now, n)
        if slots:
            log.move(slots[0], slots[0] + late)
            sent += [slots[0] + late, *slots[1:]]
    sent.sort()
    for i in range(len(sent) - log.count):
        assert sent[i + log.count] - sent[i] >= log.window + 0.03 - 1e-9


def test_cluster_concurrency_halves_on_429_and_grows_back() -> None:
    c = Concurrency()
    for who in ("a", "b"):
        c.join(who, 16)
    assert (c.limit, c.maximum) == (32, 32)
    c.rate_limited(1)
    assert c.limit == 16
    c.rate_limited(10)
    assert c.limit == 2  # never below one per shard
    c.succeeded(2 + 3)
    assert c.limit == 4


class LocalPort:
    """The budget in this process, with a millisecond of latency each way."""

    def __init__(self) -> None:
        self.budget = ClusterBudget()

    async def _hop(self) -> None:
        await asyncio.sleep(0.001)

    async def join(self, key: str, spec: dict[str, Any], who: str, maximum: int
                   ) -> dict[str, Any]:
        await self._hop()
        return self.budget.join(key, spec, who, maximum)

    async def lease(self, key: str, n: int, probe: bool
                    ) -> tuple[list[float], dict[str, Any]]:
        await self._hop()
        return self.budget.lease(key, n, probe)

    async def tokens(self, key: str, amounts: dict[str, float]) -> float:
        return self.budget.tokens(key, amounts)

    async def settle(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        await self._hop()
        return self.budget.settle(key, report)

    def moved(self, key: str, at: float, to: float) -> None:
        self.budget.moved(key, at, to)

    def leave(self, key: str, who: str) -> None:
        self.budget.leave(key, who)


async def test_four_workers_share_one_window_and_one_pause() -> None:
    port, sends = LocalPort(), []
    workers = [ClusterLimits("k", RateSpec(requests_per_second=20), "m", port, f"w{i}")
               for i in range(4)]
    for w in workers:
        await w.start()

    async def send(w: ClusterLimits, n: int) -> None:
        for _ in range(n):
            s = await w.wait_turn()
            assert s is not None
            s.sent(time.monotonic())
            sends.append(s.at)
            w.done(s)

    t0 = time.monotonic()
    await asyncio.gather(*(send(w, 15) for w in workers for _ in range(3)))
    workers[0].pause(0.5, "429")  # one worker's 429...
    await asyncio.sleep(0.15)  # ...reaches the others with their next sync
    assert all(w.paused_for() > 0.2 for w in workers)
    for w in workers:
        await w.stop()
    sends.sort()
    assert min(b - a for a, b in zip(sends, sends[20:], strict=False)) >= 1.0  # <= 20/s
    assert time.monotonic() - t0 < 180 / 20 + 1.0  # near the cap: 180 at 20/s


def test_a_cluster_source_serves_the_endpoint_limits() -> None:
    endpoints = ClusterEndpoints(LocalPort(), "w")
    limits_from(endpoints)
    try:
        limits = endpoint_limits("openai|u|m|h", RateSpec(requests_per_second=5))
    finally:
        limits_from(None)
    assert isinstance(limits, ClusterLimits) and endpoints.limits == {"openai|u|m|h": limits}
    assert not isinstance(endpoint_limits("openai|u|m|h", RateSpec()), ClusterLimits)
    Throttle(limits=limits).rate_limited()  # a 429 reaches the cluster's limits
    assert limits._report["limited"] == 1


# ---- merging the parts -----------------------------------------------------------------

def test_the_merge_holds_each_key_once_and_waits_for_whole_lines(tmp_path: Path) -> None:
    files = RunFiles.for_stem(tmp_path, "run")
    layout = ShardLayout.of(files)
    layout.folder.mkdir()
    parts = [layout.part(i) for i in range(2)]
    parts[0].results.write_bytes(b'{"key":"a"}\n{"key":"b"}\n')
    parts[1].results.write_bytes(b'{"key":"c"}\n{"key":"a"}\n{"key":"d"')  # torn, a twice
    merger = Merger(files, layout, 2, fsync=1.0)
    merger.rebuild()
    assert files.results.read_bytes() == b'{"key":"a"}\n{"key":"b"}\n{"key":"c"}\n'
    with open(parts[1].results, "ab") as fh:
        fh.write(b'}\n')
    parts[0].failures.write_bytes(b'{"key":"e","error":{"kind":"timeout"}}\n')
    assert merger.tail() == [b'{"key":"d"}\n']
    merger.close()
    assert merger.count("results") == 1 and merger.count("failures") == 1
    assert merger.summary()["duplicates_left_out"] == 1
    assert dict(merger.failed_by_kind) == {"timeout": 1}
    again = Merger(files, layout, 2, fsync=1.0)
    again.rebuild()  # a driver that starts again rebuilds the same file
    assert files.results.read_bytes().count(b"\n") == 4 and again.resumed == 4


# ---- what travels to the workers -------------------------------------------------------

def test_templates_and_plans_pickle(tmp_path: Path) -> None:
    p = DataGenerationPipeline(config=write_project(tmp_path), base_url="http://127.0.0.1:9/v1")
    plan = pickle.loads(pickle.dumps(p._plan(p.make_default_extractor())))
    messages = plan.prompt.messages({"topic": "owls", "word_count": "5 words"},
                                    {"tone": "dry"}, "item 0")
    assert messages[-1]["content"].startswith("Write about owls in about 5 words")


def test_resuming_a_cluster_run_in_one_process_is_refused(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft) as server:
        p = DataGenerationPipeline(config=write_project(tmp_path), base_url=server.base_url)
        result = p.run_sync(make_pool(2))
        ShardLayout.of(result.files).folder.mkdir()
        with pytest.raises(ConfigError, match="was made on a cluster"):
            p.run_sync(make_pool(2), resume=True)
