"""The fence of a shard's files: a lease with an attempt number.

A cluster retries a shard whose worker or node died, and the old attempt may still be
running (an orphaned worker on a live node), so two attempts can hold the same files.
Each attempt takes the lease when it starts: under an exclusive ``flock`` of the lease
file it writes the next attempt number, and only then reads what the files hold (its
resume index). Every append holds a shared lock of the same file and first checks that the
number is still its own. So an append of the old attempt either happened before the new
one took the lease (and the new one sees it, and skips that item) or is refused with
:class:`StaleAttempt`: never a duplicate, whatever the timing.

The lease file lives beside the part files (on the shared folder), so it survives the
driver too: a resumed run's attempts fence the attempts of the run that was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from datagen.errors import RunAbortedError


class StaleAttempt(RunAbortedError):
    """A newer attempt of this shard took its files: this one stops writing at once."""

    def __init__(self, path: Path, mine: int, current: int) -> None:
        super().__init__(f"{path}: attempt {mine} of this shard was superseded by attempt "
                         f"{current}; it stops without writing", "stale_attempt")


class ShardLease:
    """One attempt's hold on a shard's files (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.epoch = 0
        self._fd: int | None = None

    def take(self) -> int:
        """Become the shard's writer: the next attempt number, written under an exclusive
        lock (waiting for an append in progress to end)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self.epoch = _read(fd) + 1
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.epoch}\n".encode(), 0)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._fd = fd
        return self.epoch

    def current(self) -> int:
        if self._fd is None:
            raise RuntimeError("the lease was not taken")
        return _read(self._fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Around one append: raises StaleAttempt when another attempt took the lease."""
        fd = self._fd
        if fd is None:
            raise RuntimeError("the lease was not taken")
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            current = _read(fd)
            if current != self.epoch:
                raise StaleAttempt(self.path, self.epoch, current)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_epoch(path: Path) -> int:
    """The attempt number a lease file holds (0: never taken)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> int:
    text = os.pread(fd, 32, 0).strip()
    return int(text) if text else 0
