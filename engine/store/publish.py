"""Publishing a run: the final stage's rows, minus what the quality filters remove, as columnar data/*.parquet
shards with a dataset card (a mixin of RunStore), and `export` of a published dataset to one file."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.quality import Filters, QualityConfig, Removal, card
from engine.quality.dedup import normalize
from engine.quality.diversity import Diversity
from engine.store.files import atomic_write, parquet_bytes
from engine.store.runs import StoreError
from engine.store.shards import REJECT_SCHEMA, rows_table

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

        Streams: the rows are sorted by key on disk (_sorted_batches) and go through the filters and into the
        shards PUBLISH_BATCH at a time, so memory does not grow with the rows (only the dedup state does).
        """
        quality = quality or QualityConfig(exact_dedup=False, near_dedup=False)
        self.commit()
        self._refresh()
        PUBLISH_SECONDS.clear()
        try:
            with tempfile.TemporaryDirectory(prefix=f".tmp-{self.writer}-publish-", dir=self.out) as tmp:
                m = self._finalize_streaming(final_stage, quality, list(text_fields), Path(tmp))
        except OSError as e:
            raise StoreError(f"cannot publish to {self.out}: {e.strerror or e}; committed shards are intact, "
                             "rerun to finalize again") from e
        return m

    def _finalize_streaming(self, final_stage: str, quality: QualityConfig, text_fields: list[str],
                            tmp: Path) -> dict:
        t = time.perf_counter()
        buckets = _sort_to_buckets(self, final_stage, tmp)
        t = _lap("sort", t)
        scan = _Scan(quality, text_fields, tmp)
        for blobs in _bucket_blobs(buckets):
            scan.blobs(blobs)
        t = _lap("scan", t)
        if not scan.input_rows:
            raise StoreError(f"nothing to publish: stage {final_stage!r} of {self.out} has no committed rows "
                             f"({len(self._reject_keys.get(final_stage, ()))} rejects)")
        scan.check_fields(final_stage)
        PUBLISH_SECONDS.update({f"filter_{k}": round(v, 4) for k, v in scan.filters.seconds.items()})
        schema = scan.schema(lambda: _bucket_rows(buckets))
        files, num_bytes, div = self._publish_parts(scan, schema, quality)
        self._publish("rejects/_quality", "quality", _removals_table(scan.removals, scan.removed_rows, final_stage))
        t = _lap("write", t)
        counts = Counter(r.reason for r in scan.removals)
        dataset = {
            "final_stage": final_stage,
            "text_fields": text_fields,
            "num_rows": scan.kept_rows,
            "num_bytes": num_bytes,
            "download_size": sum(f["bytes"] for f in files),
            "features": card.features(schema),
            "json_columns": [n for n in schema.names if n in scan.converted],
            "files": files,
            "quality": {"config": quality.model_dump(), "input_rows": scan.input_rows, "kept_rows": scan.kept_rows,
                        **{k: counts.get(k, 0) for k in ("contaminated", "exact_duplicate", "near_duplicate")}},
            "diversity": div.report(),
        }
        m = self._write_manifest(dataset)
        atomic_write(self.out / "README.md", card.render(m).encode(), self.out / f".tmp-{self.writer}-README.md")
        _lap("manifest", t)
        return m

    def _publish_parts(self, scan: _Scan, schema: pa.Schema, quality: QualityConfig):
        """data/train-*.parquet from the kept parts, DATA_SHARD_ROWS rows each, and the diversity figures
        of their texts (sampled now that the kept count is known). Returns (files, num_bytes, diversity)."""
        div = Diversity(scan.kept_rows, sample=quality.diversity_sample, distinct_sample=quality.distinct_sample,
                        seed=quality.seed)
        d = self.out / "data"
        d.mkdir(parents=True, exist_ok=True)
        n = math.ceil(scan.kept_rows / DATA_SHARD_ROWS)
        files, num_bytes, held = [], 0, []

        def flush(table: pa.Table) -> None:
            nonlocal num_bytes
            table = table.combine_chunks()
            num_bytes += table.nbytes
            files.append(self._write_data_shard(d, "train", len(files), n, table))
        for part in scan.parts(schema):
            for text in part.column(_TEXT).to_pylist():
                div.add(text, normalized=True)
            held.append(part.drop_columns([_TEXT]))
            while sum(p.num_rows for p in held) >= DATA_SHARD_ROWS:
                table = pa.concat_tables(held)
                rest = table.slice(DATA_SHARD_ROWS)
                held = [rest] if rest.num_rows else []
                flush(table.slice(0, DATA_SHARD_ROWS))
        if held:
            flush(pa.concat_tables(held))
        fresh = {f["file"].rsplit("/", 1)[1] for f in files}
        for p in d.glob("train-*.parquet"):
            if p.name not in fresh:
                p.unlink()
        return files, num_bytes, div

    def _write_data_shard(self, d: Path, prefix: str, i: int, n: int, table: pa.Table) -> dict:
        data = parquet_bytes(table)
        name = f"{prefix}-{i:05d}-of-{n:05d}.parquet"
        atomic_write(d / name, data, d / f".tmp-{self.writer}-{name}")
        return {"file": f"{d.name}/{name}", "rows": table.num_rows, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

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

PUBLISH_BATCH = 50_000  # rows per sorted bucket: what publishing holds as Python objects at a time
PUBLISH_SECONDS: dict[str, float] = {}  # seconds of each phase of this process's last finalize (for bench/)
# the filters' text of each kept row, normalized once (dedup.normalize) for every filter and for the diversity
# figures, carried beside its part until diversity reads it
_TEXT = "__text"


def _lap(phase: str, t: float) -> float:
    now = time.perf_counter()
    PUBLISH_SECONDS[phase] = round(PUBLISH_SECONDS.get(phase, 0.0) + now - t, 4)
    return now


def _sort_to_buckets(store, stage: str, tmp: Path) -> list[Path]:
    """External sort by key: the stage's rows into Arrow files of key ranges (about PUBLISH_BATCH distinct keys
    each, bounds from the keys alone), each row tagged with its (shard, index) order so that a key committed
    twice keeps its first copy in (writer, seq) order, as RunStore.rows does."""
    shards = store._stage_shards("stages", stage)
    keys = [_key_column(store, s) for s in shards]
    if not keys:
        return []
    uniq = pc.unique(pa.chunked_array(keys, pa.string()))
    ordered = uniq.take(pc.sort_indices(uniq))
    bounds = ordered[PUBLISH_BATCH::PUBLISH_BATCH].to_numpy(zero_copy_only=False)
    paths = [tmp / f"bucket-{b:06d}.arrow" for b in range(len(bounds) + 1)]
    schema = pa.schema([("key", pa.string()), ("row", pa.large_string()), ("order", pa.int64())])
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for ordinal, shard in enumerate(shards):
            table = store._read(shard).select(["key", "row"])  # verified: what is published is what was committed
            ids = np.searchsorted(bounds, table.column("key").to_numpy(zero_copy_only=False), side="right")
            order = np.argsort(ids, kind="stable")
            cuts = np.searchsorted(ids[order], np.arange(len(paths) + 1))
            for b in range(len(paths)):
                if cuts[b] == cuts[b + 1]:
                    continue
                idx = order[cuts[b]:cuts[b + 1]]
                part = table.take(idx).append_column("order", pa.array((ordinal << 32) + idx, pa.int64()))
                if b not in writers:
                    writers[b] = pa.ipc.new_file(paths[b], schema)
                writers[b].write_table(part.cast(schema))
    finally:
        for w in writers.values():
            w.close()
    return [p for b, p in enumerate(paths) if b in writers]


def _key_column(store, shard) -> pa.ChunkedArray:
    """A stage shard's keys, for the buckets' bounds only: its key column alone, unverified (the rows are read
    and verified when they are bucketed); a shard that cannot be read at all goes through _read, which says so."""
    try:
        return pq.read_table(store.out / shard.rel, columns=["key"]).column("key")
    except Exception:  # noqa: BLE001 - _read quarantines a damaged shard and raises StoreError
        return store._read(shard).column("key")


def _bucket_blobs(paths: list[Path]) -> Iterator[list[str]]:
    """The sorted rows as their JSON text, one list per bucket, one row per key (its first copy)."""
    for path in paths:
        with pa.memory_map(str(path)) as src:
            table = pa.ipc.open_file(src).read_all()
        table = table.sort_by([("key", "ascending"), ("order", "ascending")])
        keys, blobs, prev, firsts = table.column("key").to_pylist(), table.column("row").to_pylist(), None, []
        for k, blob in zip(keys, blobs):
            if k != prev:
                firsts.append(blob)
            prev = k
        yield firsts


def _bucket_rows(paths: list[Path]) -> Iterator[list[dict]]:
    """The sorted rows, one list per bucket, one row per key (its first copy)."""
    for blobs in _bucket_blobs(paths):
        yield [json.loads(b) for b in blobs]


class _Scan:
    """The first pass over the sorted rows: the filters' removals, and each batch's kept rows as a columnar part
    (on disk) with the column types it inferred; `schema` then settles one type per column, and `parts` reads
    the parts back in that schema."""

    def __init__(self, quality: QualityConfig, fields: list[str], tmp: Path) -> None:
        self.filters, self.fields, self.tmp = Filters(quality), fields, tmp
        self.input_rows = self.kept_rows = 0
        self.first_fields: list[str] | None = None
        self.seen_fields: set[str] = set()
        self.removals: list[Removal] = []
        self.removed_rows: dict[str, dict] = {}
        self.names: dict[str, None] = {"key": None}  # columns in order of first appearance in kept rows
        self.types: dict[str, set] = {}  # column -> the non-null types parts inferred for it
        self.converted: set[str] = set()  # columns some part stored as text
        self.rebuilt: dict[str, pa.Array] = {}
        self.part_paths: list[Path] = []

    def blobs(self, blobs: list[str]) -> None:
        """One bucket of sorted rows as their JSON text: parsed into columns by pyarrow when every column is
        of a plain type (rows_table) and the text fields are text; else row by row (batch)."""
        table = rows_table(blobs)
        if table is None or "key" not in table.column_names or any(
                f in table.column_names and table.schema.field(f).type not in (pa.string(), pa.null())
                for f in self.fields):
            self.batch([json.loads(b) for b in blobs])
            return
        self.input_rows += table.num_rows
        self.first_fields = self.first_fields or list(json.loads(blobs[0]))
        present = [f for f in self.fields if f in table.column_names]  # a column: some row has the field
        self.seen_fields.update(present)
        columns = [table.column(f).to_pylist() for f in present]
        texts = [normalize("\n".join(v for v in values if v is not None)) for values in zip(*columns)] if columns \
            else [""] * table.num_rows
        keys = table.column("key").to_pylist()
        removals = self.filters(list(zip(keys, texts)), normalized=True)
        gone = {r.key for r in removals}
        self.removals += removals
        if gone:
            self.removed_rows.update((k, json.loads(b)) for k, b in zip(keys, blobs) if k in gone)
            kept = [k not in gone for k in keys]
            table = table.filter(pa.array(kept))
            texts = [t for t, keep in zip(texts, kept) if keep]
            table = table.drop_columns(_fields_of_removed_rows_only(table, [b for b, k in zip(blobs, kept) if k]))
        if table.num_rows:
            self._write_table(table, texts)

    def batch(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.input_rows += len(rows)
        self.first_fields = self.first_fields or list(rows[0])
        self.seen_fields.update(f for f in self.fields if f not in self.seen_fields and any(f in r for r in rows))
        texts = [normalize(row_text(r, self.fields)) for r in rows]
        removals = self.filters(list(zip((r["key"] for r in rows), texts)), normalized=True)
        gone = {r.key for r in removals}
        self.removals += removals
        self.removed_rows.update((r["key"], r) for r in rows if r["key"] in gone)
        kept = [(r, t) for r, t in zip(rows, texts) if r["key"] not in gone]
        if kept:
            self._write_part([r for r, _ in kept], [t for _, t in kept])

    def _write_part(self, rows: list[dict], texts: list[str]) -> None:
        self.kept_rows += len(rows)
        names = {"key": None}
        for r in rows:
            names.update(dict.fromkeys(r))
        self.names.update(names)
        arrays = []
        for name in names:
            arr, conv = _column([r.get(name) for r in rows])
            if conv:
                self.converted.add(name)
            elif arr.type != pa.null():
                self.types.setdefault(name, set()).add(arr.type)
            arrays.append(arr)
        table = pa.Table.from_arrays([*arrays, pa.array(texts, pa.string())], names=[*names, _TEXT])
        self._write_ipc(table)

    def _write_table(self, table: pa.Table, texts: list[str]) -> None:
        """_write_part for kept rows already in columns (blobs): key first, then the columns in order."""
        self.kept_rows += table.num_rows
        names = ["key", *(n for n in table.column_names if n != "key")]
        self.names.update(dict.fromkeys(names))
        for name in names:
            t = table.schema.field(name).type
            if t != pa.null():
                self.types.setdefault(name, set()).add(t)
        table = table.select(names).append_column(_TEXT, pa.array(texts, pa.string()))
        self._write_ipc(table)

    def _write_ipc(self, table: pa.Table) -> None:
        path = self.tmp / f"part-{len(self.part_paths):06d}.arrow"
        with pa.ipc.new_file(path, table.schema) as w:
            w.write_table(table)
        self.part_paths.append(path)

    def check_fields(self, stage: str) -> None:
        for f in self.fields:
            if f not in self.seen_fields:
                raise StoreError(f"text field {f!r} is in no row of stage {stage!r} "
                                 f"(fields of the first row: {', '.join(self.first_fields or [])})")

    def schema(self, rows_again) -> pa.Schema:
        """One type per column, as _columnar over all kept rows would infer it: the parts' type when they agree;
        a column whose parts disagree is built again from all its values (`rows_again()`: the sorted rows)."""
        mixed = [n for n in self.names if len(self.types.get(n, ())) > 1 or (n in self.converted and n in self.types)]
        if mixed:
            values: dict[str, list] = {n: [] for n in mixed}
            gone = set(self.removed_rows)
            for rows in rows_again():
                for r in rows:
                    if r["key"] not in gone:
                        for n in mixed:
                            values[n].append(r.get(n))
            for n in mixed:
                self.rebuilt[n], conv = _column(values.pop(n))
                (self.converted.add if conv else self.converted.discard)(n)
        fields = []
        for n in self.names:
            if n in self.rebuilt:
                t = self.rebuilt[n].type
            elif n in self.converted:
                t = pa.string()
            else:
                t = next(iter(self.types.get(n, {pa.null()})))
            fields.append(pa.field(n, t))
        return pa.schema(fields)

    def parts(self, schema: pa.Schema) -> Iterator[pa.Table]:
        """The kept parts in order, each in `schema` (plus the _TEXT column)."""
        offset = 0
        for path in self.part_paths:
            with pa.memory_map(str(path)) as src:
                part = pa.ipc.open_file(src).read_all()
            n, cols = part.num_rows, []
            for f in schema:
                if f.name in self.rebuilt:
                    cols.append(self.rebuilt[f.name].slice(offset, n))
                elif f.name in part.column_names:
                    cols.append(part.column(f.name).cast(f.type))
                else:
                    cols.append(pa.nulls(n, f.type))
            offset += n
            yield pa.Table.from_arrays([*cols, part.column(_TEXT)], names=[*schema.names, _TEXT])


def _fields_of_removed_rows_only(kept: pa.Table, kept_blobs: list[str]) -> list[str]:
    """Columns that no kept row has (the parsed bucket has them for its removed rows): the columns of kept rows
    only, as _write_part would take them. Only an all-null column can be one; a kept row has it if its JSON text
    names it (plain values only here, so the name cannot stand inside a nested object)."""
    return [n for n in kept.column_names if kept.column(n).null_count == kept.num_rows
            and not any(json.dumps(n, ensure_ascii=False) + ": " in b for b in kept_blobs)]


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


def _removals_table(removals: list[Removal], by_key: dict[str, dict], stage: str) -> pa.Table:
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

