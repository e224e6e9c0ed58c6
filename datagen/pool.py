"""The data pool: a list, any iterable (generators too), an async iterable, or the path
of a JSONL file, read lazily, one item at a time.

Each item of the single-step form is ``{"user_prompt_kwargs": {...},
"system_prompt_kwargs": {...}}``; other keys are kept and written to the record under
``meta``. A malformed item is an error that names its index.
"""

from __future__ import annotations

import hashlib
import os
import random
from array import array
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)  # fmt: skip
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DataPoolError, a_type

ITEM_SHAPE = '{"user_prompt_kwargs": {...}, "system_prompt_kwargs": {...}}'
_RESERVED = ("user_prompt_kwargs", "system_prompt_kwargs")


@dataclass(frozen=True)
class PoolItem:
    index: int
    user_kwargs: Mapping[str, Any]
    system_kwargs: Mapping[str, Any]
    meta: Mapping[str, Any]
    occurrence: int = 0  # how many identical items came before this one in the pool

    @cached_property
    def content_key(self) -> str:
        """A stable hash of the item's content (not its position)."""
        payload = orjson.dumps(
            {"u": self.user_kwargs, "s": self.system_kwargs, "m": self.meta},
            option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
            default=repr,
        )
        return hashlib.blake2b(payload, digest_size=16).hexdigest()

    @property
    def key(self) -> str:
        """Resume and cache identity: the content hash, plus ``-n`` for the n-th repeat of
        an identical item (so ``[item] * 10`` is ten items, not one)."""
        return self.content_key if self.occurrence == 0 else f"{self.content_key}-{self.occurrence}"


def to_item(index: int, raw: Any) -> PoolItem:
    """Check one raw pool entry and wrap it; errors name the index and the fix."""
    if not isinstance(raw, Mapping):
        raise DataPoolError(
            f"data pool item {index} is {a_type(raw)}, not a dict. "
            f"Each item must look like {ITEM_SHAPE}."
        )
    if "user_prompt_kwargs" not in raw:
        keys = ", ".join(map(str, raw)) or "none"
        raise DataPoolError(
            f"data pool item {index} has no 'user_prompt_kwargs' (its keys: {keys}). "
            f"Each item must look like {ITEM_SHAPE}."
        )
    user = raw["user_prompt_kwargs"]
    system = raw.get("system_prompt_kwargs")
    system = {} if system is None else system
    for name, value in (("user_prompt_kwargs", user), ("system_prompt_kwargs", system)):
        if not isinstance(value, Mapping):
            raise DataPoolError(
                f"data pool item {index}: '{name}' must be a dict of template variables, "
                f"not {a_type(value)}"
            )
    meta = {k: v for k, v in raw.items() if k not in _RESERVED}
    return PoolItem(index, user, system, meta)


def _read_jsonl(path: Path) -> Iterator[Any]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator's finally
    except OSError as exc:
        raise DataPoolError(f"cannot read the data pool file {path}: {exc.strerror}") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise DataPoolError(
                    f"{path}, line {lineno}: not valid JSON ({exc}). Each line of a data pool "
                    "file must be one JSON object."
                ) from None


@dataclass
class Pool:
    """A data pool made ready to iterate: its size when known, and whether it can be
    read twice (then every item is checked before the first request is sent)."""

    source: Any
    total: int | None
    reiterable: bool

    def raw_items(self) -> Iterator[Any]:
        if isinstance(self.source, Path):
            return _read_jsonl(self.source)
        return iter(self.source)

    def is_async(self) -> bool:
        return isinstance(self.source, AsyncIterable) and not isinstance(self.source, Iterable)


def open_pool(data_pool: Any) -> Pool:
    """Classify what the user passed as a data pool; raise if it cannot be one."""
    if isinstance(data_pool, (str, os.PathLike)):
        path = Path(data_pool)
        if not path.is_file():
            raise DataPoolError(
                f"data pool file not found: {path}. Pass a list of items, an iterable, "
                "or the path of an existing JSONL file."
            )
        return Pool(path, None, reiterable=True)  # counted by the pre-check that reads it
    if isinstance(data_pool, Mapping):
        raise DataPoolError(
            "the data pool is a single dict; pass a list of items, e.g. [item], "
            f"where each item looks like {ITEM_SHAPE}"
        )
    if isinstance(data_pool, (bytes, bytearray)):
        raise DataPoolError("the data pool is bytes; pass a list of items or a JSONL path")
    if isinstance(data_pool, Sequence):
        return Pool(data_pool, len(data_pool), reiterable=True)
    if isinstance(data_pool, (Iterable, AsyncIterable)):
        size: int | None = len(data_pool) if isinstance(data_pool, Sized) else None
        return Pool(data_pool, size, reiterable=False)
    raise DataPoolError(
        f"the data pool must be a list, an iterable of items or the path of a JSONL file, "
        f"not {a_type(data_pool)}"
    )


