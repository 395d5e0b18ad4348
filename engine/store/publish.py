"""Publishing a run: the final stage's rows, minus what the quality filters remove, as columnar data/*.parquet
shards with a dataset card (a mixin of RunStore), and `export` of a published dataset to one file."""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from engine.quality import QualityConfig, Removal, apply_filters, card, diversity_report
from engine.store.files import atomic_write, parquet_bytes
from engine.store.runs import StoreError
from engine.store.shards import REJECT_SCHEMA

DATA_SHARD_ROWS = 100_000  # most rows per published data/ shard


class PublishMixin:
    """RunStore's publishing methods."""

    # -- publishing
    def finalize(self, final_stage: str, quality: QualityConfig | None = None,
                 text_fields: list[str] = ["text"]) -> dict:  # noqa: B006 (read only)
        """Publish the run: data/*.parquet from `final_stage`'s rows minus the quality filters' removals,
        those removals to rejects/_quality/, diversity figures, manifest.json and README.md.

        `quality=None` removes nothing (pass `QualityConfig()` for the default filters: exact and near dedup,
        no benchmarks); diversity figures are computed either way. The filters and diversity read the row
        fields `text_fields` (non-strings as JSON), joined by newlines. Idempotent: with no new commits,
        re-running writes byte-identical files. Returns the manifest.
        """
        quality = quality or QualityConfig(exact_dedup=False, near_dedup=False)
        self.commit()
        rows = self.rows(final_stage)
        if not rows:
            raise StoreError(f"nothing to publish: stage {final_stage!r} of {self.out} has no committed rows "
                             f"({len(self._reject_keys.get(final_stage, ()))} rejects)")
        texts = _texts(rows, text_fields, final_stage)
        try:
            removals = apply_filters(list(zip((r["key"] for r in rows), texts)), quality)
            gone = {r.key for r in removals}
            kept = [(r, t) for r, t in zip(rows, texts) if r["key"] not in gone]
            table, json_cols = _columnar([r for r, _ in kept])
            files = self._publish("data", "train", table)
            self._publish("rejects/_quality", "quality", _removals_table(removals, rows, final_stage))
            counts = Counter(r.reason for r in removals)
            dataset = {
                "final_stage": final_stage,
                "text_fields": list(text_fields),
                "num_rows": table.num_rows,
                "num_bytes": table.nbytes,
                "download_size": sum(f["bytes"] for f in files),
                "features": card.features(table.schema),
                "json_columns": json_cols,
                "files": files,
                "quality": {"config": quality.model_dump(), "input_rows": len(rows), "kept_rows": len(kept),
                            **{k: counts.get(k, 0) for k in ("contaminated", "exact_duplicate", "near_duplicate")}},
                "diversity": diversity_report([t for _, t in kept], sample=quality.diversity_sample,
                                              distinct_sample=quality.distinct_sample, seed=quality.seed),
            }
            m = self._write_manifest(dataset)
            atomic_write(self.out / "README.md", card.render(m).encode(), self.out / f".tmp-{self.writer}-README.md")
        except OSError as e:
            raise StoreError(f"cannot publish to {self.out}: {e.strerror or e}; committed shards are intact, "
                             "rerun to finalize again") from e
        return m

    def _publish(self, subdir: str, prefix: str, table: pa.Table) -> list[dict]:
        """Write `table` as <subdir>/<prefix>-0000i-of-0000n.parquet (at most DATA_SHARD_ROWS rows each;
        none for an empty table), then delete files of an earlier publish that are not in the new set."""
        d = self.out / subdir
        d.mkdir(parents=True, exist_ok=True)
        n = math.ceil(table.num_rows / DATA_SHARD_ROWS)
        files = []
        for i in range(n):
            data = parquet_bytes(table.slice(i * DATA_SHARD_ROWS, DATA_SHARD_ROWS))
            name = f"{prefix}-{i:05d}-of-{n:05d}.parquet"
            atomic_write(d / name, data, d / f".tmp-{self.writer}-{name}")
            files.append({"file": f"{subdir}/{name}", "rows": min(DATA_SHARD_ROWS, table.num_rows - i * DATA_SHARD_ROWS),
                          "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        fresh = {f["file"].rsplit("/", 1)[1] for f in files}
        for p in d.glob(f"{prefix}-*.parquet"):
            if p.name not in fresh:
                p.unlink()
        return files


# ---------------------------------------------------------------------------------------------- helpers

def _texts(rows: list[dict], fields: list[str], stage: str) -> list[str]:
    """The text the filters see: the `fields` of each row (non-strings as JSON) joined by newlines."""
    for f in fields:
        if not any(f in r for r in rows):
            raise StoreError(f"text field {f!r} is in no row of stage {stage!r} "
                             f"(fields of the first row: {', '.join(rows[0])})")

    return [row_text(r, fields) for r in rows]


def row_text(row: dict, fields: list[str]) -> str:
    """One row's text for the filters: its `fields` (non-strings as JSON) joined by newlines."""
    return "\n".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
                     for v in (row.get(f) for f in fields) if v is not None)


def _has_empty_struct(t: pa.DataType) -> bool:
    """Parquet cannot store a struct with no fields (a column of `{}` values)."""
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_empty_struct(t.value_type)
    return False


def _column(values: list[Any]) -> tuple[pa.Array, bool]:
    """An arrow array of `values`, or, when they have no common arrow type (1 and "a", or {}), their text:
    strings as they are, other values as JSON. Returns (array, was_converted)."""
    try:
        arr = pa.array(values)
        if not _has_empty_struct(arr.type):
            return arr, False
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        pass
    texts = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
    return pa.array(texts, pa.string()), True


def _columnar(rows: list[dict]) -> tuple[pa.Table, list[str]]:
    """One table, one schema, for all published rows: columns in order of first appearance ("key" first),
    a missing field is null. Returns the table and the columns that had to be stored as text."""
    names = {"key": None}
    for r in rows:
        names.update(dict.fromkeys(r))
    arrays, converted = [], []
    for name in names:
        arr, conv = _column([r.get(name) for r in rows])
        arrays.append(arr)
        if conv:
            converted.append(name)
    return pa.Table.from_arrays(arrays, names=list(names)), converted


def _removals_table(removals: list[Removal], rows: list[dict], stage: str) -> pa.Table:
    by_key = {r["key"]: r for r in rows}
    return pa.table({
        "key": [r.key for r in removals], "stage": [stage] * len(removals), "reason": [r.reason for r in removals],
        "duplicate_of": [r.duplicate_of for r in removals], "detail": [r.detail or None for r in removals],
        "row": [json.dumps(by_key[r.key], ensure_ascii=False) for r in removals],
    }, schema=REJECT_SCHEMA)


def export(out: Path, fmt: Literal["jsonl", "parquet"], to: Path) -> int:
    """Write OUT's published dataset (data/*.parquet, from finalize) to one file `to` as JSON lines or
    one parquet file; returns the number of rows. `to` is written atomically."""
    out, to = Path(out), Path(to)
    files = sorted((out / "data").glob("*.parquet"))
    if not files:
        raise StoreError(f"{out} has no published dataset (data/*.parquet); finish the run first")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format must be 'jsonl' or 'parquet', got {fmt!r}")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".tmp-export-{uuid.uuid4().hex}-{to.name}")
    n = 0
    try:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, pq.read_schema(files[0]), compression="zstd") as w:
                for f in files:
                    t = pq.read_table(f)
                    w.write_table(t)
                    n += t.num_rows
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for f in files:
                    for batch in pq.ParquetFile(f).iter_batches():
                        for r in batch.to_pylist():
                            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
                            n += 1
        os.replace(tmp, to)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot export to {to}: {e.strerror or e}") from e
    return n

