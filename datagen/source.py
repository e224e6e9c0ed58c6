"""Hands a pool's items to the workers: one at a time, checked, keyed (repeats numbered,
samples copied), skipping what a resumed run has done."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DataPoolError
from datagen.pool import Check, Pool, PoolItem, freeze, to_item
from datagen.seen import SeenSet


class ItemSource:
    """Hands out checked, keyed items to the workers, one at a time, in pool order.

    Workers share one source; for an async iterable a lock keeps two workers from
    advancing it at once (an async generator cannot be re-entered). ``samples`` > 1 hands
    out each item that many times, keyed ``<key>#i``. ``check`` runs on every item unless
    the pool was pre-checked whole.
    """

    def __init__(self, pool: Pool, make_item: Callable[..., PoolItem] | None = None,
                 check: Check | None = None, samples: int = 1,
                 todo: bytearray | None = None, repeats: dict[int, int] | None = None
                 ) -> None:
        """``todo`` (a pre-checked list or file, resumed): 1 for each position to hand
        out; the others are done and not even read. ``repeats`` then numbers the
        repeats of identical items (position -> occurrence), as counted over the whole
        pool when it was checked."""
        self.pool = pool
        self._make_item = make_item or to_item
        # decoded from a file (a cluster shard's items too): no copy needed
        self._fresh = isinstance(pool.source, Path) or pool.indexed
        self._check = check
        self._samples = self.samples = samples
        self._pending: list[PoolItem] = []
        self._sync: Iterator[tuple[int, Any]] | None = None
        self._async: AsyncIterator[Any] | None = None
        if pool.is_async():
            self._async = pool.source.__aiter__()
        else:
            self._sync = pool.numbered(todo)
        self._todo = todo
        self._next_position = 0  # with todo: the positions before it are handed or skipped
        self.on_skip: Callable[[int], None] = lambda keys: None  # done keys passed over
        self._index = 0
        self._lock: Any = None
        self.exhausted = False
        self._given = repeats
        self._seen = SeenSet()  # content fingerprints of the items handed out so far
        self._repeats: dict[str, int] = {}  # content key -> occurrences, repeats only

    def reopen(self) -> ItemSource:
        """A new source over the same pool from its first item, with the same keys (a
        list or a file, already checked whole: batch mode's rounds re-read the pool)."""
        if not self.pool.reiterable:
            raise DataPoolError("a one-pass pool cannot be read again: spill() it first")
        return ItemSource(self.pool, self._make_item, None, self._samples, self._todo,
                          self._given)

    async def spill(self, path: Path) -> ItemSource:
        """Write every item of a one-pass pool (a generator, an async iterator) to a JSONL
        file, each checked as it is read, and return a source over that file. Call it
        before anything else reads this source."""
        count = 0
        with open(path, "wb") as fh:
            while (pair := await self._next_raw()) is not None:
                index, raw = pair
                item = self._make_item(index, raw)
                if self._check is not None:
                    self._check(item)
                fh.write(orjson.dumps(freeze(raw, index)) + b"\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        return ItemSource(Pool(path, count, reiterable=True), self._make_item, None,
                          self._samples)

    async def next(self) -> PoolItem | None:
        """The next item (shape checked, key assigned), or None when the pool is done."""
        if self._pending:
            return self._pending.pop()
        pair = await self._next_raw()
        if pair is None:
            return None
        item = self._make_item(*pair, self._fresh)
        if self._check is not None:
            self._check(item)
        if self._given is not None:
            count = self._given.get(item.index, 0)
            if count:
                item = replace(item, occurrence=count, variant=count * self._samples)
        elif self._seen.add(int(item.content_key[:16], 16)):
            count = self._repeats.get(item.content_key, 1)
            self._repeats[item.content_key] = count + 1
            item = replace(item, occurrence=count, variant=count * self._samples)
        if self._samples == 1:
            return item
        copies = [replace(item, sample=i, variant=item.variant + i)
                  for i in range(self._samples)]
        self._pending = copies[:0:-1]  # handed out in order: #0 now, then #1, #2...
        return copies[0]

    async def _next_raw(self) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        if self._sync is not None:
            try:
                index, raw = next(self._sync)
            except StopIteration:
                self.exhausted = True
                self._passed(len(self._todo) if self._todo is not None else 0)
                return None
            except DataPoolError:
                raise
            except Exception as exc:  # the user's iterator failed: a pipeline-level fault
                raise self._failed(exc) from exc
            self._passed(index)
            self._index = index + 1
            return index, raw
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

    def _passed(self, position: int) -> None:
        """Count the done positions ``todo`` skipped before ``position``."""
        if self._todo is not None and position > self._next_position:
            self.on_skip((position - self._next_position) * self._samples)
        self._next_position = max(self._next_position, position + 1)

    def _failed(self, exc: Exception) -> DataPoolError:
        self.exhausted = True
        return DataPoolError(
            f"the data pool raised {type(exc).__name__} while producing item {self._index}: "
            f"{exc}"
        )
