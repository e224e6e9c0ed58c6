"""Adversarial checks of cluster runs against one-process runs of the same pool, counted at
the fake server: repeats and samples, the three pool kinds, a multi-step pipeline with
fan-out, a validator that fails then passes, and a filter. Each must give the same record
keys (and dropped keys) as ``executor="local"``, every record once, and pay the same
number of requests; a resumed finished run sends nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

if os.environ.get("DATAGEN_REQUIRE_RAY") == "1":
    import ray
else:
    ray = pytest.importorskip("ray", reason='the ray extra is not installed')

from datagen import DataGenerationPipeline
from datagen.executors.ray import RayExecutor
from datagen.testing import FakeOpenAIServer
from datagen.testing.ray_cluster import LocalRayCluster, attached_cluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with attached_cluster("datagen-breakers") as c:
        yield c


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def executor(kind: str) -> Any:
    return RayExecutor(shards=3) if kind == "ray" else "local"


def test_repeats_and_samples_give_the_local_keys(cluster: LocalRayCluster,
                                                 tmp_path: Path) -> None:
    item = make_pool(1)[0]
    pool = [item] * 5 + make_pool(4) + [make_pool(3)[2]] * 2 + [item]
    keys, requests = {}, {}
    with FakeOpenAIServer(responder=topic_draft, latency=0.01) as server:
        for kind in ("local", "ray"):
            write_project(tmp_path / kind, extra_yaml="  samples: 3\n")
            p = DataGenerationPipeline(config=tmp_path / kind / "config.yaml",
                                       base_url=server.base_url)
            server.reset()
            result = p.run_sync(pool, extract_function=p.make_default_extractor(),
                                executor=executor(kind))
            records = lines_of(result.files.results)
            keys[kind] = sorted(r["key"] for r in records)
            requests[kind] = server.request_count
            assert result.status == "completed"
            assert len(records) == len(set(keys[kind])) == len(pool) * 3
    assert keys["ray"] == keys["local"]
    assert requests["ray"] == requests["local"] == len(pool) * 3


def test_list_file_and_generator_pools_give_the_same_records(cluster: LocalRayCluster,
                                                             tmp_path: Path) -> None:
    pool = make_pool(30) + make_pool(5)  # five repeats
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in pool))
    seen = {}
    with FakeOpenAIServer(responder=topic_draft, latency=0.01) as server:
        for kind in ("local", "list", "file", "generator"):
            write_project(tmp_path / kind)
            p = DataGenerationPipeline(config=tmp_path / kind / "config.yaml",
                                       base_url=server.base_url)
            source: Any = {"local": pool, "list": pool, "file": str(path),
                           "generator": (item for item in pool)}[kind]
            server.reset()
            result = p.run_sync(source, extract_function=p.make_default_extractor(),
                                executor="local" if kind == "local" else RayExecutor(shards=3))
            assert server.request_count == len(pool)
            seen[kind] = sorted((r["key"], r["index"], r["output"])
                                for r in lines_of(result.files.results))
    assert len(seen["local"]) == len(pool)
    assert seen["list"] == seen["file"] == seen["generator"] == seen["local"]


def _steps_responder(body: dict[str, Any]) -> str:
    message = body["messages"][-1]["content"]
    if message.startswith("List questions"):
        topic = message.split("about ")[1]
        n = int(topic[1:]) % 3 + 1
        return json.dumps([f"{topic} q{j}" + (" drop" if j == 1 and n == 3 else "")
                           for j in range(n)])
    if len(message.split()) > 5:  # asked again, with the validator's reason
        return "FIXED answer" + (" drop" if "drop" in message else "")
    return "bad answer"


def test_fan_out_validator_and_filter_match_local(cluster: LocalRayCluster,
                                                  tmp_path: Path) -> None:
    pool = [{"topic": f"t{i}"} for i in range(20)] + [{"topic": "t3"}] * 2
    got = {}
    with FakeOpenAIServer(responder=_steps_responder, latency=0.01) as server:
        for kind in ("local", "ray"):
            folder = tmp_path / kind
            write_project(folder)
            (folder / "prompts" / "q.txt").write_text("List questions about {{ topic }}")
            (folder / "prompts" / "a.txt").write_text(
                "Answer: {{ question }} {{ error_message }}")
            p = DataGenerationPipeline(config=folder / "config.yaml", base_url=server.base_url)
            p.step("question", prompt=folder / "prompts" / "q.txt",
                   extract=lambda text: json.loads(text), one_to_many=True)
            p.step("answer", prompt=folder / "prompts" / "a.txt", max_retries=2,
                   validate=lambda output: "FIXED" in output,
                   keep=lambda output: "drop" not in output)
            server.reset()
            result = p.run_sync(pool, executor=executor(kind))
            requests = server.request_count
            records = lines_of(result.files.results)
            dropped = lines_of(result.files.dropped)
            keys = [r["key"] for r in records]
            assert len(keys) == len(set(keys)) and not lines_of(result.files.failures)
            assert result.manifest["dropped"]["total"] == len(dropped) > 0
            assert result.manifest["counts"]["failed"] == 0
            server.reset()
            again = p.run_sync(pool, executor=executor(kind), resume=True)
            assert server.request_count == 0
            assert len(lines_of(again.files.results)) == len(records)
            got[kind] = (sorted(keys), sorted(r["key"] for r in dropped), requests)
    assert got["ray"] == got["local"]


def test_a_repeated_run_pays_nothing_whatever_the_shard_count(cluster: LocalRayCluster,
                                                              tmp_path: Path) -> None:
    """The response cache answers a repeated run of the same requests (on by default),
    whether the run before it had the same shard count, another one (the default count is
    the cluster's CPUs: it changes when a node joins), or ran in one process. Each shard
    caches in a file of its own per shard count: before the fix a run with another count,
    or in one process, found none of the answers and paid for every one again."""
    write_project(tmp_path)
    pool = make_pool(40)
    paid = []
    with FakeOpenAIServer(responder=topic_draft, latency=0.01) as server:
        for run in ("local", 3, 4, "local", 3):
            p = DataGenerationPipeline(config=tmp_path / "config.yaml",
                                       base_url=server.base_url)
            server.reset()
            result = p.run_sync(pool, extract_function=p.make_default_extractor(),
                                executor="local" if run == "local" else RayExecutor(shards=run))
            assert result.status == "completed" and len(result) == 40
            paid.append(server.request_count)
            if len(paid) > 1:
                assert result.manifest["calls"]["cache_hits"] == 40, run
    assert paid == [40, 0, 0, 0, 0]


def test_a_cluster_run_first_then_another_count_pays_nothing(cluster: LocalRayCluster,
                                                             tmp_path: Path) -> None:
    write_project(tmp_path)
    pool = make_pool(30)
    paid = []
    with FakeOpenAIServer(responder=topic_draft, latency=0.01) as server:
        for run in (2, 5, "local"):
            p = DataGenerationPipeline(config=tmp_path / "config.yaml",
                                       base_url=server.base_url)
            server.reset()
            p.run_sync(pool, extract_function=p.make_default_extractor(),
                       executor="local" if run == "local" else RayExecutor(shards=run))
            paid.append(server.request_count)
    assert paid == [30, 0, 0]


def test_a_rejected_answer_read_from_the_family_is_not_served_again(tmp_path: Path) -> None:
    """An answer read from the cache's family (see above) that the validator rejects is
    asked again (the retried request is the same request: no ``error_message`` in the
    prompt), and the run ends with the fresh answers, paying once per item; the
    tombstone that keeps the family's copy from being served on a later run is checked
    below."""
    write_project(tmp_path)
    pool = [{"topic": f"t{i}", "word_count": "5"} for i in range(6)]
    reply = {"text": "bad"}
    with FakeOpenAIServer(responder=lambda body: reply["text"]) as server:
        for attempt in ("first", "second"):
            p = DataGenerationPipeline(config=tmp_path / "config.yaml",
                                       base_url=server.base_url)
            p.step("say", prompt=tmp_path / "prompts" / "user.txt", max_retries=2,
                   validate=None if attempt == "first" else (lambda output: output == "good"))
            server.reset()
            result = p.run_sync(pool)
            if attempt == "first":  # its answers, in a shard cache of another count
                output = tmp_path / "output"
                (output / ".datagen_cache.sqlite").rename(
                    output / ".datagen_cache.shard-0-of-7.sqlite")
                for suffix in ("-wal", "-shm"):
                    (output / f".datagen_cache.sqlite{suffix}").unlink(missing_ok=True)
                reply["text"] = "good"
    assert result.status == "completed"
    assert [r["steps"]["say"]["output"] for r in lines_of(result.files.results)] == \
        ["good"] * 6
    assert server.request_count == 6 and not lines_of(result.files.failures)


def test_cache_family_tombstones(tmp_path: Path) -> None:
    from datagen.llm.cache import ResponseCache, cache_family
    from datagen.llm.types import Completion, Usage

    answer = Completion(text="hello", finish_reason="stop", usage=Usage(3, 1), model="m",
                        latency_s=0.0)
    configured = tmp_path / ".datagen_cache.sqlite"
    old = ResponseCache(tmp_path / ".datagen_cache.shard-1-of-3.sqlite")
    old.put("k", answer)
    old.put("j", answer)
    old.close()
    assert cache_family(configured) == [configured,
                                        tmp_path / ".datagen_cache.shard-1-of-3.sqlite"]
    new = ResponseCache(tmp_path / ".datagen_cache.shard-0-of-4.sqlite",
                        cache_family(configured))
    hit = new.get("k")
    assert hit is not None and hit.text == "hello"
    new.reject("k")
    assert new.get("k") is None
    new.close()
    again = ResponseCache(tmp_path / ".datagen_cache.shard-0-of-4.sqlite",
                          cache_family(configured))
    assert again.get("k") is None  # the tombstone outlives the process
    copied = again.get("j")  # read from the family, then kept in its own file
    assert copied is not None and copied.text == "hello"
    again.put("k", answer)  # a fresh answer replaces the tombstone
    got = again.get("k")
    assert got is not None and got.text == "hello"
    again.close()
    alone = ResponseCache(tmp_path / ".datagen_cache.shard-0-of-4.sqlite")
    assert alone.get("j") is not None  # copied: found without the family
    alone.reject("j")  # no family: deleted, as before
    alone.close()
