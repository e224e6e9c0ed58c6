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
import os
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from datagen.errors import OutputError

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
    def for_stem(cls, directory: Path, stem: str) -> RunFiles:
        return cls(
            results=directory / f"{stem}.jsonl",
            failures=directory / f"{stem}_failures.jsonl",
            manifest=directory / f"{stem}_manifest.json",
            log=directory / f"{stem}.log",
        )


class JsonlSink:
    """Appends complete lines to a JSONL file; opened on the first line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
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


def monotonic() -> float:
    return time.monotonic()
