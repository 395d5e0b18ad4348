"""Exact and near-duplicate detection over `(key, text)` items given in key order.

Both keep the first item of a group (so the one with the smallest key, when the caller sorts by key)
and report every other member as a duplicate *of a kept item*, never of one that was itself removed.

Normalization (used by exact dedup, near dedup, decontamination and diversity alike):
casefold, delete punctuation and symbols (every character that is neither a word character nor space),
collapse runs of whitespace into one space, strip the ends.

    >>> normalize("  Hello,   World!! Don't  ")
    'hello world dont'
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

_NOT_WORD = re.compile(r"[^\w\s]")
_BATCH = 1024  # MinHash.bulk hashes this many texts per numpy call


# ASCII text (nearly every row) takes str.translate instead of the regex: 2.7x faster, and the same result by
# construction (the table deletes exactly the ASCII characters that _NOT_WORD matches; str.split() splits on
# what \s matches). Publishing normalizes every row twice (exact dedup, diversity).
_ASCII_NOT_WORD = {c: None for c in range(128) if _NOT_WORD.match(chr(c))}


def normalize(text: str) -> str:
    """The normalized form compared by exact dedup (see the module docstring). Idempotent (normalizing a
    normalized text changes nothing), so a filter may be handed either form."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII_NOT_WORD).split())
    return " ".join(_NOT_WORD.sub("", text.casefold()).split())


def words(text: str) -> list[str]:
    """Words of the normalized text: `words("A cat, a hat.") -> ['a', 'cat', 'a', 'hat']`."""
    return normalize(text).split()


def shingles(text: str, n: int) -> set[str]:
    """Word n-gram shingles of the normalized text; a text shorter than n words is one shingle.

    Word (not character) shingles: a near duplicate here is "the same wording with a few words changed",
    which is what template-driven generators produce. `shingles("a b c d", 3) -> {'a b c', 'b c d'}`.
    """
    ws = words(text)
    if len(ws) < n:
        return {" ".join(ws)} if ws else set()
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def exact_duplicates(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{removed key: kept key} for items whose normalized texts are equal.

    >>> exact_duplicates([("a", "Hi there!"), ("b", "hi   THERE"), ("c", "bye")])
    {'b': 'a'}
    """
    return ExactDedup().feed(items)


class ExactDedup:
    """exact_duplicates over items fed in batches (key order across batches): the state is one 16-byte digest
    per distinct text and its first key, not the texts, so publishing 1M rows keeps it to ~200 MB."""

    def __init__(self) -> None:
        self.first: dict[bytes, str] = {}

    def feed(self, items: Iterable[tuple[str, str]], *, normalized: bool = False) -> dict[str, str]:
        """{removed key: kept key} of this batch; `normalized`: the texts are normalize()'s output already
        (publishing normalizes each row once, for every filter and the diversity figures)."""
        removed: dict[str, str] = {}
        blake2b = hashlib.blake2b
        for key, text in items:
            digest = blake2b((text if normalized else normalize(text)).encode(), digest_size=16).digest()
            kept = self.first.setdefault(digest, key)
            if kept != key:
                removed[key] = kept
        return removed


def _batches(items: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def near_duplicates(items: list[tuple[str, str]], *, threshold: float, num_perm: int, shingle: int,
                    seed: int) -> dict[str, tuple[str, float]]:
    """{removed key: (kept key, estimated Jaccard)} for items whose shingle sets have an estimated
    Jaccard similarity >= threshold with an earlier kept item.

    LSH only proposes candidates; each is confirmed with the MinHash Jaccard estimate, so the LSH's false
    positives are not removed. Among confirmed candidates the most similar one (then smallest key) is named.
    Texts with no words are skipped here (exact dedup groups them).
    """
    return NearDedup(threshold=threshold, num_perm=num_perm, shingle=shingle, seed=seed).feed(items)


class NearDedup:
    """near_duplicates over items fed in batches (key order across batches); the LSH and the kept MinHashes
    are its state (num_perm * 8 bytes and LSH buckets per kept row: it grows with the kept rows)."""

    def __init__(self, *, threshold: float, num_perm: int, shingle: int, seed: int) -> None:
        # imported here, not at the top: it costs ~0.5 s (scipy) per CLI start
        from datasketch import MinHashLSH
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept: dict = {}

    def feed(self, items: list[tuple[str, str]]) -> dict[str, tuple[str, float]]:
        from datasketch import MinHash
        removed: dict[str, tuple[str, float]] = {}
        for batch in _batches(items, _BATCH):
            sets = [shingles(text, self.shingle) for _, text in batch]
            hashes = MinHash.bulk([[s.encode() for s in sh] for sh in sets], num_perm=self.num_perm, seed=self.seed)
            for (key, _), sh, mh in zip(batch, sets, hashes):
                if not sh:
                    continue
                scored = [(mh.jaccard(self.kept[c]), c) for c in self.lsh.query(mh)]
                best = min((s for s in scored if s[0] >= self.threshold), key=lambda s: (-s[0], s[1]), default=None)
                if best is None:
                    self.lsh.insert(key, mh)
                    self.kept[key] = mh
                else:
                    removed[key] = (best[1], round(best[0], 4))
        return removed
