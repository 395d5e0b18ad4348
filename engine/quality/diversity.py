"""Diversity figures of a dataset's texts: distinct-n, Self-BLEU, length statistics (in words).

Words are those of `dedup.words` (normalized, whitespace split).

- distinct-n: unique n-grams / total n-grams, counted over all texts of a seeded sample
  (n-grams never span two texts). `distinct_n([["a", "b", "a", "b"]], 2) -> 2/3`.
- Self-BLEU: the mean, over a seeded sample, of each text's BLEU-4 against all other sampled texts as
  references (Zhu et al., Texygen 2018). 1.0 means every text repeats the others; lower is more diverse.
  BLEU here: clipped n-gram precisions for n = 1..min(4, len), geometric mean, a zero count smoothed to
  0.1 / total (Chen & Cherry's method 1), brevity penalty against the closest reference length. Reported on
  a 0-1 scale (sacrebleu reports 0-100). Neither sacrebleu nor nltk is a dependency.
- length: mean, p50, p90 (nearest-rank percentiles), min, max words per text, over all texts.
"""
from __future__ import annotations

import math
import random
from collections import Counter

from engine.quality.dedup import words

Gram = tuple[str, ...]


def _grams(ws: list[str], n: int) -> Counter[Gram]:
    return Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))


def distinct_n(docs: list[list[str]], n: int) -> float:
    """Unique / total n-grams over `docs` (lists of words); 0.0 when there is no n-gram at all."""
    unique: set[Gram] = set()
    total = 0
    for ws in docs:
        grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def _top_two(counts: list[list[Counter[Gram]]]) -> dict[Gram, tuple[int, int, int]]:
    """gram -> (highest count, its document, second highest count), so that the clipping count
    "max over the *other* documents" is O(1) per gram instead of O(documents)."""
    top: dict[Gram, tuple[int, int, int]] = {}
    for doc, per_order in enumerate(counts):
        for grams in per_order:
            for g, k in grams.items():
                c1, owner, c2 = top.get(g, (0, -1, 0))
                if k > c1:
                    top[g] = (k, doc, c1)
                elif k > c2:
                    top[g] = (c1, owner, k)
    return top


def _closest_length(lengths: list[int], i: int) -> int:
    """Length of the other document closest in length to document i (the shorter one on a tie)."""
    li = lengths[i]
    return min((abs(l - li), l) for j, l in enumerate(lengths) if j != i)[1]


def self_bleu(docs: list[list[str]], max_n: int = 4) -> float | None:
    """Mean BLEU of each document against all the others; None with fewer than two non-empty documents.

    >>> self_bleu([["the", "cat", "sat", "down"]] * 3)
    1.0
    """
    docs = [d for d in docs if d]
    if len(docs) < 2:
        return None
    counts = [[_grams(d, n) for n in range(1, max_n + 1)] for d in docs]
    top = _top_two(counts)
    lengths = [len(d) for d in docs]
    scores = []
    for i, d in enumerate(docs):
        orders = min(max_n, len(d))
        log_p = 0.0
        for n in range(orders):
            grams = counts[i][n]
            total = sum(grams.values())
            matched = 0
            for g, k in grams.items():
                c1, owner, c2 = top[g]
                matched += min(k, c2 if owner == i else c1)
            log_p += math.log((matched or 0.1) / total) / orders
        ref = _closest_length(lengths, i)
        bp = 1.0 if len(d) > ref else math.exp(1 - ref / len(d))
        scores.append(bp * math.exp(log_p))
    return round(sum(scores) / len(scores), 6)


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile: `_percentile([1, 2, 3, 4], 50) -> 2`."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def length_stats(lengths: list[int]) -> dict[str, float]:
    """{"mean", "p50", "p90", "min", "max"} of word counts; all 0 for no texts."""
    if not lengths:
        return {"mean": 0, "p50": 0, "p90": 0, "min": 0, "max": 0}
    s = sorted(lengths)
    return {"mean": round(sum(s) / len(s), 3), "p50": _percentile(s, 50), "p90": _percentile(s, 90),
            "min": s[0], "max": s[-1]}


def _sample(n_items: int, k: int, seed: int) -> list[int]:
    """Sorted indices of a seeded sample of k items (all of them when k >= n_items)."""
    if k >= n_items:
        return list(range(n_items))
    return sorted(random.Random(seed).sample(range(n_items), k))


def diversity_report(texts: list[str], *, sample: int, distinct_sample: int, seed: int) -> dict:
    """All figures for `texts`, ready for the manifest."""
    acc = Diversity(len(texts), sample=sample, distinct_sample=distinct_sample, seed=seed)
    for t in texts:
        acc.add(t)
    return acc.report()


class Diversity:
    """diversity_report over `n_items` texts added one at a time, in order: it keeps the word counts of all
    and the words of the sampled texts only (publishing 1M rows does not hold 1M word lists)."""

    def __init__(self, n_items: int, *, sample: int, distinct_sample: int, seed: int) -> None:
        self.distinct_idx = set(_sample(n_items, distinct_sample, seed))
        self.bleu_idx = set(_sample(n_items, sample, seed))
        self.grams: list[set] = [set(), set(), set()]  # distinct-1..3: unique grams and totals
        self.totals = [0, 0, 0]
        self.bleu_docs: list[list[str]] = []
        self.lengths: list[int] = []

    def add(self, text: str, *, normalized: bool = False) -> None:
        """The next text (`normalized`: dedup.normalize's output already, as publishing passes it: words
        joined by single spaces, so an unsampled one is counted, not split)."""
        i = len(self.lengths)
        if normalized and i not in self.distinct_idx and i not in self.bleu_idx:
            self.lengths.append(text.count(" ") + 1 if text else 0)
            return
        ws = text.split() if normalized else words(text)
        self.lengths.append(len(ws))
        if i in self.distinct_idx:  # zip, not slices: 100,000 sampled rows cost seconds otherwise
            for n, grams in enumerate((ws, zip(ws, ws[1:]), zip(ws, ws[1:], ws[2:]))):
                self.grams[n].update(grams)  # unigrams as words, not 1-tuples: the same count of distinct ones
                self.totals[n] += max(0, len(ws) - n)
        if i in self.bleu_idx:
            self.bleu_docs.append(ws)

    def report(self) -> dict:
        distinct = [len(g) / t if t else 0.0 for g, t in zip(self.grams, self.totals)]
        return {
            "distinct_1": round(distinct[0], 6),
            "distinct_2": round(distinct[1], 6),
            "distinct_3": round(distinct[2], 6),
            "distinct_rows": len(self.distinct_idx),
            "self_bleu": self_bleu(self.bleu_docs),
            "self_bleu_rows": len(self.bleu_docs),
            "length_words": length_stats(self.lengths),
        }
