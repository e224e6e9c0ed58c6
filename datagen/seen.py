"""A compact set of 64-bit fingerprints, for the keys a run has seen or finished."""

from __future__ import annotations

from array import array
from hashlib import blake2b


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

    def add_many(self, fingerprints: array[int]) -> None:
        """Add each (the loop of :meth:`add`, inlined: a million in ~0.5 s)."""
        slots, mask = self._slots, self._mask
        count = self._count
        for fingerprint in fingerprints:
            if count * 2 + 2 > len(slots):
                self._count = count
                self._grow()
                slots, mask, count = self._slots, self._mask, self._count
            fingerprint = fingerprint or 1
            i = fingerprint & mask
            while True:
                value = slots[i]
                if value == 0:
                    slots[i] = fingerprint
                    count += 1
                    break
                if value == fingerprint:
                    break
                i = (i + 1) & mask
        self._count = count

    def missing(self, fingerprints: array[int], group: int = 1) -> bytearray:
        """For each group of ``group`` fingerprints in a row: 1 if any is not here."""
        slots, mask = self._slots, self._mask
        out = bytearray(len(fingerprints) // group)
        for n, fingerprint in enumerate(fingerprints):
            fingerprint = fingerprint or 1
            i = fingerprint & mask
            while True:
                value = slots[i]
                if value == fingerprint:
                    break
                if value == 0:
                    out[n // group] = 1
                    break
                i = (i + 1) & mask
        return out

    def _grow(self) -> None:
        old = self._slots
        slots = self._slots = array("Q", bytes(8 * len(old) * 2))
        mask = self._mask = len(slots) - 1
        for value in old:  # the values are distinct: each goes to the first free slot
            if value:
                i = value & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = value

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
    """A key's 64-bit fingerprint, the same in every process (a run's index on disk holds
    them). An item's plain key (32 hex digits, blake2b) and a cache key (64, sha256) are
    hashes already: their first 16 digits are the fingerprint; any other key is hashed
    (blake2b, 8 bytes)."""
    if len(key) == 32 or len(key) == 64:
        try:
            return int(key[:16], 16)
        except ValueError:
            pass
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little")


class KeyIndex:
    """The keys of the records a run already holds: 8 bytes each, never the keys or the
    records themselves (a million done items: ~16 MB). ``capacity``: the keys expected,
    so that no growth copies the table."""

    def __init__(self, capacity: int = 0) -> None:
        size = 1 << 16
        while size < 2 * capacity:
            size <<= 1
        self._seen = SeenSet(capacity=size)

    def add(self, key: str) -> bool:
        """Add; return True if it was there already."""
        return self._seen.add(key_digest(key))

    def add_digest(self, digest: int) -> None:
        self._seen.add(digest)

    def add_digests(self, digests: array[int]) -> None:
        self._seen.add_many(digests)

    def missing(self, digests: array[int], group: int = 1) -> bytearray:
        """For each group of ``group`` digests in a row: 1 if any is not here."""
        return self._seen.missing(digests, group)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key_digest(key) in self._seen

    def __len__(self) -> int:
        return len(self._seen)
