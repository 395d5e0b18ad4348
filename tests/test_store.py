"""The run store: commits, resume, corruption, disk full, SIGKILL, publishing. No model needed."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import engine.store.files as store_mod
from engine.quality import QualityConfig
from engine.store import ConfigMismatch, RunStore, StoreError, config_hash, export

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"method": "demo", "seed": 7, "model": "tiny", "sampling": {"temperature": 0.7}}


def fill(store: RunStore, keys, stage: str = "gen") -> None:
    for k in keys:
        store.add(stage, {"key": k, "text": f"text of {k} " + " ".join(f"w{k}{j}" for j in range(8)), "n": len(k)})


def shard_files(out: Path, kind: str = "stages", stage: str = "gen") -> list[Path]:
    return sorted((out / kind / stage).glob("*.parquet"))


def load_dataset(pattern: str, cache: Path):
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset("parquet", data_files=pattern, split="train", cache_dir=str(cache))


def test_commit_resume_and_rejects(tmp_path):
    out = tmp_path / "run"
    with RunStore.open(out, CONFIG, commit_rows=3) as s:
        fill(s, ["b", "a"])
        assert s.maybe_commit() is False and s.done_keys("gen") == set()
        s.reject("gen", {"key": "c", "text": "cut"}, "truncated")
        assert s.maybe_commit() is True
        fill(s, ["d"])  # pending: committed by close()
    with RunStore.open(out, CONFIG) as s:
        assert s.done_keys("gen") == {"a", "b", "c", "d"}
        assert [r["key"] for r in s.rows("gen")] == ["a", "b", "d"]
        (rej,) = s.rejects("gen")
        assert (rej["key"], rej["reason"], rej["row"]) == ("c", "truncated", {"key": "c", "text": "cut"})
        with pytest.raises(ValueError, match="already committed or pending"):
            s.add("gen", {"key": "a"})
        assert s._seq == 4  # continues after w0-000001..3


def test_add_new_queues_only_keys_not_seen(tmp_path):
    """add_new (the pipeline's computed rows): a row or a reject for a new key, nothing for a key pending or
    committed; reject() still refuses a missing reason rather than taking the row for an accepted one."""
    with RunStore.open(tmp_path / "run", CONFIG) as s:
        fill(s, ["a"])
        s.commit()
        assert s.add_new("gen", {"key": "b", "text": "new"}) is True
        assert s.add_new("gen", {"key": "b", "text": "again"}) is False  # pending
        assert s.add_new("gen", {"key": "a", "text": "again"}) is False  # committed
        assert s.add_new("gen", {"key": "c", "text": "bad"}, "truncated") is True
        with pytest.raises(ValueError, match="non-empty reason"):
            s.reject("gen", {"key": "d"}, None)
        with pytest.raises(ValueError, match="non-empty reason"):
            s.add_new("gen", {"key": "e"}, "")
        s.commit()
        assert [r["key"] for r in s.rows("gen")] == ["a", "b"] and s.rows("gen")[1]["text"] == "new"
        assert [(r["key"], r["reason"]) for r in s.rejects("gen")] == [("c", "truncated")]


def test_add_rows_queues_what_add_new_would_one_by_one(tmp_path):
    """add_rows (a Compute stage's Rows batch): a key pending, committed or met earlier in the batch is not
    queued; a bad key or reason anywhere in the batch queues nothing."""
    with RunStore.open(tmp_path / "run", CONFIG) as s:
        fill(s, ["a"])
        s.commit()
        s.add("gen", {"key": "p", "text": "pending"})
        rows = [{"key": k, "text": t} for k, t in [("a", "again"), ("b", "new"), ("p", "again"), ("c", "bad"),
                                                    ("b", "twice"), ("d", "new")]]
        assert s.add_rows("gen", rows, [None, None, None, "truncated", None, None]) == \
            [False, True, False, True, False, True]
        with pytest.raises(ValueError, match="non-empty str 'key'"):
            s.add_rows("gen", [{"key": "e"}, {"text": "no key"}], [None, None])
        with pytest.raises(ValueError, match="non-empty reason"):
            s.add_rows("gen", [{"key": "e"}, {"key": "f"}], [None, ""])
        assert s.key_state("gen", "e") is None  # nothing of a refused batch was queued
        s.commit()
        assert [(r["key"], r["text"]) for r in s.rows("gen")][1:] == [("b", "new"), ("d", "new"), ("p", "pending")]
        assert s.rows("gen")[0]["text"].startswith("text of a")
        assert [(r["key"], r["reason"]) for r in s.rejects("gen")] == [("c", "truncated")]


def test_time_based_commit(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG, commit_rows=1000, commit_seconds=0.05) as s:
        fill(s, ["a"])
        assert s.maybe_commit() is False
        time.sleep(0.06)
        assert s.maybe_commit() is True
        assert s.done_keys("gen") == {"a"}


def test_config_mismatch_refused_and_new_makes_sibling(tmp_path):
    out = tmp_path / "run"
    RunStore.open(out, CONFIG).close()
    other = {**CONFIG, "seed": 8, "model": "big"}
    with pytest.raises(ConfigMismatch) as e:
        RunStore.open(out, other)
    msg = str(e.value)
    assert config_hash(CONFIG)[:12] in msg and config_hash(other)[:12] in msg
    assert "differing keys: model, seed" in msg and "--new" in msg and "--out" in msg
    with pytest.raises(ConfigMismatch, match="differing keys: model, seed"):
        RunStore.check(out, other)  # the same refusal, before any expensive setup
    RunStore.check(out, CONFIG)
    RunStore.check(out, other, new=True)
    RunStore.check(tmp_path / "absent", other)
    assert not (tmp_path / "absent").exists() and not (tmp_path / "run-2").exists()
    s2 = RunStore.open(out, other, new=True)
    s3 = RunStore.open(out, other, new=True)
    assert (s2.out.name, s3.out.name) == ("run-2", "run-3")
    s2.close(), s3.close()
    RunStore.open(tmp_path / "run-2", other).close()  # the sibling resumes like any run dir


def test_refuses_foreign_directory_and_second_live_writer(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not a run directory"):
        RunStore.open(tmp_path / "mine", CONFIG)
    with RunStore.open(tmp_path / "run", CONFIG):
        with pytest.raises(StoreError, match="in use by another live process"):
            RunStore.open(tmp_path / "run", CONFIG)


def test_two_writers_share_a_run(tmp_path):
    out = tmp_path / "run"
    a = RunStore.open(out, CONFIG, writer="r0")
    b = RunStore.open(out, CONFIG, writer="r1")
    fill(a, ["k1", "k3"])
    fill(b, ["k2"])
    a.record("gen", tokens=10)
    b.record("gen", tokens=5, seconds=0.5)
    a.commit(), b.commit()
    assert [r["key"] for r in a.rows("gen")] == ["k1", "k2", "k3"]
    assert b.done_keys("gen") == {"k1", "k2", "k3"}
    m = b.manifest()
    assert m["stages"]["gen"]["stats"] == {"seconds": 0.5, "tokens": 15}
    assert set(m["writers"]) == {"r0", "r1"}
    a.close(), b.close()


def test_corrupted_shards_are_quarantined_and_regenerated(tmp_path):
    out = tmp_path / "run"
    with RunStore.open(out, CONFIG, commit_rows=2) as s:
        for k in ["a", "b", "c", "d", "e", "f"]:
            fill(s, [k])
            s.maybe_commit()
    first, second, third = shard_files(out)
    first.write_bytes(first.read_bytes()[:-20])  # truncated
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    second.write_bytes(bytes(data))
    (out / "stages" / "gen" / ".tmp-w0-leftover.parquet").write_bytes(b"half")
    with RunStore.open(out, CONFIG) as s:
        assert s.done_keys("gen") == {"e", "f"}
        assert not list((out / "stages" / "gen").glob(".tmp-*"))
        m = json.loads((out / "manifest.json").read_text())
        assert sorted(q["file"] for q in m["quarantined"]) == sorted(
            f"stages/gen/{p.name}" for p in (first, second))
        assert all("checksum mismatch" in q["reason"] for q in m["quarantined"])
        fill(s, sorted({"a", "b", "c", "d"} - s.done_keys("gen")))
    with RunStore.open(out, CONFIG) as s:
        assert [r["key"] for r in s.rows("gen")] == ["a", "b", "c", "d", "e", "f"]
        assert s._seq == 5  # quarantined names are never reused


def test_disk_full_raises_and_keeps_committed_shards(tmp_path, monkeypatch):
    out = tmp_path / "run"
    s = RunStore.open(out, CONFIG)
    fill(s, ["a", "b"])
    s.commit()

    def full(f, data):
        f.write(data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store_mod, "_write_file", full)
    fill(s, ["c"])
    with pytest.raises(StoreError, match="cannot commit to .*No space left on device.*committed shards are intact, "
                                         "rerun to resume"):
        s.commit()
    assert not [p for p in out.rglob(".tmp-*")]
    assert len(shard_files(out)) == 1
    ds = load_dataset(str(out / "stages" / "gen" / "*.parquet"), tmp_path / "hf")
    assert sorted(ds["key"]) == ["a", "b"]
    monkeypatch.undo()
    s.commit()  # space is back: the pending row is still there
    s.close()
    with RunStore.open(out, CONFIG) as s2:
        assert s2.done_keys("gen") == {"a", "b", "c"}


def test_finalize_numbers_match_shards_and_is_idempotent(tmp_path):
    out = tmp_path / "run"
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"q": "alpha beta gamma delta epsilon"}) + "\n")
    with RunStore.open(out, CONFIG, commit_rows=4, identity={"engine": "0.1", "model": "tiny"}) as s:
        fill(s, [f"k{i:02d}" for i in range(10)])
        s.add("gen", {"key": "k10", "text": "TEXT of k00 " + " ".join(f"wk00{j}" for j in range(8)), "n": 3})
        s.add("gen", {"key": "k11", "text": "x alpha beta gamma delta epsilon y", "n": 1, "extra": {"a": 1}})
        s.add("gen", {"key": "k12", "text": "a kept row with one more field", "n": 2, "extra": {"b": [1]}})
        s.reject("gen", {"key": "r1"}, "invalid_json: Expecting value")
        s.reject("gen", {"key": "r2"}, "truncated")
        s.record("gen", tokens=100, seconds=2.0)
        s.record("gen", tokens=50)
        s.maybe_commit()
        q = QualityConfig(near_dedup=False, decontam_files=[{"path": str(bench), "columns": ["q"]}], decontam_ngram=4)
        m = s.finalize("gen", q)
        snapshot = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "locks" not in p.parts}
        m2 = s.finalize("gen", q)
        assert m2 == m
        assert {p: p.read_bytes() for p in snapshot} == snapshot

    ds = m["dataset"]
    data = pq.read_table(out / "data")
    assert data.num_rows == ds["num_rows"] == 11 == ds["quality"]["kept_rows"]
    assert ds["quality"]["input_rows"] == 13
    assert (ds["quality"]["exact_duplicate"], ds["quality"]["contaminated"]) == (1, 1)
    assert data.column_names == ["key", "text", "n", "extra"]  # order of first appearance
    assert data.column("extra").to_pylist() == [None] * 10 + [{"b": [1]}]  # absent field -> null
    for f in ds["files"]:
        blob = (out / f["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == f["sha256"] and len(blob) == f["bytes"]
        assert pq.read_metadata(out / f["file"]).num_rows == f["rows"]
    st = m["stages"]["gen"]
    assert st["rows"] == 13 and st["rejects"] == 2 and st["duplicate_keys"] == 0
    assert st["rejects_by_reason"] == {"invalid_json": 1, "truncated": 1}
    assert st["stats"] == {"seconds": 2.0, "tokens": 150}
    on_disk = {p.relative_to(out).as_posix(): p for p in (out / "stages" / "gen").glob("*.parquet")}
    assert {x["file"] for x in st["shards"]} == set(on_disk)
    assert sum(x["rows"] for x in st["shards"]) == sum(pq.read_metadata(p).num_rows for p in on_disk.values())

    with RunStore.open(out, CONFIG) as s:
        rej = {r["key"]: r for r in s.rejects("gen")}
    assert (rej["k10"]["reason"], rej["k10"]["duplicate_of"]) == ("exact_duplicate", "k00")
    assert (rej["k11"]["reason"], rej["k11"]["duplicate_of"]) == ("contaminated", f"{bench}#0")
    assert rej["k11"]["row"]["extra"] == {"a": 1} and rej["r2"]["reason"] == "truncated"

    readme = (out / "README.md").read_text()
    header = yaml.safe_load(readme.split("---\n")[1])
    info = header["dataset_info"]
    assert info["splits"][0]["num_examples"] == data.num_rows
    assert [f["name"] for f in info["features"]] == data.column_names
    assert header["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert "| 13 | 1 | 1 | 0 | 11 |" in readme and "invalid_json: 1, truncated: 1" in readme
    assert f"| {ds['diversity']['distinct_1']} |" in readme

    hf = load_dataset(str(out / "data" / "*.parquet"), tmp_path / "hf")
    assert hf.num_rows == 11 and hf.column_names == data.column_names

    assert export(out, "jsonl", tmp_path / "x.jsonl") == 11
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["key"] == "k00" and json.loads(lines[-1])["extra"] == {"b": [1]}
    assert export(out, "parquet", tmp_path / "x.parquet") == 11
    assert pq.read_table(tmp_path / "x.parquet").equals(data)


def test_mixed_value_types_publish_as_text(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as s:
        s.add("gen", {"key": "a", "text": "one two three four", "v": 1, "e": {}})
        s.add("gen", {"key": "b", "text": "five six seven eight", "v": "x", "e": {}})
        s.add("gen", {"key": "c", "text": "five six seven eight", "v": "x", "e": {}})
        m = s.finalize("gen", text_fields=["text", "v"])  # quality=None: no filters, duplicate c stays
    assert sorted(m["dataset"]["json_columns"]) == ["e", "v"]
    assert m["dataset"]["quality"]["kept_rows"] == 3 and m["dataset"]["diversity"]["distinct_1"] > 0
    assert pq.read_table(tmp_path / "run" / "data").column("v").to_pylist() == ["1", "x", "x"]
    with RunStore.open(tmp_path / "run", CONFIG) as s, pytest.raises(StoreError, match="text field 'body'"):
        s.finalize("gen", text_fields=["body"])


# A deterministic producer that a test kills with SDG_KILL_AT and then resumes.
WORKER = """
import json, sys
from engine.store import RunStore
out, log_path, run = sys.argv[1], sys.argv[2], sys.argv[3]
store = RunStore.open(out, {"method": "killtest"}, commit_rows=50, commit_seconds=3600)
done = store.done_keys("gen")
with open(log_path, "a") as log:
    log.write(json.dumps({"run": run, "done": sorted(done)}) + "\\n")
    log.flush()
    for i in range(1000):
        key = f"k{i}"
        if key in done:
            continue
        log.write(json.dumps({"run": run, "produced": key}) + "\\n")
        log.flush()  # in the kernel before add(): SIGKILL cannot lose it
        if i % 10 == 7:
            store.reject("gen", {"key": key, "i": i}, "truncated")
        else:
            store.add("gen", {"key": key, "text": f"text {i}", "i": i})
        store.maybe_commit()
store.close()
"""


def test_sigkill_at_every_point_then_resume(tmp_path):
    script, log, out = tmp_path / "worker.py", tmp_path / "log.jsonl", tmp_path / "run"
    script.write_text(WORKER)
    kills = ["before_shard_write:3", "shard_write:2", "after_rename:4", "manifest_write:3", "after_commit:2",
             "shard_write:5"]
    for run, point in enumerate(kills + [None]):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("SDG_KILL_AT", None)
        if point:
            env["SDG_KILL_AT"] = point
        p = subprocess.run([sys.executable, str(script), str(out), str(log), str(run)], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == (-signal.SIGKILL if point else 0), p.stderr
        json.loads((out / "manifest.json").read_text())  # always a whole manifest
        if point and point.startswith("shard_write"):
            assert list(out.rglob(".tmp-w0-*.parquet")), "a half-written temp shard is left, as after a crash"

    events = [json.loads(line) for line in log.read_text().splitlines()]
    done_at_start = {e["run"]: set(e["done"]) for e in events if "done" in e}
    produced: dict[str, list[str]] = {}
    for e in events:
        if "produced" in e:
            produced.setdefault(e["run"], []).append(e["produced"])
    for run, keys in produced.items():
        assert not set(keys) & done_at_start[run], f"run {run} regenerated committed keys"
        assert len(keys) == len(set(keys))
    assert len(done_at_start) == len(kills) + 1 and all(done_at_start[str(r)] for r in range(2, len(kills) + 1))

    with RunStore.open(out, {"method": "killtest"}) as s:
        all_keys = {f"k{i}" for i in range(1000)}
        assert s.done_keys("gen") == all_keys
        rows, rejects = s.rows("gen"), s.rejects("gen")
    assert len(rows) + len(rejects) == 1000
    assert {r["key"] for r in rows} | {r["key"] for r in rejects} == all_keys
    assert all(r["reason"] == "truncated" and int(r["key"][1:]) % 10 == 7 for r in rejects)
    m = json.loads((out / "manifest.json").read_text())["stages"]["gen"]
    assert sum(x["rows"] for x in m["shards"] + m["reject_shards"]) == 1000  # no key stored twice
    assert m["duplicate_keys"] == 0 and (m["rows"], m["rejects"]) == (900, 100)
    assert not list(out.rglob(".tmp-*"))