def seeded_sample(items: Iterable[Any], size: int | None, seed: int) -> tuple[list[Any], int]:
    """A seeded reservoir sample in pool order (all items when ``size`` is None), and the
    pool's size. Streams: only the sample is held."""
    if size is None:
        everything = list(items)
        return everything, len(everything)
    rng = random.Random(seed)
    kept: list[tuple[int, Any]] = []
    n = 0
    for n, item in enumerate(items, start=1):
        if len(kept) < size:
            kept.append((n, item))
        else:
            j = rng.randrange(n)
            if j < size:
                kept[j] = (n, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])], n


class SeenSet:
    """Which 64-bit fingerprints were seen: open addressing in an ``array('Q')``.

    Written by hand because the alternatives cost memory per item: a Python set or dict
    entry is ~70-100 bytes, which for a streamed million-item pool is ~100 MB of growth;
    here it is 16 bytes (8-byte slots at most half full). A fingerprint collision (odds
    ~n^2 / 2^65) could only mis-number an item as a repeat, the same way on every run, so
    resume stays consistent.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._slots = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0

    def add(self, fingerprint: int) -> bool:
        """Add; return True if it was there already."""
        fingerprint = fingerprint or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        i = fingerprint & mask
        while True:
            value = slots[i]
            if value == 0:
                slots[i] = fingerprint
                self._count += 1
                if self._count * 2 > len(slots):
                    self._grow()
                return False
            if value == fingerprint:
                return True
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(8 * len(old) * 2))
        self._mask = len(self._slots) - 1
        self._count = 0
        for value in old:
            if value:
                self.add(value)

    def __len__(self) -> int:
        return self._count


class ItemSource:
    """Hands out checked, keyed items to the workers, one at a time, in pool order.

    Workers share one source; for an async iterable a lock keeps two workers from
    advancing it at once (an async generator cannot be re-entered).
    """

    def __init__(self, pool: Pool,
                 make_item: Callable[[int, Any], PoolItem] | None = None) -> None:
        self._make_item = make_item or to_item
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if pool.is_async():
            self._async = pool.source.__aiter__()
        else:
            self._sync = pool.raw_items()
        self._index = 0
        self._lock: Any = None
        self.exhausted = False
        self._seen = SeenSet()  # content fingerprints of the items handed out so far
        self._repeats: dict[str, int] = {}  # content key -> occurrences, repeats only

    async def next(self) -> PoolItem | None:
        """The next item (shape checked, key assigned), or None when the pool is done."""
        pair = await self._next_raw()
        if pair is None:
            return None
        item = self._make_item(*pair)
        if not self._seen.add(int(item.content_key[:16], 16)):
            return item
        count = self._repeats.get(item.content_key, 1)
        self._repeats[item.content_key] = count + 1
        return replace(item, occurrence=count)

    async def _next_raw(self) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        if self._sync is not None:
            try:
                raw = next(self._sync)
            except StopIteration:
                self.exhausted = True
                return None
            except DataPoolError:
                raise
            except Exception as exc:  # the user's iterator failed: a pipeline-level fault
                raise self._failed(exc) from exc
        else:
            import asyncio

            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self.exhausted:
                    return None
                assert self._async is not None
                try:
                    raw = await self._async.__anext__()
                except StopAsyncIteration:
                    self.exhausted = True
                    return None
                except Exception as exc:  # the user's iterator failed
                    raise self._failed(exc) from exc
        index = self._index
        self._index += 1
        return index, raw

    def _failed(self, exc: Exception) -> DataPoolError:
        self.exhausted = True
        return DataPoolError(
            f"the data pool raised {type(exc).__name__} while producing item {self._index}: "
            f"{exc}"
        )
