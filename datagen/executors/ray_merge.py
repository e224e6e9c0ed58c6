"""The driver's side of a cluster run's files: the one results file (and failures, dropped,
meta) a single-process run would have written, fed by the shards' part files.

At the start the merged files are rebuilt from the parts (atomically: a driver killed
before, or mid-append, leaves nothing torn or doubled); then the driver tails the parts,
appending each new complete line to its merged file as it appears, every half second and
once more at the end. Results and dropped items are merged by key: a key the merged file
holds is never appended again, so the results file holds every record exactly once even
if a part ever held one twice (counted as ``duplicates``; the parts' lease makes that 0).
No Ray in this module.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from datagen.redact import get_logger
from datagen.seen import KeyIndex
from datagen.shards import ShardLayout
from datagen.store import JsonlSink, RunFiles

log = get_logger("datagen.pipeline")
KINDS = ("results", "failures", "dropped", "meta")


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def complete_lines(path: Path, offset: int) -> Iterator[tuple[int, bytes]]:
    """(end offset, line) of each complete line after ``offset`` (a last line still being
    written is left for later)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator's finally
    except FileNotFoundError:
        return
    with fh:
        fh.seek(offset)
        for line in fh:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield offset, line


@dataclass
class Stream:
    """One merged file, fed by the same file of every shard."""

    merged: Path
    parts: list[Path]
    by_key: bool
    offsets: list[int] = field(default_factory=list)
    keys: KeyIndex = field(default_factory=KeyIndex)
    lines: int = 0  # in the merged file
    new: int = 0  # appended by this run (after the rebuild)
    new_by_part: list[int] = field(default_factory=list)
    duplicates: int = 0
    unreadable: int = 0
    sink: JsonlSink | None = None

    def rebuild(self, fsync: float) -> None:
        self.offsets = [0] * len(self.parts)
        self.new, self.new_by_part = 0, [0] * len(self.parts)
        self.sink = JsonlSink(self.merged, fsync)  # opens the file on its first line
        if not self.merged.exists() and not any(p.exists() for p in self.parts):
            return  # nothing yet: the file appears with its first line, as in one process
        tmp = self.merged.with_name(self.merged.name + ".tmp")
        with open(tmp, "wb") as out:
            for i in range(len(self.parts)):
                for line in self._read(i, final=True):
                    out.write(line)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.merged)

    def tail(self, final: bool) -> list[bytes]:
        assert self.sink is not None
        out = []
        for i in range(len(self.parts)):
            for line in self._read(i, final):
                self.sink.write_line(line)
                self.new += 1
                self.new_by_part[i] += 1
                out.append(line)
        return out

    def _read(self, i: int, final: bool) -> Iterator[bytes]:
        for end, line in complete_lines(self.parts[i], self.offsets[i]):
            key = None
            if self.by_key:
                record = _parse(line)
                key = record.get("key") if record else None
                if not isinstance(key, str):
                    if not final:
                        return  # not readable yet (a shared filesystem catching up)
                    self.unreadable += 1
                    self.offsets[i] = end
                    log.warning("%s: an unreadable line was left out of %s",
                                self.parts[i], self.merged.name)
                    continue
            self.offsets[i] = end
            if key is not None:
                if key in self.keys:
                    self.duplicates += 1
                    log.error("%s: key %s is in the merged results already; not added again",
                              self.parts[i], key)
                    continue
                self.keys.add(key)
            self.lines += 1
            yield line

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class Merger:
    """Every merged file of a cluster run (see the module docstring)."""

    def __init__(self, files: RunFiles, layout: ShardLayout, count: int, fsync: float
                 ) -> None:
        parts = [layout.part(i) for i in range(count)]
        merged = {"results": files.results, "failures": files.failures,
                  "dropped": files.dropped, "meta": files.meta}
        self.streams = {kind: Stream(merged[kind], [getattr(p, kind) for p in parts],
                                     by_key=kind in ("results", "dropped"))
                        for kind in KINDS}
        self.fsync = fsync
        self.failed_by_kind: Counter[str] = Counter()
        self.resumed = 0  # records in the results file when the run started

    def rebuild(self) -> None:
        for stream in self.streams.values():
            stream.rebuild(self.fsync)
        self.resumed = self.streams["results"].lines + self.streams["dropped"].lines

    def tail(self, final: bool = False) -> list[bytes]:
        """Append what the parts added; returns the new result lines."""
        new: list[bytes] = []
        for kind, stream in self.streams.items():
            lines = stream.tail(final)
            if kind == "results":
                new = lines
            elif kind == "failures":
                for line in lines:
                    error = (_parse(line) or {}).get("error")
                    self.failed_by_kind[str((error or {}).get("kind", "unknown"))] += 1
        return new

    def count(self, kind: str) -> int:
        return self.streams[kind].new

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    def summary(self) -> dict[str, Any]:
        r = self.streams["results"]
        return {"records_merged": r.lines, "duplicates_left_out": r.duplicates
                + self.streams["dropped"].duplicates,
                "unreadable_lines": sum(s.unreadable for s in self.streams.values())}
