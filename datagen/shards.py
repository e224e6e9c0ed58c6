"""A run split into shards, for a cluster: which shard an item belongs to, where a shard's
files live, and what each shard reads.

An item's shard is a stable hash of its content key (never its position), so a resumed or
repeated run puts every item in the same shard, and every copy of an identical item (and
every sample and fan-out child of it) lands in one shard, numbered there in pool order
exactly as one process numbers it.

A run ``<stem>`` keeps its shards in ``<stem>.shards/`` beside its files:

    shards.json                      the shard count and the inputs (fixed for the run)
    input-0003.jsonl                 shard 3's items, ``[index, item]`` per line (spilled pools)
    <stem>.part-0003.jsonl           shard 3's records (its failures, dropped, manifest, log)
    part-0003.lease                  shard 3's attempt number: the writer's fence
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import ConfigError, DataPoolError
from datagen.pool import Pool, PoolItem
from datagen.seen import KeyIndex
from datagen.store import RunFiles

MakeItem = Callable[..., PoolItem]
Check = Callable[[PoolItem], None] | None


def shard_of(content_key: str, count: int) -> int:
    """The shard of an item: blake2b of its content key, modulo the shard count (the
    content key itself also seeds in-memory hash tables: a second hash keeps a shard's keys
    spread over them)."""
    digest = hashlib.blake2b(content_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_of_record(key: str, count: int) -> int:
    """The shard of a record, from its key (``<content key>[-n][#i][/j...]``)."""
    return shard_of(key[:32], count)


@dataclass(frozen=True)
class ShardLayout:
    """The paths of a run's shard folder."""

    folder: Path
    stem: str

    @classmethod
    def of(cls, files: RunFiles) -> ShardLayout:
        return cls(files.results.with_name(files.stem + ".shards"), files.stem)

    @property
    def meta(self) -> Path:
        return self.folder / "shards.json"

    def part(self, i: int) -> RunFiles:
        return RunFiles.for_stem(self.folder, f"{self.stem}.part-{i:04d}")

    def lease(self, i: int) -> Path:
        return self.folder / f"part-{i:04d}.lease"

    def input(self, i: int) -> Path:
        return self.folder / f"input-{i:04d}.jsonl"


@dataclass(frozen=True)
class ShardRun:
    """What one attempt of a shard is given (it travels to the worker that runs it)."""

    index: int
    count: int
    files: RunFiles  # the shard's part files
    lease: Path
    source: Path  # its spilled input, or the whole JSONL pool (then filtered by shard)
    spilled: bool
    cache: Path
    concurrency: int
    failures_from: int = 0  # bytes of its failures file from earlier runs: later lines are
    # this run's, and a retried attempt does not try those items again
    cache_family: tuple[Path, ...] = ()  # caches it reads when its own misses: the
    # configured one and the shard caches of other shard counts (never this run's: those
    # have writers on other nodes)


def cache_path(configured: Path, index: int, count: int) -> Path:
    """A shard's response cache: one SQLite file per shard beside the configured cache (a
    file on a shared folder has one writer at a time: the shard's current attempt). The
    same shard count gives every item the same cache again on a repeated run."""
    return configured.with_name(f"{configured.stem}.shard-{index}-of-{count}"
                                f"{configured.suffix}")


def shard_items(run: ShardRun, make_item: MakeItem) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` of every item of the shard, in pool order."""
    if run.spilled:
        with open(run.source, "rb") as fh:
            for line in fh:
                index, raw = orjson.loads(line)
                yield index, raw
        return
    for index, raw in enumerate(Pool(run.source, None, True).raw_items()):
        if shard_of(make_item(index, raw, True).content_key, run.count) == run.index:
            yield index, raw


@dataclass
class Spilled:
    """Items per shard of a spilled pool, and a digest of each shard's input."""

    counts: list[int]
    digests: list[str]


async def spill(pool: Pool, make_item: MakeItem, check: Check, layout: ShardLayout,
                count: int) -> Spilled:
    """Write a pool that is not a file (a list, a generator, an async iterable) to one
    input file per shard, each item checked as it is pulled (nothing has been sent yet)."""
    layout.folder.mkdir(parents=True, exist_ok=True)
    tmp = [layout.input(i).with_suffix(".jsonl.tmp") for i in range(count)]
    outs = [open(path, "wb") for path in tmp]  # noqa: SIM115 - closed below
    hashes = [hashlib.blake2b(digest_size=16) for _ in range(count)]
    counts = [0] * count
    try:
        async for index, raw in _raw(pool):
            item = make_item(index, raw)
            if check is not None:
                check(item)
            i = shard_of(item.content_key, count)
            line = orjson.dumps([index, raw]) + b"\n"
            outs[i].write(line)
            hashes[i].update(line)
            counts[i] += 1
    finally:
        for out in outs:
            out.close()
    for i, path in enumerate(tmp):
        os.replace(path, layout.input(i))
    return Spilled(counts, [h.hexdigest() for h in hashes])


async def _raw(pool: Pool) -> AsyncIterator[tuple[int, Any]]:
    index = 0
    if pool.is_async():
        iterator = pool.source.__aiter__()
        while True:
            try:
                raw = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise _failed(exc, index) from exc
            yield index, raw
            index += 1
    items: Iterable[Any] = pool.raw_items()
    iterator_ = iter(items)
    while True:
        try:
            raw = next(iterator_)
        except StopIteration:
            return
        except DataPoolError:
            raise
        except Exception as exc:
            raise _failed(exc, index) from exc
        yield index, raw
        index += 1


def _failed(exc: Exception, index: int) -> DataPoolError:
    return DataPoolError(f"the data pool raised {type(exc).__name__} while producing item "
                         f"{index}: {exc}")


def file_digest(path: Path) -> str:
    """A digest of a pool file's bytes (a resumed run re-runs every shard when it changed)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def failure_keys_since(path: Path, offset: int, into: KeyIndex) -> int:
    """Add the keys of the failure lines written after byte ``offset`` (this run's: a
    retried attempt does not try them again); returns how many."""
    if not path.exists():
        return 0
    added = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            try:
                key = orjson.loads(line).get("key")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(key, str):
                into.add(key)
                added += 1
    return added


def not_shared(folder: Path, problems: list[str]) -> ConfigError:
    """The error of a run folder some node of the cluster cannot see (or write in)."""
    return ConfigError(
        f"the run folder {folder} is not shared by every node of the cluster: "
        + "; ".join(problems) + ". A cluster run's shards write their files from every "
        "node: put output_data.output_dir (and the pool and pipeline files) on a "
        "filesystem every node mounts at the same path (NFS, a cloud file share), e.g. "
        "--output /mnt/shared/out")
