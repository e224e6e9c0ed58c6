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

import dataclasses
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from datagen.errors import OutputError

log = logging.getLogger("datagen.store")
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

    @classmethod
    def create(cls, output_dir: str | Path, experiment_name: str, time_stamp: bool,
               now: datetime | None = None) -> RunFiles:
        directory = Path(output_dir).expanduser()
        if "/" in experiment_name or "\\" in experiment_name:
            raise OutputError(
                f"experiment_name {experiment_name!r} must be a plain name, not a path; "
                "put folders in output_dir"
            )
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
        stem = experiment_name
        if time_stamp:
            stem = f"{experiment_name}_{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}"
        files = cls.for_stem(directory, stem)
        n = 2
        while time_stamp and files.results.exists():  # two runs in the same second
            files = cls.for_stem(directory, f"{stem}_{n}")
            n += 1
        if files.results.exists():
            raise OutputError(
                f"{files.results} already exists and would be mixed with this run's output. "
                "Turn on output_data.need_time_stamp, choose another experiment_name, "
                "or move the old file away."
            )
        return files

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
        )


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


@dataclasses.dataclass
class ResultsIndex:
    """What a results file already holds: the keys done, and lines that do not parse."""

    keys: set[str]
    lines: int
    unparseable: int


def read_index(path: Path) -> ResultsIndex:
    keys: set[str] = set()
    lines = bad = 0
    if not path.exists():
        return ResultsIndex(keys, 0, 0)
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            lines += 1
            try:
                key = orjson.loads(line).get("key")
            except (orjson.JSONDecodeError, AttributeError):
                bad += 1
                continue
            if isinstance(key, str):
                keys.add(key)
    if bad:
        log.warning("%s: %d line(s) are not valid JSON records and were ignored", path, bad)
    return ResultsIndex(keys, lines, bad)


class JsonlSink:
    """Appends complete lines to a JSONL file; opened on the first line.

    Each line goes out in one ``write`` and is flushed to the OS at once; ``fsync`` (to
    the disk) runs at most every ``fsync_interval`` seconds (0: after every line) and at
    close, so a power cut loses at most that much, a killed process nothing.
    """

    def __init__(self, path: Path, fsync_interval: float = 1.0) -> None:
        self.path = path
        self.fsync_interval = fsync_interval
        self._fh: IO[bytes] | None = None
        self._last_sync = time.monotonic()
        self.lines = 0

    def write_line(self, line: bytes) -> None:
        if self._fh is None:
            try:
                self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the run
            except OSError as exc:
                raise OutputError(f"cannot open {self.path} for writing: {exc.strerror}") from None
        self._fh.write(line)
        self._fh.flush()
        self.lines += 1
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (a crash leaves the old one or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(manifest, default=_default, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def iso_now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")

