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
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)  # fmt: skip
from dataclasses import dataclass
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
    indexed: bool = False  # ``(index, item)`` pairs decoded from a file: a shard's items

    def raw_items(self) -> Iterator[Any]:
        return (raw for _, raw in self.numbered())

    def numbered(self, keep: bytearray | None = None) -> Iterator[tuple[int, Any]]:
        """(position, item) pairs; with ``keep`` (a list or a file), only the positions
        it marks, the others not read."""
        if self.indexed:  # a cluster shard's items come numbered
            return iter(self.source)
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
