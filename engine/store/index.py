"""The committed keys of one stage, in 8 bytes each, so that a writer's memory follows its work in flight and
not the size of the run (a set of 32-character str keys costs ~120 bytes a key: 60 MB per million).

A key is kept as the first 64 bits of its blake2b digest. Two distinct keys share one with probability about
n² / 2^65: about 3e-6 for ten million keys of one stage, which would skip one request as already done.

    >>> index = KeyIndex()
    >>> index.update(["a1", "b2"]); index.update(["a1"])
    >>> ("a1" in index, "c3" in index, len(index))
    (True, False, 2)
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

MERGE_AT = 4096  # recent keys kept in a set until they are merged into the sorted array


def key_hash(key: str) -> int:
    """The 64-bit number a key is indexed by."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class KeyIndex:
    """A set of keys: a sorted uint64 array of their hashes, plus a small set of recent ones merged into it in
    batches (so adding n keys costs O(n log n) in all, not O(n) each)."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def update(self, keys: Iterable[str]) -> None:
        """Add `keys`."""
        self._recent.update(key_hash(k) for k in keys)
        if len(self._recent) >= MERGE_AT:
            self._merge()

    def add(self, key: str) -> None:
        self.update((key,))

    def _merge(self) -> None:
        fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._sorted = np.union1d(self._sorted, fresh)
        self._recent = set()

    def __contains__(self, key: str) -> bool:
        h = key_hash(key)
        if h in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        return i < len(self._sorted) and int(self._sorted[i]) == h

    def __len__(self) -> int:
        """Distinct keys held."""
        if self._recent:
            self._merge()
        return len(self._sorted)
