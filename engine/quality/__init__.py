"""Quality filters run when a run is published (`RunStore.finalize`): decontamination, exact dedup,
near dedup, then diversity figures of what is kept.

Order matters: contaminated rows go first, then exact duplicates, then near duplicates, each step seeing
only the survivors of the previous one, so `duplicate_of` always names a row that is published.
Every removed row is returned as a `Removal` (the store writes it to rejects/); nothing is dropped silently.

    >>> rs = apply_filters([("a", "same text"), ("b", "Same text!")], QualityConfig(near_dedup=False))
    >>> rs[0].key, rs[0].reason, rs[0].duplicate_of
    ('b', 'exact_duplicate', 'a')
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from engine.quality.decontam import QualityError, build_index, check_file
from engine.quality.dedup import ExactDedup, NearDedup, normalize
from engine.quality.diversity import diversity_report

__all__ = ["REASONS", "DecontamFile", "Filters", "QualityConfig", "QualityError", "Removal", "apply_filters",
           "diversity_report", "normalize"]

REASONS = ("contaminated", "exact_duplicate", "near_duplicate")


class DecontamFile(BaseModel):
    """One benchmark to decontaminate against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """A .jsonl or .parquet file; a relative path is relative to the working directory."""
    columns: list[str]
    """The text columns to compare with (e.g. ["question"]); a list cell is joined with spaces."""

    @field_validator("columns")
    @classmethod
    def _some_columns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("columns must name at least one column, got []")
        return v


def _positive(name: str, v: int) -> int:
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


class QualityConfig(BaseModel):
    """What `finalize` filters and measures. Defaults: exact and near dedup on, no benchmarks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exact_dedup: bool = True
    """Remove rows whose normalized text (casefolded, punctuation deleted, whitespace collapsed) equals an
    earlier row's."""
    near_dedup: bool = True
    """Remove rows whose word-shingle Jaccard similarity with an earlier kept row is >= near_threshold
    (MinHash LSH estimate, each candidate confirmed by its MinHash Jaccard estimate)."""
    near_threshold: float = 0.85
    """Jaccard similarity at or above which two rows are near duplicates, in (0, 1]."""
    num_perm: int = 128
    """MinHash permutations: more is a finer Jaccard estimate (error ~ 1/sqrt(num_perm)), more memory."""
    shingle: int = 5
    """Words per shingle for near dedup (word n-grams of the normalized text; a shorter text is one shingle)."""
    decontam_files: list[DecontamFile] = []
    """Benchmarks; a row sharing a word n-gram with any of their columns is removed as `contaminated`."""
    decontam_ngram: int = 13
    """n of the word n-grams compared for decontamination (13 as in GPT-3 and Llama 2)."""
    diversity_sample: int = 500
    """Rows sampled (seeded) for Self-BLEU, which costs O(sample * words)."""
    distinct_sample: int = 100_000
    """Rows sampled (seeded) for distinct-n; a fixed sample size keeps distinct-n comparable across runs
    of different sizes."""
    seed: int = 0
    """Seed of the MinHash permutations and of the diversity samples."""
    max_length_gate: bool = True
    """Quality gate `cut_at_max_length` (engine.quality.gates), on every model stage: a JSON output with a string
    as long as its schema's maxLength was cut there by the grammar, so it is a reject, not a row."""
    repetition_gate: bool = True
    """Quality gate `repetition`, on every model stage: an output (a JSON output's string values) of 16 words or
    more whose share of repeated word n-grams exceeds `repetition_threshold` is a reject (a degenerate loop)."""
    repetition_ngram: int = 4
    """n of the word n-grams the repetition gate counts."""
    repetition_threshold: float = 0.4
    """Share of repeated n-grams above which an output is a loop, in (0, 1] (prose and the TDG seed templates
    stay under 0.13; a sentence said three times is 0.6)."""

    @field_validator("near_threshold", "repetition_threshold")
    @classmethod
    def _threshold(cls, v: float, info: ValidationInfo) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"{info.field_name} must be in (0, 1], got {v}")
        return v

    @field_validator("num_perm", "shingle", "decontam_ngram", "distinct_sample", "repetition_ngram")
    @classmethod
    def _positive_ints(cls, v: int, info: ValidationInfo) -> int:
        return _positive(info.field_name, v)

    @field_validator("diversity_sample")
    @classmethod
    def _sample(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"diversity_sample must be >= 0, got {v}")
        return v

    def check_files(self) -> None:
        """Raise QualityError now if a benchmark file or column is missing: call it when a run starts,
        so a typo does not surface only after hours of generation."""
        for f in self.decontam_files:
            check_file(f.path, f.columns)


@dataclass(frozen=True)
class Removal:
    """A row removed by a quality filter.

    duplicate_of: the kept row's key (duplicates) or "<benchmark path>#<row>" (contaminated).
    detail: "jaccard=0.93" (near duplicates), "<column>: <matching n-gram>" (contaminated), "" otherwise.
    """

    key: str
    reason: str
    duplicate_of: str
    detail: str = ""


def apply_filters(items: list[tuple[str, str]], cfg: QualityConfig) -> list[Removal]:
    """Removals for `(key, text)` items, which must be sorted by key (the first of a group is kept)."""
    return Filters(cfg)(items)


class Filters:
    """apply_filters over items given in batches (sorted by key within and across batches): each call returns
    its batch's removals, the same as one call over all items would. Publishing streams through it."""

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.index = (build_index([(f.path, f.columns) for f in cfg.decontam_files], cfg.decontam_ngram)
                      if cfg.decontam_files else None)
        self.exact = ExactDedup() if cfg.exact_dedup else None
        self.near = (NearDedup(threshold=cfg.near_threshold, num_perm=cfg.num_perm, shingle=cfg.shingle,
                               seed=cfg.seed) if cfg.near_dedup else None)
        self.seconds = {"decontam": 0.0, "exact_dedup": 0.0, "near_dedup": 0.0}  # for bench/

    def __call__(self, items: list[tuple[str, str]], *, normalized: bool = False) -> list[Removal]:
        """This batch's removals. `normalized`: the texts are dedup.normalize's output already (the same
        removals, since every filter compares normalized text; exact dedup then skips normalizing them)."""
        removals: list[Removal] = []
        t = time.perf_counter()
        if self.index is not None:
            for key, text in items:
                m = self.index.find(text)
                if m is not None:
                    removals.append(Removal(key, "contaminated", m.source, f"{m.column}: {m.ngram}"))
            items = _without(items, removals)
        t = self._lap("decontam", t)
        if self.exact is not None:
            removals += [Removal(k, "exact_duplicate", kept)
                         for k, kept in self.exact.feed(items, normalized=normalized).items()]
            items = _without(items, removals)
        t = self._lap("exact_dedup", t)
        if self.near is not None:
            near = self.near.feed(items)
            removals += [Removal(k, "near_duplicate", kept, f"jaccard={j}") for k, (kept, j) in near.items()]
        self._lap("near_dedup", t)
        return sorted(removals, key=lambda r: r.key)

    def _lap(self, phase: str, t: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t
        return now


def _without(items: list[tuple[str, str]], removals: list[Removal]) -> list[tuple[str, str]]:
    gone = {r.key for r in removals}
    return [it for it in items if it[0] not in gone]
