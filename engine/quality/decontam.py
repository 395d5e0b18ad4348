"""Decontamination: find generated rows that share a word n-gram with a benchmark.

As in the GPT-3 and Llama reports, a row is contaminated when any of its word n-grams (n=13 by default)
also occurs in a benchmark text. Texts are compared in the normalized form of `dedup.normalize`.
A benchmark text shorter than n words cannot match (it has no n-gram); such texts are counted
(`too_short`) rather than matched whole, because short fields ("A", "yes", "4") would flag everything.

Benchmark files are .jsonl (one JSON object per line; blank lines skipped) or .parquet; a text cell that
is a list is joined with spaces. Rows are numbered from 0 over records, so `mmlu.jsonl#17` is the 18th
record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from engine.jsonl import read_objects
from engine.quality.dedup import words


class QualityError(ValueError):
    """A quality setting that cannot be used: a missing benchmark file or column, a bad format."""


@dataclass(frozen=True)
class Match:
    """Where a contaminated row's n-gram comes from."""

    source: str  # "<path>#<row>"
    column: str
    ngram: str


@dataclass
class BenchmarkIndex:
    """Hashes of every benchmark n-gram -> its first occurrence (file order, then row order)."""

    n: int
    grams: dict[int, tuple[str, str]] = field(default_factory=dict)  # hash(ngram) -> (source, column)
    rows: int = 0
    too_short: int = 0

    def add(self, text: str, source: str, column: str) -> None:
        ws = words(text)
        self.rows += 1
        if len(ws) < self.n:
            self.too_short += 1
            return
        for gram in _ngrams(ws, self.n):
            self.grams.setdefault(hash(gram), (source, column))

    def find(self, text: str) -> Match | None:
        """The first n-gram of `text` (in text order) that occurs in a benchmark, or None."""
        for gram in _ngrams(words(text), self.n):
            hit = self.grams.get(hash(gram))
            if hit is not None:
                return Match(source=hit[0], column=hit[1], ngram=gram)
        return None


def _ngrams(ws: list[str], n: int) -> Iterator[str]:
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i:i + n])


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(_cell_text(v) for v in value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _jsonl_records(path: Path) -> Iterator[dict]:
    for _, record in read_objects(path, QualityError):
        yield record


def check_file(path: str | Path, columns: list[str]) -> None:
    """Fail now, with one clear message, if a benchmark file is missing, of an unknown format, or lacks a
    column (checked on the parquet schema, or on the first jsonl record). Cheap: call it at run start."""
    p = Path(path)
    if not p.is_file():
        raise QualityError(f"decontam file not found: {p}")
    if p.suffix == ".parquet":
        names = pq.read_schema(p).names
    elif p.suffix == ".jsonl":
        names = list(next(_jsonl_records(p), {}))
    else:
        raise QualityError(f"decontam file {p}: unsupported format {p.suffix!r}; use .jsonl or .parquet")
    missing = [c for c in columns if c not in names]
    if missing:
        raise QualityError(f"decontam file {p} has no column {missing[0]!r} (its columns: {', '.join(names) or 'none'})")


def _file_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    if path.suffix == ".parquet":
        yield from pq.read_table(path, columns=columns).to_pylist()
        return
    for i, record in enumerate(_jsonl_records(path)):
        missing = [c for c in columns if c not in record]
        if missing:
            raise QualityError(f"decontam file {path}: record {i} has no column {missing[0]!r}")
        yield record


def build_index(files: list[tuple[str, list[str]]], n: int) -> BenchmarkIndex:
    """Index every `columns` cell of every file: `build_index([("bench.jsonl", ["question"])], 13)`."""
    index = BenchmarkIndex(n=n)
    for path, columns in files:
        check_file(path, columns)
        for i, record in enumerate(_file_rows(Path(path), columns)):
            for column in columns:
                index.add(_cell_text(record[column]), f"{path}#{i}", column)
    return index
