"""Where a run's output goes: the JSONL sink, the failures file, the manifest.

Files of one run, for ``output_dir/experiment_name`` with a time stamp:

    demo_20261122_101500.jsonl            one line per finished item, as it finishes
    demo_20261122_101500_failures.jsonl   one line per failed item, with the reason
    demo_20261122_101500_manifest.json    config (no secrets), counts, tokens, timings
    demo_20261122_101500.log              the run's log, secrets redacted

Each record is serialised first and then written with a single ``write`` of one complete
line and flushed, so a crash can cut at most the line being written, never interleave two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from datagen import redact
from datagen.errors import OutputError
from datagen.lock import RunLock as RunLock  # re-exported
from datagen.lock import RunLockedError
from datagen.lock import iso_now as iso_now  # re-exported
from datagen.seen import KeyIndex

log = redact.get_logger("datagen.store")
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(value: Any) -> Any:
    """Serialise what orjson does not know: pydantic models, sets, paths."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps_line(record: Any) -> bytes:
    """One JSONL line (with its newline). Raises TypeError for unserialisable values."""
    return orjson.dumps(record, default=_default, option=_OPTIONS) + b"\n"


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The paths of one run's files."""

    results: Path
    failures: Path
    manifest: Path
    log: Path
    dropped: Path
    lock: Path

    @property
    def stem(self) -> str:
        return self.results.stem

    @property
    def meta(self) -> Path:
        return self.results.with_name(self.stem + "_meta.jsonl")

    @property
    def debug_dir(self) -> Path:
        return self.results.with_name(self.stem + "_debug")

    # batch mode: the ledger, the request files and results while needed, and a one-pass
    # pool (a generator) written out so that the rounds can read it again
    batches = property(lambda self: self.results.with_name(self.stem + "_batches.sqlite"))
    batch_dir = property(lambda self: self.results.with_name(self.stem + "_batches"))
    pool_copy = property(lambda self: self.results.with_name(self.stem + "_pool.jsonl"))

    def as_dict(self) -> dict[str, str]:
        return {name: str(getattr(self, name))
                for name in ("results", "failures", "dropped", "manifest", "log")}

    @classmethod
    def create(cls, output_dir: str | Path, experiment_name: str, time_stamp: bool,
               now: datetime | None = None) -> RunFiles:
        """A new run's file names (nothing is created but the folder); see
        :meth:`create_locked` for a run that is about to write them."""
        files, lock = cls.create_locked(output_dir, experiment_name, time_stamp, now)
        lock.release()
        return files

    @classmethod
    def create_locked(cls, output_dir: str | Path, experiment_name: str, time_stamp: bool,
                      now: datetime | None = None) -> tuple[RunFiles, RunLock]:
        """A new run's files, locked: the first free name (a second run started in the
        same second, or one that holds the lock of that name, gets ``_2``, ``_3``...)."""
        if "/" in experiment_name or "\\" in experiment_name:
            raise OutputError(f"experiment_name {experiment_name!r} must be a plain name, "
                              "not a path; put folders in output_dir")
        directory = _output_dir(output_dir)
        stem = experiment_name
        if time_stamp:
            stem = f"{experiment_name}_{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}"
        for n in range(1, 10_000):
            files = cls.for_stem(directory, stem if n == 1 else f"{stem}_{n}")
            if files.results.exists():
                if time_stamp:
                    continue
                raise OutputError(
                    f"{files.results} already exists and would be mixed with this run's "
                    "output. Turn on output_data.need_time_stamp, choose another "
                    "experiment_name, or resume it (resume=True).")
            try:
                lock = RunLock(files.lock).acquire()
            except RunLockedError:
                if time_stamp:
                    continue
                raise
            if files.results.exists():  # created meanwhile by a run that has finished
                lock.release()
                continue
            return files, lock
        raise OutputError(f"no free run name for {stem} in {directory}")

    @classmethod
    def latest(cls, output_dir: str | Path, experiment_name: str, time_stamp: bool
               ) -> RunFiles | None:
        """The newest existing run of this experiment, or None."""
        directory = Path(output_dir).expanduser()
        if not time_stamp:
            files = cls.for_stem(directory, experiment_name)
            return files if files.results.exists() else None
        pattern = re.compile(rf"^{re.escape(experiment_name)}_(\d{{8}}_\d{{6}})(?:_(\d+))?\.jsonl$")
        runs = []
        for path in directory.glob(f"{glob_escape(experiment_name)}_*.jsonl"):
            match = pattern.match(path.name)
            if match:
                runs.append(((match.group(1), int(match.group(2) or 1)), path.stem))
        if not runs:
            return None
        return cls.for_stem(directory, max(runs)[1])

    @classmethod
    def for_stem(cls, directory: Path, stem: str) -> RunFiles:
        return cls(
            results=directory / f"{stem}.jsonl",
            failures=directory / f"{stem}_failures.jsonl",
            manifest=directory / f"{stem}_manifest.json",
            log=directory / f"{stem}.log",
            dropped=directory / f"{stem}_dropped.jsonl",
            lock=directory / f"{stem}.lock",
        )


