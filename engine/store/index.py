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


def key_hashes(keys: list[str]) -> np.ndarray:
    """key_hash of each key, as one uint64 array (KeyIndex.holds looks a batch up with it)."""
    return np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=len(keys))


class KeyIndex:
    """A set of keys: sorted uint64 arrays of their hashes (levels, each at least twice the size of the next),
    plus a small set of recent ones merged in batches. A batch is merged with the smallest levels only while
    they are no larger than twice its size, like a binary counter, so adding n keys costs O(n log n) in all;
    one sorted array rebuilt on every batch cost O(n) per batch, which dominated 1M-row TDG runs (profiled:
    np.union1d 8 s of 100 s at 200,000 rows, growing with the square of the rows)."""

    def __init__(self) -> None:
        self._levels: list[np.ndarray] = []  # disjoint, sorted, largest first
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
        fresh.sort()
        fresh = fresh[~self._held(fresh)]  # levels stay disjoint, so their sizes add up to len()
        self._recent = set()
        while self._levels and len(self._levels[-1]) <= 2 * len(fresh):
            merged = np.concatenate([self._levels.pop(), fresh])
            merged.sort(kind="stable")
            fresh = merged
        if len(fresh):
            self._levels.append(fresh)

    def _held(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, whether a level holds it."""
        found = np.zeros(len(hashes), dtype=bool)
        for level in self._levels:
            i = np.minimum(np.searchsorted(level, hashes), len(level) - 1)
            found |= level[i] == hashes
        return found

    def holds(self, hashes: np.ndarray) -> np.ndarray:
        """For each of `hashes` (key_hashes of a batch of keys), whether its key is held: `in` for a batch, one
        vectorized search per level instead of one per key."""
        found = self._held(hashes)
        if self._recent:
            recent = self._recent
            found |= np.fromiter((h in recent for h in hashes.tolist()), dtype=bool, count=len(hashes))
        return found

    def __contains__(self, key: str) -> bool:
        h = key_hash(key)
        if h in self._recent:
            return True
        wanted = np.uint64(h)
        for level in self._levels:  # the array's own method: np.searchsorted's wrapper doubled the cost
            i = level.searchsorted(wanted)
            if i < level.size and level[i] == wanted:
                return True
        return False

    def __len__(self) -> int:
        """Distinct keys held."""
        if self._recent:
            self._merge()
        return sum(len(level) for level in self._levels)
