"""The data pool: a list, any iterable (generators too), an async iterable, or the path
of a JSONL file, read lazily, one item at a time.

Each item of the single-step form is ``{"user_prompt_kwargs": {...},
"system_prompt_kwargs": {...}}``; other keys are kept and written to the record under
``meta``. A malformed item is an error that names its index.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
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
from datagen.seen import SeenSet

ITEM_SHAPE = '{"user_prompt_kwargs": {...}, "system_prompt_kwargs": {...}}'
_RESERVED = ("user_prompt_kwargs", "system_prompt_kwargs")


@dataclass(frozen=True)
class PoolItem:
    index: int
    user_kwargs: Mapping[str, Any]
    system_kwargs: Mapping[str, Any]
    meta: Mapping[str, Any]
    occurrence: int = 0  # how many identical items came before this one in the pool
    sample: int | None = None  # run.samples > 1: which sample of the item this is
    variant: int = 0  # 0 for the first copy; repeats and samples count up (their seeds)

    @cached_property
    def content_key(self) -> str:
        """A stable hash of the item's content (not its position)."""
        payload = orjson.dumps({"u": self.user_kwargs, "s": self.system_kwargs,
                                "m": self.meta}, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(payload, digest_size=16).hexdigest()

    @property
    def key(self) -> str:
        """Resume and cache identity: the content hash, plus ``-n`` for the n-th repeat of
        an identical item (so ``[item] * 10`` is ten items, not one), plus ``#i`` for
        sample i when a run makes several samples per item."""
        return item_key(self.content_key, self.occurrence, self.sample)


def item_key(content_key: str, occurrence: int, sample: int | None) -> str:
    """See :attr:`PoolItem.key`."""
    key = content_key if occurrence == 0 else f"{content_key}-{occurrence}"
    return key if sample is None else f"{key}#{sample}"


MAX_DEPTH = 64
_JSON_SCALARS = (str, int, float, bool, type(None))


def _problem(value: Any, path: str, depth: int) -> str | None:
    """What keeps ``value`` from being a JSON value, naming the field; None if nothing."""
    if depth > MAX_DEPTH:
        top = ".".join(path.split(".")[:2])
        return f"field {top} is nested deeper than {MAX_DEPTH} levels: flatten it"
    if isinstance(value, float) and not math.isfinite(value):
        return (f"field {path} is {value!r}: JSON has no NaN or infinity; use null or a "
                "number")
    if isinstance(value, _JSON_SCALARS):
        return None
    if isinstance(value, (bytes, bytearray)):
        return f"field {path} is bytes: decode it to text (value.decode()) first"
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return (f"field {path + '.' if path else ''}{k!r} has a key that is "
                        f"{a_type(k)}, not a string: JSON keys are strings")
            found = _problem(v, f"{path}.{k}" if path else k, depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _problem(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    return (f"field {path} is {a_type(value)}: items hold JSON values (text, numbers, "
            "true/false, null, lists, dicts); convert it (e.g. str(value) or "
            "value.isoformat()) first")


def freeze(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A JSON-safe deep copy of one pool item, made when it is pulled: a generator that
    yields the same dict again and again (mutating it between yields) cannot change an
    item after it is taken, and what is not JSON is refused here, naming the field,
    before anything is sent. Tuples become lists (documented); nothing else is converted.
    """
    try:
        dumped = orjson.dumps(raw)
    except (orjson.JSONEncodeError, TypeError):
        dumped = None
    if dumped is None or (b"null" in dumped and _problem(raw, "", 0)):
        problem = _problem(raw, "", 0) or "it cannot be written as JSON"
        raise DataPoolError(f"data pool item {index}: {problem}")
    frozen: dict[str, Any] = orjson.loads(dumped)
    return frozen


def _split(index: int, raw: Any) -> tuple[Any, Any, dict[str, Any]]:
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
    return user, system, {k: v for k, v in raw.items() if k not in _RESERVED}


def to_item(index: int, raw: Any, fresh: bool = False) -> PoolItem:
    """Check one raw entry of the single-step form and wrap it (a frozen copy, unless
    ``fresh``: just decoded from a file, shared with nobody); errors name the index and
    the fix."""
    user, system, meta = _split(index, raw)  # the shape first: its messages are clearest
    if not fresh:
        user, system, meta = _parts(freeze(raw, index))
    return PoolItem(index, user, system, meta)


def _parts(item: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    system = item.get("system_prompt_kwargs")
    return (item["user_prompt_kwargs"], {} if system is None else system,
            {k: v for k, v in item.items() if k not in _RESERVED})


def plain_item(index: int, raw: Any, fresh: bool = False) -> PoolItem:
    """Check one raw entry of a multi-step pipeline (a dict of fields) and wrap it."""
    if not isinstance(raw, Mapping):
        raise DataPoolError(f"data pool item {index} is {a_type(raw)}, not a dict. Items of a "
                            "multi-step pipeline are dicts of fields the templates use.")
    return PoolItem(index, raw if fresh else freeze(raw, index), {}, {})


def _read_jsonl(path: Path, keep: bytearray | None = None) -> Iterator[tuple[int, Any]]:
    """(position, item) of each non-blank line; with ``keep``, only the positions it
    marks, the others not even parsed."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator's finally
    except OSError as exc:
        raise DataPoolError(f"cannot read the data pool file {path}: {exc.strerror}") from None
    position = -1
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            position += 1
            if keep is not None and (position >= len(keep) or not keep[position]):
                continue
            try:
                yield position, orjson.loads(line)
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
        return (raw for _, raw in self.numbered())

    def numbered(self, keep: bytearray | None = None) -> Iterator[tuple[int, Any]]:
        """(position, item) pairs; with ``keep`` (a list or a file), only the positions
        it marks, the others not read."""
        if isinstance(self.source, Path):
            return _read_jsonl(self.source, keep)
        if keep is None:
            return enumerate(self.source)
        source = self.source
        return ((i, source[i]) for i, flag in enumerate(keep) if flag)

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


Check = Callable[[PoolItem], None]


def checked_items(pool: Pool, make_item: Callable[..., PoolItem],
                  check: Check) -> Iterator[PoolItem]:
    """Every item of a pool, shaped and checked: the one place items are checked, for
    the pre-check of a list or file before anything is sent, for the dry run, and (item
    by item) for a generator as it is pulled."""
    fresh = isinstance(pool.source, Path)  # decoded from the file here: no copy needed
    for index, raw in enumerate(pool.raw_items()):
        item = make_item(index, raw, fresh)
        check(item)
        yield item


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
        self._make_item = make_item or to_item
        self._fresh = isinstance(pool.source, Path)  # decoded from a file: no copy needed
        self._check = check
        self._samples = samples
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

    @property
    def samples(self) -> int:
        """The copies of each item handed out (run.samples)."""
        return self._samples

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
