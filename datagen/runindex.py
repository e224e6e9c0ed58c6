"""Resume of a large run without reading it again: two index files beside its results.

- ``<stem>_done.idx``: one 16-byte entry per record or dropped item written: the key's
  64-bit digest, which file the line is in and where it ends. Resume reads it (16 MB for
  a million done items) and reads only the lines after the last one it covers, instead
  of every record (a gigabyte for a million records). Written buffered and never synced:
  a kill loses only the last entries, whose lines the tail read finds again. An index
  that does not fit its files (a file shorter than it says, edited by hand, an index
  from another run) is not used: the files are read whole and the index is rebuilt.
- ``<stem>_pool.idx``: for a pool file, the keys of each of its items and which are
  repeats, with the pool file's size and sha256. A resume whose pool file has the same
  bytes skips the items already done without parsing them (each item was checked in the
  run that wrote the index, with the same templates: the fingerprint says so).

Written by hand because no library keeps an append-only log of fixed-size digests with
file positions; the format is three struct fields and an orjson header.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from datagen import redact
from datagen.pool import PoolItem, item_key
from datagen.seen import KeyIndex, SeenSet, key_digest

log = redact.get_logger("datagen.runindex")

ENTRY = struct.Struct("<QQ")  # key digest; file tag << 62 | offset after the line
RESULTS, DROPPED = 0, 1
_OFFSET_MASK = (1 << 62) - 1
_FLUSH_BYTES = 1 << 16
POOL_FORMAT = 1


def done_path(results: Path) -> Path:
    return results.with_name(results.stem + "_done.idx")


def pool_path(results: Path) -> Path:
    return results.with_name(results.stem + "_pool.idx")


class DoneLog:
    """Appends an entry for each line written to the results or dropped file.

    Entries are kept in order and written in blocks; the lines they describe were
    written before them, so a kill can only lose a suffix of the entries (found again by
    the tail read). If a block cannot be written the index is deleted: a gap in the
    middle would hide records from the next resume.

    ``begin``: this log starts the index (emptied on the first write): its entries
    cover the files from their first line (a new run's, or a rebuild). Otherwise it only
    appends to the index there; when there is none (removed after a failed write) it
    writes nothing: entries for the last lines alone would pass for the whole run.
    """

    def __init__(self, path: Path, begin: bool = False) -> None:
        self.path = path
        self.begin = begin
        self._buffer = bytearray()
        self._fh: IO[bytes] | None = None
        self.broken = False

    def add(self, key: str, tag: int, end: int) -> None:
        self.add_digest(key_digest(key), tag, end)

    def add_digest(self, digest: int, tag: int, end: int) -> None:
        if self.broken:
            return
        self._buffer += ENTRY.pack(digest, tag << 62 | end)
        if len(self._buffer) >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.broken or not self._buffer:
            return
        try:
            if self._fh is None and not self._open():
                return
            assert self._fh is not None
            self._fh.write(self._buffer)
            self._fh.flush()
        except OSError as exc:
            self._break(exc)
        self._buffer.clear()

    def _open(self) -> bool:
        """Open the index to write; False (and broken) when there is none to append to."""
        try:
            fd = os.open(self.path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if self.begin
                                                   else os.O_APPEND))
        except FileNotFoundError:
            log.info("%s is gone (it could not be written before): the next resume reads "
                     "the run's files whole", self.path.name)
            self.broken = True
            self._buffer.clear()
            return False
        self._fh = os.fdopen(fd, "wb")
        return True

    def _break(self, exc: OSError) -> None:
        log.warning("%s could not be written (%s): it is removed, and the next resume "
                    "reads the results file instead", self.path, exc.strerror or exc)
        self.broken = True
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()
        try:
            if self.begin and self._fh is None and not self.broken:
                self._open()  # no entry (empty files): an empty index, to append to
        except OSError as exc:
            self._break(exc)
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


@dataclass
class DoneIndex:
    """What a run's files already hold: the keys done, and how many records."""

    keys: KeyIndex
    records: int  # lines of the results file that are records
    unparseable: int = 0


def read_done(results: Path, dropped: Path, key_of: Callable[[bytes], str | None]
              ) -> DoneIndex:
    """The done keys of a run, from its index and the lines after the index's last
    entry, or from its files whole when the index is missing or does not fit them. Either
    way the index is left complete: entries for the lines read are appended (or it is
    rebuilt) before the run writes anything."""
    index = done_path(results)
    files = {RESULTS: results, DROPPED: dropped}
    found = _read_entries(index)
    if found is not None and not _fits(found, files, key_of):
        log.warning("%s does not match the run's files (edited since, or another run's?): "
                    "reading them whole", index.name)
        found = None
    rebuilt = found is None
    if found is None:
        with contextlib.suppress(OSError):
            index.unlink(missing_ok=True)
        found = _Entries(KeyIndex(), 0, {RESULTS: 0, DROPPED: 0}, [])
    keys, records, covered = found.keys, found.records, found.covered
    appended = DoneLog(index, begin=rebuilt)
    bad = 0
    for tag, path in files.items():
        for key, end in _lines_after(path, covered[tag], key_of):
            if key is None:
                bad += 1
                continue
            digest = key_digest(key)
            keys.add_digest(digest)
            appended.add_digest(digest, tag, end)
            records += tag == RESULTS
    appended.close()
    if bad:
        log.warning("%s: %d line(s) are not valid JSON records and were ignored", results,
                    bad)
    return DoneIndex(keys, records, bad)


_BLOCK = ENTRY.size * 65536


@dataclass
class _Entries:
    """What a done index holds: the keys, the records of the results file, where each
    file's indexed lines end, and (tag, digest, end) of each file's first and last."""

    keys: KeyIndex
    records: int
    covered: dict[int, int]
    probes: list[tuple[int, int, int]]


def _read_entries(index: Path) -> _Entries | None:
    """The index's entries, or None when there is no index or it is not one this module
    wrote. A partial last entry (a kill mid-write) is cut, so entries appended later
    stay aligned."""
    try:
        fh = open(index, "rb+")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s): reading the results instead", index, exc.strerror)
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        whole = size - size % ENTRY.size
        if whole != size:
            fh.truncate(whole)
        keys = KeyIndex(capacity=whole // ENTRY.size)
        covered = {RESULTS: 0, DROPPED: 0}
        firsts: dict[int, tuple[int, int, int]] = {}
        lasts: dict[int, tuple[int, int, int]] = {}
        records = 0
        while block := fh.read(min(_BLOCK, whole - fh.tell())):
            words = array("Q", block)
            if sys.byteorder != "little":
                words.byteswap()
            last = covered.copy()
            wheres = words[1::2]
            for where in wheres:
                tag = where >> 62
                if tag == RESULTS:
                    records += 1
                elif tag != DROPPED:
                    return None  # not an index this module wrote
                end = where & _OFFSET_MASK
                if end <= last[tag]:
                    return None  # entries of one file only move forward
                last[tag] = end
            for tag in (RESULTS, DROPPED):
                if tag not in firsts and last[tag]:
                    n = next(n for n, where in enumerate(wheres) if where >> 62 == tag)
                    firsts[tag] = (tag, words[2 * n], wheres[n] & _OFFSET_MASK)
                if last[tag] != covered[tag]:  # this file's last entry so far
                    n = wheres.index(tag << 62 | last[tag])
                    lasts[tag] = (tag, words[2 * n], last[tag])
            covered = last
            keys.add_digests(words[0::2])
    return _Entries(keys, records, covered, [*firsts.values(), *lasts.values()])


def _fits(found: _Entries, files: dict[int, Path],
          key_of: Callable[[bytes], str | None]) -> bool:
    """Whether the files still hold the lines the index covers: each as long, and the
    first and last line it lists for each file ending where it says, with the key it
    says. (A line removed or added by hand moves the lines after it, and an index copied
    from another run lists other keys.)"""
    for tag, end in found.covered.items():
        path = files[tag]
        size = path.stat().st_size if path.exists() else 0
        if end > size:
            return False
    for tag, digest, end in found.probes:
        line = _line_ending_at(files[tag], end)
        key = key_of(line) if line is not None else None
        if key is None or key_digest(key) != digest:
            return False
    return True


def _line_ending_at(path: Path, end: int) -> bytes | None:
    """The whole line of ``path`` that ends (with its newline) at offset ``end``, or None
    when no line ends there."""
    try:
        with open(path, "rb") as fh:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                return None
            start, tail = end - 1, b""
            while start > 0:
                begin = max(0, start - 65536)
                fh.seek(begin)
                chunk = fh.read(start - begin)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    return chunk[cut + 1:] + tail + b"\n"
                tail, start = chunk + tail, begin
            return tail + b"\n"
    except OSError:
        return None


def _lines_after(path: Path, start: int, key_of: Callable[[bytes], str | None]
                 ) -> Iterator[tuple[str | None, int]]:
    """(key or None, offset after the line) of each record line from ``start`` on."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        fh.seek(start)
        end = start
        for line in fh:
            end += len(line)
            if len(line) < 3:
                continue
            yield key_of(line), end


# ---- the pool file's index ----------------------------------------------------------

@dataclass
class Positions:
    """Each pool position's keys (``samples`` digests) and, for repeats of an identical
    item, which repeat it is."""

    samples: int
    digests: array[int] = field(default_factory=lambda: array("Q"))
    repeats: dict[int, int] = field(default_factory=dict)  # position -> occurrence
    _seen: SeenSet | None = field(default=None, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.digests) // self.samples

    def add(self, item: PoolItem) -> None:
        """The next position: ``item`` as the pool gives it (numbered as ItemSource
        numbers repeats)."""
        if self._seen is None:
            self._seen = SeenSet()
        occurrence = 0
        content = key_digest(item.content_key)  # also the key's digest of a first copy
        if self._seen.add(content):
            occurrence = self._counts.get(item.content_key, 1)
            self._counts[item.content_key] = occurrence + 1
            self.repeats[item.index] = occurrence
        if self.samples == 1:
            self.digests.append(content if occurrence == 0 else
                                key_digest(item_key(item.content_key, occurrence, None)))
        else:
            for i in range(self.samples):
                self.digests.append(key_digest(item_key(item.content_key, occurrence, i)))

    def todo(self, done: KeyIndex) -> bytearray:
        """1 for each position with a key not done, 0 for those wholly done."""
        return done.missing(self.digests, self.samples)

    def done_reset(self) -> None:
        """Free what only building needed."""
        self._seen, self._counts = None, {}


def pool_identity(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_positions(results: Path, pool: Path, positions: Positions, fingerprint: str
                    ) -> None:
    """The pool file's index, written whole (a temporary file renamed), or not at all."""
    target = pool_path(results)
    header = {"format": POOL_FORMAT, "pool": {**pool_identity(pool), "path": str(pool)},
              "samples": positions.samples, "positions": len(positions),
              "fingerprint": fingerprint,
              "repeats": [[k, v] for k, v in positions.repeats.items()]}
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(redact.redact_bytes(orjson.dumps(header)) + b"\n")
            fh.write(positions.digests.tobytes())
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("%s could not be written (%s): the next resume reads the pool whole",
                    target, exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def read_positions(results: Path, pool: Path, samples: int, fingerprint: str
                   ) -> Positions | None:
    """The pool file's index, if it was written for these bytes, samples and
    fingerprint; else None (the pool is read and checked whole)."""
    target = pool_path(results)
    try:
        with open(target, "rb") as fh:
            header = orjson.loads(fh.readline())
            body = fh.read()
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(header, dict) or header.get("format") != POOL_FORMAT or \
            header.get("samples") != samples or header.get("fingerprint") != fingerprint:
        return None
    try:
        identity = pool_identity(pool)
    except OSError:
        return None
    stated = header.get("pool") or {}
    if stated.get("size") != identity["size"] or stated.get("sha256") != identity["sha256"]:
        return None
    positions = Positions(samples)
    if len(body) != 8 * samples * int(header.get("positions", -1)):
        return None
    positions.digests.frombytes(body)
    positions.repeats = {int(k): int(v) for k, v in header.get("repeats") or []}
    return positions
