"""One writer per run: the run lock."""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import orjson

from datagen.errors import OutputError

__all__ = ["RunLock", "RunLockedError"]


def iso_now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class RunLockedError(OutputError):
    """Another process is writing this run."""

    kind = "locked"


class RunLock:
    """One writer per run: an exclusive ``flock`` on ``<run>.lock``, which records who
    holds it (pid, host, start time, command).

    The kernel releases an flock when its process dies, however it dies (kill -9, a
    crash, a reboot), so a lock left behind is never mistaken for a live writer: a stale
    file is simply locked again by the next run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the run lock {self.path}: {exc.strerror}. "
                              "Set output_data.output_dir to a folder you can write to."
                              ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.with_suffix('.jsonl')} is being written by another process "
                f"({holder}). Only one process may write a run: wait for it to finish, or "
                "stop it (Ctrl+C, or kill that pid) and resume.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": iso_now(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(info) + b"\n", 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = orjson.loads(os.pread(fd, 4096, 0))
            return (f"pid {info.get('pid')} on host {info.get('host')}, since "
                    f"{info.get('started')}: {info.get('command')}")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            return "a process that has not yet said who it is"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays, unlocked
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
