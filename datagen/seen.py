"""A compact set of 64-bit fingerprints, for the keys a run has seen or finished."""

from __future__ import annotations

from array import array


class SeenSet:
    """Which 64-bit fingerprints were seen: open addressing in an ``array('Q')``.

    Written by hand because the alternatives cost memory per item: a Python set or dict
    entry is ~70-100 bytes, which for a streamed million-item pool is ~100 MB of growth;
    here it is 16 bytes (8-byte slots at most half full). A fingerprint collision (odds
    ~n^2 / 2^65) could only mis-number an item as a repeat, the same way on every run, so
    resume stays consistent.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._slots = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0

    def add(self, fingerprint: int) -> bool:
        """Add; return True if it was there already."""
        fingerprint = fingerprint or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        i = fingerprint & mask
        while True:
            value = slots[i]
            if value == 0:
                slots[i] = fingerprint
                self._count += 1
                if self._count * 2 > len(slots):
                    self._grow()
                return False
            if value == fingerprint:
                return True
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(8 * len(old) * 2))
        self._mask = len(self._slots) - 1
        self._count = 0
        for value in old:
            if value:
                self.add(value)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, fingerprint: object) -> bool:
        if not isinstance(fingerprint, int):
            return False
        fingerprint = fingerprint or 1
        slots, mask = self._slots, self._mask
        i = fingerprint & mask
        while True:
            value = slots[i]
            if value == 0:
                return False
            if value == fingerprint:
                return True
            i = (i + 1) & mask


def key_digest(key: str) -> int:
    """A key's 64-bit fingerprint, stable within one process (``hash`` is randomised per
    process, and an index is built and used in the same process)."""
    return hash(key) & 0xFFFFFFFFFFFFFFFF


class KeyIndex:
    """The keys of the records a run already holds: 8 bytes each, never the keys or the
    records themselves (a million done items: ~16 MB)."""

    def __init__(self) -> None:
        self._seen = SeenSet(capacity=1 << 16)

    def add(self, key: str) -> bool:
        """Add; return True if it was there already."""
        return self._seen.add(key_digest(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key_digest(key) in self._seen

    def __len__(self) -> int:
        return len(self._seen)