def _output_dir(output_dir: str | Path) -> Path:
    directory = Path(output_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output directory {directory}: {exc.strerror}. "
            "Set output_data.output_dir to a folder you can write to."
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(
            f"the output directory {directory} is not writable. "
            "Set output_data.output_dir to a folder you can write to."
        )
    return directory


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def repair_torn_tail(path: Path) -> int:
    """Cut a trailing partial line (a crash mid-write); returns the bytes removed.

    Every record is written as one ``write`` of a whole line, so only the last line of a
    file can be incomplete, and an incomplete line has no newline.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        # read back from the end until a newline is found
        block, end = 65536, size
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            chunk = fh.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s: removed a torn last line (%d bytes) left by an interrupted write",
                path, size - keep)
    return size - keep


_KEY_FIELD = b'"key":"'


def key_of(line: bytes) -> str | None:
    """The ``key`` of one record line. datagen writes ``index`` and ``key`` first, so the
    key is found without parsing the line (a million lines in about a second); anything
    else is parsed."""
    start = line.find(_KEY_FIELD, 0, 256)
    if start >= 0:
        start += len(_KEY_FIELD)
        end = line.find(b'"', start)
        if end > start and b"\\" not in line[start:end]:
            return line[start:end].decode("utf-8", "replace")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, str) else None


def read_keys(path: Path, offset: int, into: KeyIndex) -> int:
    """The keys of the whole lines of ``path`` from byte ``offset`` on, added to
    ``into``; returns the offset after the last whole line (batch mode reads what each
    round wrote)."""
    if not path.exists():
        return offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            key = key_of(line) if len(line) >= 3 else None
            if key is not None:
                into.add(key)
    return offset


class WriteError(OutputError):
    """A file of the run could not be written (disk full, permissions, I/O error)."""

    kind = "write_error"


def write_error(path: Path, exc: OSError) -> WriteError:
    hint = " (the disk is full: free space, then resume)" if exc.errno == 28 else ""
    return WriteError(f"cannot write {path}: {exc.strerror or exc}{hint}")


# Held around every append of a fenced sink: raises when this writer lost the files to a
# newer one (a cluster shard's lease, datagen.lease), so a stale writer never appends.
Fence = Callable[[], AbstractContextManager[None]]


class JsonlSink:
    """Appends complete lines to a JSONL file; opened on the first line.

    Each line goes out in one ``write`` and is flushed to the OS at once; ``fsync`` (to
    the disk) runs at most every ``fsync_interval`` seconds (0: after every line) and at
    close, so a power cut loses at most that much, a killed process nothing. Every line
    passes the redactor (no registered secret reaches the disk). A failed write raises
    :class:`WriteError` naming the file. With a ``fence``, each append happens inside it.

    ``indexed``: told each written line's key and the file's size after it (the run's
    done index, see :mod:`datagen.runindex`); every line of such a file needs its key.
    """

    def __init__(self, path: Path, fsync_interval: float = 1.0,
                 indexed: Callable[[str, int], None] | None = None,
                 fence: Fence | None = None) -> None:
        self.path = path
        self.fsync_interval = fsync_interval
        self.indexed = indexed
        self.fence = fence
        self._fh: IO[bytes] | None = None
        self._last_sync = time.monotonic()
        self._size = 0
        self.lines = 0

    def write_line(self, line: bytes, key: str | None = None) -> bytes:
        """Append ``line`` (the record of ``key``); returns the bytes written
        (redacted)."""
        if self.indexed is not None and key is None:
            raise ValueError(f"{self.path}: every line of an indexed file needs its key")
        line = redact.redact_bytes(line)
        if self.fence is None:
            return self._append(line, key)
        with self.fence():
            return self._append(line, key)

    def _append(self, line: bytes, key: str | None) -> bytes:
        try:
            if self._fh is None:
                self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the run
                self._size = os.fstat(self._fh.fileno()).st_size
            self._fh.write(line)
            self._fh.flush()
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(self._fh.fileno())
                self._last_sync = now
        except OSError as exc:
            self._abandon()
            raise write_error(self.path, exc) from None
        self.lines += 1
        self._size += len(line)
        if self.indexed is not None:
            self.indexed(key, self._size)  # type: ignore[arg-type]
        return line

    def _abandon(self) -> None:
        """After a failed write: cut the partial line, if any, and stop writing."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(OSError):
            repair_torn_tail(self.path)

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
            except OSError as exc:
                self._abandon()
                raise write_error(self.path, exc) from None
            self._fh = None


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file atomically (a crash leaves the old one or the new one), through
    the redactor; on failure no ``.tmp`` is left behind."""
    tmp = path.with_name(path.name + ".tmp")
    payload = redact.redact_bytes(orjson.dumps(data, default=_default,
                                               option=orjson.OPT_INDENT_2))
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        compact = redact.redact_bytes(orjson.dumps(data, default=_default))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _overwrite(path, compact):
            return  # a full disk: the file rewritten in the space it already has
        raise write_error(path, exc) from None


def _overwrite(path: Path, payload: bytes) -> bool:
    """Rewrite an existing file in place when ``payload`` fits in the space it already
    holds (so no new block is needed): how a run on a full disk still records why it
    stopped. Never torn: nothing is written unless it fits."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        if len(payload) > os.fstat(fd).st_size:
            return False
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(payload))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
