"""Publishing streams: rows sorted on disk and published a batch at a time give the same dataset as one batch,
and the rows held at once do not grow with the run (counted, not timed)."""
from __future__ import annotations

import pyarrow.parquet as pq

from engine.quality import QualityConfig
from engine.store import RunStore, publish

CONFIG = {"method": "demo", "seed": 7, "model": "tiny", "sampling": {"temperature": 0.7}}


def _row(i: int) -> dict:
    words = " ".join(f"w{i % 40}x{j}" for j in range(6))
    row = {"key": f"k{(i * 7919) % 1000:04d}", "text": f"row {i % 40} says {words}", "n": i}
    if i % 9 == 0:
        row["v"] = "text" if i > 60 else i  # int in early key ranges, str later: one text column in the end
    if i > 50:
        row["late"] = {"a": i}  # a column that first appears in a later batch
    return row


def _publish(tmp_path, name: str, batch: int, monkeypatch, quality: QualityConfig, *, row=_row, n: int = 90,
             text_fields: tuple[str, ...] = ("text", "v")) -> tuple[dict, dict]:
    """Rows row(0..n-1) committed 13 at a time and published PUBLISH_BATCH=batch at a time: the manifest, and the
    bytes of data/ and rejects/_quality/ by path."""
    monkeypatch.setattr(publish, "PUBLISH_BATCH", batch)
    monkeypatch.setattr(publish, "DATA_SHARD_ROWS", 16)
    out = tmp_path / name
    with RunStore.open(out, CONFIG, commit_rows=13) as s:
        for i in range(n):
            s.add("gen", row(i))
            s.maybe_commit()
        m = s.finalize("gen", quality, text_fields=list(text_fields))
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "data").glob("*.parquet")}
    files.update({p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "rejects" / "_quality").glob("*")})
    return m, files


def test_batches_publish_the_same_dataset_as_one(tmp_path, monkeypatch):
    q = QualityConfig(near_dedup=True, near_threshold=0.8)
    whole, whole_files = _publish(tmp_path, "whole", 10_000, monkeypatch, q)
    streamed, streamed_files = _publish(tmp_path, "streamed", 7, monkeypatch, q)
    # num_bytes is Arrow's in-memory size: validity bitmaps of all-valid slices make it differ by a few bytes
    assert abs(streamed["dataset"].pop("num_bytes") - whole["dataset"].pop("num_bytes")) < 64
    assert streamed["dataset"] == whole["dataset"]
    assert streamed_files == whole_files
    ds = whole["dataset"]
    assert ds["quality"]["exact_duplicate"] > 0 and len(ds["files"]) == 3
    assert ds["num_rows"] == 90 - ds["quality"]["exact_duplicate"] - ds["quality"]["near_duplicate"]
    assert ds["json_columns"] == ["v"]
    data = pq.read_table(tmp_path / "whole" / "data")
    assert data.column("key").to_pylist() == sorted(data.column("key").to_pylist())


def test_rows_held_do_not_grow_with_the_run(tmp_path, monkeypatch):
    held: list[int] = []
    bucket_blobs = publish._bucket_blobs

    def counting(paths):
        for blobs in bucket_blobs(paths):
            held.append(len(blobs))
            yield blobs
    monkeypatch.setattr(publish, "_bucket_blobs", counting)
    m, _ = _publish(tmp_path, "run", 10, monkeypatch, QualityConfig(near_dedup=False))
    assert m["dataset"]["quality"]["input_rows"] == 90
    # two passes over 9 buckets (column v is an int in some, a str in others: built again from all its values)
    assert held == [10] * 18


def test_duplicate_keys_of_two_writers_publish_once(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "PUBLISH_BATCH", 3)
    out = tmp_path / "run"
    with RunStore.open(out, CONFIG, writer="r0") as a, RunStore.open(out, CONFIG, writer="r1") as b:
        for s, tag in ((a, "first"), (b, "second")):
            for i in range(8):
                s.add("gen", {"key": f"k{i}", "text": f"{tag} copy of row {i}"})
            s.commit()
        m = a.finalize("gen")
        whole = a.rows("gen")  # the first copy of each key in (writer, seq) order, sorted by key
    data = pq.read_table(out / "data").to_pylist()
    assert m["dataset"]["num_rows"] == 8 and data == whole and all(r["text"].startswith("first") for r in data)


def _plain_row(i: int) -> dict:
    """Plain values only (str, int, bool, None), so publishing parses them in columns (rows_table); rows
    40..79 repeat 0..39's text (exact duplicates), and only removed rows have the field `dup_only`."""
    text = f"row {i % 40} says " + " ".join(f"w{i % 40}x{j}" for j in range(6))
    row = {"key": f"k{(i * 7919) % 1000:04d}", "text": text,
           "n": i, "flag": i % 3 == 0, "none": None, "maybe": None if i % 2 else f"m{i % 40}"}
    if i >= 40 and (i * 7919) % 1000 > ((i - 40) * 7919) % 1000:
        row["dup_only"] = i  # a later key than its twin: this row is the duplicate removed
    return row


def test_rows_parsed_in_columns_publish_what_rows_parsed_one_by_one_do(tmp_path, monkeypatch):
    """The columnar path (pyarrow's JSON reader) against json.loads per row (rows_table disabled): the same
    files, manifest and removals, including a column that only removed rows have and an all-null column."""
    def run(name: str) -> tuple[dict, dict]:
        return _publish(tmp_path, name, 16, monkeypatch, QualityConfig(near_dedup=False), row=_plain_row, n=80,
                        text_fields=("text", "maybe"))
    parsed: list[bool] = []
    rows_table = publish.rows_table

    def counted(blobs):
        table = rows_table(blobs)
        parsed.append(table is not None)
        return table
    monkeypatch.setattr(publish, "rows_table", counted)
    columns, column_files = run("columns")
    assert parsed and all(parsed)  # every bucket went the columnar way
    monkeypatch.setattr(publish, "rows_table", lambda blobs: None)
    one_by_one, row_files = run("rows")
    for m in (columns, one_by_one):
        m["dataset"].pop("num_bytes")  # Arrow's in-memory size: validity bitmaps differ by a few bytes
    assert columns["dataset"] == one_by_one["dataset"] and column_files == row_files
    ds = columns["dataset"]
    assert ds["quality"]["exact_duplicate"] > 0 and ds["num_rows"] == 80 - ds["quality"]["exact_duplicate"]
    data = pq.read_table(tmp_path / "columns" / "data")
    assert "dup_only" not in data.column_names and data.schema.field("none").type == "null"
    assert data.schema.field("flag").type == "bool" and data.schema.field("n").type == "int64"
