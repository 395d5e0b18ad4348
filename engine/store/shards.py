"""Committed shards: one writer's handle on a run directory. Rows and rejects queue per stage and commit as
self-verifying parquet shards; every writer's committed keys are indexed, so a resumed or concurrent writer
skips them (see engine/store/__init__.py for the layout of a run directory)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

import engine.store.runs as runs
from engine.store.index import KeyIndex, key_hashes
from engine.store.files import atomic_write, check_kill_spec, fsync_dir, json_bytes, kill_point, now, parquet_bytes
from engine.store.runs import StoreError

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.large_string())])
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("duplicate_of", pa.string()), ("detail", pa.string()), ("row", pa.large_string())])
_KINDS = {"stages": ROW_SCHEMA, "rejects": REJECT_SCHEMA}  # shard directory -> its fixed schema
_SHARD = re.compile(r"^(?P<writer>[A-Za-z0-9_.]+)-(?P<seq>\d{6,})-(?P<sha>[0-9a-f]{16})\.parquet$")
_WRITER = re.compile(r"^[A-Za-z0-9_.]+$")
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # never starts with "_": rejects/_quality is ours
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(row, ensure_ascii=False), its encoder made once
# Column types that pyarrow's JSON reader infers exactly as pa.array() infers them from the parsed rows (it
# would read a date-like string as a timestamp, and an int too large for int64 as a double).
_PLAIN_TYPES = (pa.string(), pa.int64(), pa.bool_(), pa.null())


def rows_table(blobs: list[str], schema: pa.Schema | None = None) -> pa.Table | None:
    """Committed row blobs (JSON objects) parsed into columns by pyarrow's JSON reader, in C, where json.loads
    per row and columns built back from the dicts cost ~10 us a row (TDG publishes 1M rows). With `schema`:
    just those columns, of those types (absent fields null). Without: every field, in order of first
    appearance, or None when a column's type is not plain (see _PLAIN_TYPES), a field changes type, or the
    text cannot be parsed: the caller reads those rows with json.loads instead."""
    if not blobs:
        return None
    try:
        data = "\n".join(blobs).encode()
        parse = (pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore") if schema is not None
                 else pj.ParseOptions())
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(use_threads=False, block_size=1 << 26),
                             parse_options=parse)
    except (pa.ArrowException, UnicodeError, ValueError):
        return None
    if table.num_rows != len(blobs):
        return None
    if schema is None and not all(t in _PLAIN_TYPES for t in table.schema.types):
        return None
    return table.combine_chunks()


def _check_stage(stage: str) -> None:
    if not _STAGE.match(stage):
        raise ValueError(f"stage name must match {_STAGE.pattern}, got {stage!r}")


def _row_key(row: dict) -> str:
    """The row's key; ValueError unless the row is a dict with a non-empty str "key"."""
    key = row.get("key") if isinstance(row, dict) else None
    if not isinstance(key, str) or not key:
        raise ValueError(f"a row must be a dict with a non-empty str 'key', got {str(row)[:80]}")
    return key


def _check_reason(reason: str) -> None:
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"a reject needs a non-empty reason, got {reason!r}")


def _reason_kind(reason: str) -> str:
    """Rejects are counted by the part of the reason before ':' ("invalid_json: Expecting ..." -> "invalid_json")."""
    return reason.split(":", 1)[0].strip() or reason


# ---------------------------------------------------------------------------------------------- shards

@dataclass
class Shard:
    """A verified committed shard."""

    rel: str  # path relative to OUT, e.g. "stages/gen/w0-000003-0123456789abcdef.parquet"
    kind: str  # "stages" | "rejects"
    stage: str
    writer: str
    seq: int
    sha256: str
    rows: int
    reasons: Counter[str] = field(default_factory=Counter)  # rejects only: per reason kind

    @property
    def order(self) -> tuple[str, int]:
        return self.writer, self.seq



class ShardStore:
    """One writer's handle on a run directory (see the module docstring). Not thread-safe: one thread
    per handle; replicas use one handle each, with distinct writer ids."""

    @classmethod
    def open(cls, out: str | Path, config: dict, *, new: bool = False, writer: str = "w0",
             commit_rows: int = 1000, commit_seconds: float = 30.0, identity: dict | None = None) -> "ShardStore":
        """Open or create the run directory `out` for `config` (the whole run config, JSON-able).

        An existing OUT with the same config hash is resumed; a different hash raises ConfigMismatch.
        `new=True` with a non-empty OUT creates a sibling OUT-2, OUT-3, ... (`store.out` tells which).
        Rows are committed by `maybe_commit` once `commit_rows` are pending or `commit_seconds` have
        passed since the last commit. `identity` (engine, vLLM, model, hardware) goes to the manifest.
        """
        if not _WRITER.match(writer):
            raise ValueError(f"writer id must match {_WRITER.pattern}, got {writer!r}")
        if commit_rows <= 0 or commit_seconds <= 0:
            raise ValueError(f"commit_rows and commit_seconds must be > 0, got {commit_rows}, {commit_seconds}")
        check_kill_spec()
        out = Path(out)
        config = runs.canonical_config(config)
        chash = runs.config_hash(config)
        if new:
            out = runs.fresh_dir(out)
        runs.refuse_foreign(out)
        out.mkdir(parents=True, exist_ok=True)
        stored = runs.create_or_read_config(out, config, chash, identity)
        runs.check_same(out, stored, config, chash)
        return cls(out, stored, writer=writer, commit_rows=commit_rows, commit_seconds=commit_seconds,
                   identity=identity)

    @staticmethod
    def check(out: str | Path, config: dict, *, new: bool = False) -> None:
        """Raise what `open` would raise for OUT and `config` (ConfigMismatch, a foreign directory, a config
        that is not JSON), creating nothing: call it before an expensive setup such as an engine start."""
        out = Path(out)
        config = runs.canonical_config(config)
        if new:
            return
        runs.refuse_foreign(out)
        if (out / "config.json").exists():
            runs.check_same(out, runs.read_config(out / "config.json"), config, runs.config_hash(config))

    def __init__(self, out: Path, stored: dict, *, writer: str, commit_rows: int, commit_seconds: float,
                 identity: dict | None) -> None:
        self.out = out
        self.config: dict = stored["config"]
        self.config_hash: str = stored["config_hash"]
        self.created: str = stored["created"]
        self.identity = identity if identity is not None else stored.get("identity")
        self.writer = writer
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self._shards: dict[str, Shard] = {}
        self._row_keys: dict[str, KeyIndex] = {}  # stage -> committed row keys, every writer's
        self._reject_keys: dict[str, KeyIndex] = {}
        self.stage_order: list[str] = []
        """Stages in the order a commit writes them (the pipeline's declaration order; others after, by name):
        a parent's shard is renamed no later than its children's, so a crash never keeps a child without it."""
        self._pending_rows: dict[str, list[tuple[str, str]]] = {}
        self._pending_rejects: dict[str, list[tuple[str, str, str]]] = {}
        self._pending_keys: dict[str, set[str]] = {}
        self._stats_dirty = False
        self._last_commit = time.monotonic()
        self._lock_fd: int | None = None
        for d in ("stages", "rejects", "stats", "locks", "quarantine"):
            (out / d).mkdir(exist_ok=True)
        self._lock()
        if identity and stored.get("identity") and identity != stored["identity"]:
            log.warning("%s: identity differs from the one the run was created with: %s (was %s)",
                        out, identity, stored["identity"])
        self._remove_own_temps()
        self._own = self._read_stats(writer) or {"writer": writer, "commits": 0, "last_commit": None, "stages": {}}
        quarantined = self._refresh()
        self._seq = self._next_seq()
        if quarantined or not (out / "manifest.json").exists():
            self._write_manifest()

    # -- context manager
    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup helpers
    def _lock(self) -> None:
        """One live process per writer id: its shard names and sequence numbers are its own."""
        fd = os.open(self.out / "locks" / f"{self.writer}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"writer {self.writer!r} of {self.out} is in use by another live process; "
                             "give each replica its own writer id") from None
        self._lock_fd = fd  # the kernel releases it when the process dies, SIGKILL included

    def _remove_own_temps(self) -> None:
        """Temp files of a crashed predecessor with our writer id (only ours: others may be alive)."""
        prefix = f".tmp-{self.writer}-"
        fixed = [self.out, self.out / "stats", self.out / "data", self.out / "rejects" / "_quality"]
        for d in fixed + [self.out / k / s for k in _KINDS for s in self._stage_dirs(k)]:
            for p in d.glob(prefix + "*"):
                p.unlink(missing_ok=True)

    def _stage_dirs(self, kind: str) -> list[str]:
        base = self.out / kind
        return sorted(p.name for p in base.iterdir() if p.is_dir() and _STAGE.match(p.name))

    def _next_seq(self) -> int:
        seqs = [s.seq for s in self._shards.values() if s.writer == self.writer]
        for p in (self.out / "quarantine").rglob("*.parquet"):
            m = _SHARD.match(p.name)
            if m and m["writer"] == self.writer:
                seqs.append(int(m["seq"]))
        return max(seqs, default=0) + 1

    # -- reading and verifying shards
    def _refresh(self) -> int:
        """Verify and register shards not seen yet (ours from before a restart, other writers' new ones).
        Returns how many were quarantined."""
        bad = 0
        for kind in _KINDS:
            for stage in self._stage_dirs(kind):
                for p in sorted((self.out / kind / stage).iterdir()):
                    rel = p.relative_to(self.out).as_posix()
                    m = _SHARD.match(p.name)
                    if m and rel not in self._shards:
                        bad += not self._register(p, rel, kind, stage, m)
        return bad

    def _verified_table(self, path: Path, kind: str, sha16: str) -> tuple[pa.Table, str]:
        """The shard's table and full sha256; raises ValueError when it is not what its name promises."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not digest.startswith(sha16):
            raise ValueError(f"checksum mismatch (sha256 {digest[:16]}, name says {sha16}; {len(data)} bytes)")
        table = pq.read_table(pa.BufferReader(data))
        if not table.schema.equals(_KINDS[kind]):
            raise ValueError(f"unexpected schema {table.schema}")
        return table, digest

    def _register(self, path: Path, rel: str, kind: str, stage: str, m: re.Match) -> bool:
        try:
            table, digest = self._verified_table(path, kind, m["sha"])
        except FileNotFoundError:
            return True  # another writer quarantined it just now
        except Exception as e:  # pyarrow raises several types for a damaged file; all mean the same here
            self._quarantine(path, rel, str(e))
            return False
        self._index(Shard(rel, kind, stage, m["writer"], int(m["seq"]), digest, table.num_rows), table)
        return True

    def _index(self, shard: Shard, table: pa.Table) -> None:
        """Make a committed shard known: its keys count as done, its reject reasons as counted."""
        keys = table.column("key").to_pylist()
        if shard.kind == "rejects":
            shard.reasons = Counter(_reason_kind(r) for r in table.column("reason").to_pylist())
            self._reject_keys.setdefault(shard.stage, KeyIndex()).update(keys)
        else:
            self._row_keys.setdefault(shard.stage, KeyIndex()).update(keys)
        self._shards[shard.rel] = shard

    def _quarantine(self, path: Path, rel: str, why: str) -> None:
        dest = self.out / "quarantine" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return
        dest.with_name(dest.name + ".why").write_text(json.dumps({"file": rel, "reason": why, "time": now()}))
        log.warning("%s: shard %s is damaged (%s); moved to quarantine/, its keys will be regenerated",
                    self.out, rel, why)

    def _read(self, shard: Shard) -> pa.Table:
        """A registered shard's table, verified again: a shard damaged since it was registered is
        quarantined and raises, rather than silently losing its rows from the published dataset."""
        path = self.out / shard.rel
        try:
            return self._verified_table(path, shard.kind, shard.sha256[:16])[0]
        except Exception as e:
            if not isinstance(e, FileNotFoundError):
                self._quarantine(path, shard.rel, str(e))
            self._forget(shard)
            raise StoreError(f"shard {shard.rel} of {self.out} was damaged or removed after it was committed "
                             f"({e}); rerun to regenerate its rows") from None

    def _forget(self, shard: Shard) -> None:
        """Drop a shard and rebuild its stage's key set from the remaining shards' tables."""
        del self._shards[shard.rel]
        keysets = self._row_keys if shard.kind == "stages" else self._reject_keys
        keysets[shard.stage] = KeyIndex()
        for s in self._stage_shards(shard.kind, shard.stage):
            keysets[shard.stage].update(self._read(s).column("key").to_pylist())

    def _stage_shards(self, kind: str, stage: str) -> list[Shard]:
        return sorted((s for s in self._shards.values() if s.kind == kind and s.stage == stage),
                      key=lambda s: s.order)

    # -- the public API
    def done_keys(self, stage: str) -> set[str]:
        """Keys committed for `stage`, rows and rejects alike (a rejected key is done: never regenerated),
        by any writer. Pending (uncommitted) keys are not included."""
        self._refresh()
        return {k for kind in _KINDS for s in self._stage_shards(kind, stage)
                for k in self._read(s).column("key").to_pylist()}

    def key_state(self, stage: str, key: str) -> str | None:
        """Where `key` of `stage` stands for this writer: "pending" (added, not yet committed), "row" or
        "reject" (committed by any writer registered so far), or None. A lookup in the index: no disk."""
        if key in self._pending_keys.get(stage, ()):
            return "pending"
        if key in self._row_keys.get(stage, ()):
            return "row"
        if key in self._reject_keys.get(stage, ()):
            return "reject"
        return None

    def key_count(self, stage: str) -> int:
        """Committed keys of `stage` (rows and rejects, every writer's registered so far)."""
        return len(self._row_keys.get(stage, ())) + len(self._reject_keys.get(stage, ()))

    def snapshot(self) -> frozenset[str]:
        """The committed shards as of now (every writer's), to read later exactly this set (`iter_rows`)."""
        self._refresh()
        return frozenset(self._shards)

    def iter_rows(self, stage: str, *, within: frozenset[str] | None = None, mine_after: frozenset[str] | None = None):
        """Committed rows of `stage`, lazily, one shard at a time, in (writer, seq) order: the shards of the
        snapshot `within`, or this writer's shards committed since the snapshot `mine_after`, or all. A key
        committed twice (two writers) is yielded twice; callers skip keys they have already done."""
        for shard in self._stage_shards("stages", stage):
            if within is not None and shard.rel not in within:
                continue
            if mine_after is not None and (shard.writer != self.writer or shard.rel in mine_after):
                continue
            for row in self._read(shard).column("row").to_pylist():
                yield json.loads(row)

    def iter_columns(self, stage: str, schema: pa.Schema):
        """The columns `schema` names (of its types; null where a row lacks the field) of every committed row of
        `stage`, a table per shard, in (writer, seq) order (a key committed twice comes twice): figures over a
        large stage without a dict per row."""
        for shard in self._stage_shards("stages", stage):
            blobs = self._read(shard).column("row").to_pylist()
            table = rows_table(blobs, schema)
            if table is None:  # a value not of its column's type: StoreError names the column, not a JSON error
                raise StoreError(f"stage {stage!r}: a row of {shard.rel} has a field not of the types {schema}")
            yield table

    def _check_new_key(self, stage: str, row: dict, known_new: bool = False) -> str:
        _check_stage(stage)
        key = _row_key(row)
        if not known_new and self.key_state(stage, key) is not None:
            raise ValueError(f"key {key} is already committed or pending in stage {stage!r}; "
                             "skip done_keys() before generating")
        self._pending_keys.setdefault(stage, set()).add(key)
        return key

    @staticmethod
    def _dumps(stage: str, key: str, row: dict) -> str:
        try:
            return _ENCODE(row)
        except (TypeError, ValueError) as e:
            raise TypeError(f"row {key} of stage {stage!r} is not JSON-serializable: {e}") from None

    def add(self, stage: str, row: dict) -> None:
        """Queue a row (a dict with a str "key"; other values JSON-able) for the next commit."""
        self._queue(stage, row, None)

    def reject(self, stage: str, row: dict, reason: str) -> None:
        """Queue a rejected row with its reason ("truncated", "invalid_json: ...") for the next commit."""
        _check_reason(reason)  # None too: _queue would take it for a row
        self._queue(stage, row, reason)

    def add_new(self, stage: str, row: dict, reason: str | None = None) -> bool:
        """add (reason None) or reject the row unless its key is pending or committed already; returns whether
        it was queued. One look in the key index, where key_state and then add would make two: per-row
        stages (TDG's problems, 1M rows) spent ~4 us a row on the second."""
        key = row.get("key") if isinstance(row, dict) else None
        if isinstance(key, str) and self.key_state(stage, key) is not None:
            return False
        self._queue(stage, row, reason, known_new=True)
        return True

    def add_rows(self, stage: str, rows: list[dict], reasons: list[str | None]) -> list[bool]:
        """add_new over a batch (reasons[i] None: row i is a row, else a reject with that reason): which rows were
        queued. A key pending, committed or met earlier in the batch is not. The committed keys are looked up
        for the whole batch at once (KeyIndex.holds), and nothing is queued if a key or reason is bad."""
        _check_stage(stage)
        keys = [_row_key(row) for row in rows]
        for reason in reasons:
            if reason is not None:
                _check_reason(reason)
        committed = self._committed(stage, keys)
        pending = self._pending_keys.setdefault(stage, set())
        queued_rows = self._pending_rows.setdefault(stage, [])
        queued_rejects = self._pending_rejects.setdefault(stage, [])
        queued = []
        for row, key, reason, done in zip(rows, keys, reasons, committed):
            if done or key in pending:
                queued.append(False)
                continue
            blob = self._dumps(stage, key, row)
            pending.add(key)
            if reason is None:
                queued_rows.append((key, blob))
            else:
                queued_rejects.append((key, reason, blob))
            queued.append(True)
        return queued

    def _committed(self, stage: str, keys: list[str]) -> list[bool]:
        """Whether each key is committed (a row or a reject) for `stage`, by any writer registered so far."""
        indexes = [ix for ix in (self._row_keys.get(stage), self._reject_keys.get(stage)) if ix is not None]
        if not indexes:
            return [False] * len(keys)
        hashes = key_hashes(keys)
        found = indexes[0].holds(hashes)
        for index in indexes[1:]:
            found |= index.holds(hashes)
        return found.tolist()

    def _queue(self, stage: str, row: dict, reason: str | None, known_new: bool = False) -> None:
        if reason is not None:
            _check_reason(reason)
        blob = self._dumps(stage, str(row.get("key")) if isinstance(row, dict) else "?", row)
        key = self._check_new_key(stage, row, known_new)
        if reason is None:
            self._pending_rows.setdefault(stage, []).append((key, blob))
        else:
            self._pending_rejects.setdefault(stage, []).append((key, reason, blob))

    def record(self, stage: str, **stats: float) -> None:
        """Add numeric stats for `stage` (tokens, seconds, accepted, ...); sums are kept per writer,
        committed with the next commit, and summed across writers in the manifest."""
        sums = self._own["stages"].setdefault(stage, {})
        for name, v in stats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"stat {name} of stage {stage!r} must be a finite number, got {v!r}")
            sums[name] = sums.get(name, 0) + v
        self._stats_dirty = True

    def own_stats(self, stage: str) -> dict:
        """This writer's recorded sums for `stage` so far (committed or not)."""
        return dict(self._own["stages"].get(stage, {}))

    def record_writer(self, **totals: float) -> None:
        """Add numeric totals of this writer that belong to no stage (the pipeline's generating seconds: its
        stages overlap, so their own seconds do not add up); shown per writer in the manifest."""
        sums = self._own.setdefault("totals", {})
        for name, v in totals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"total {name} must be a finite number, got {v!r}")
            sums[name] = sums.get(name, 0) + v
        self._stats_dirty = True

    def pending(self) -> int:
        """Rows and rejects queued and not yet committed."""
        return sum(map(len, self._pending_rows.values())) + sum(map(len, self._pending_rejects.values()))

    def maybe_commit(self) -> bool:
        """Commit if commit_rows are pending or commit_seconds have passed since the last commit."""
        n = self.pending()
        due = n >= self.commit_rows or (n and time.monotonic() - self._last_commit >= self.commit_seconds)
        if due:
            self.commit()
        return bool(due)

    def commit(self) -> None:
        """Make everything pending durable now: one shard per stage with pending rows or rejects, then this
        writer's stats, then the manifest. An OSError (disk full, ...) raises StoreError; whatever shards
        were renamed before it are committed, the rest stay pending."""
        if not self.pending() and not self._stats_dirty:
            return
        counts = {"rows": {st: len(v) for st, v in self._pending_rows.items()},
                  "rejects": {st: len(v) for st, v in self._pending_rejects.items()}}
        try:
            for stage in self._commit_order(self._pending_rows):
                rows = self._pending_rows[stage]
                table = pa.table({"key": [k for k, _ in rows], "row": [r for _, r in rows]}, schema=ROW_SCHEMA)
                self._commit_shard("stages", stage, table)
                del self._pending_rows[stage]
            for stage in self._commit_order(self._pending_rejects):
                rej = self._pending_rejects[stage]
                table = pa.table({"key": [k for k, _, _ in rej], "stage": [stage] * len(rej),
                                  "reason": [r for _, r, _ in rej], "duplicate_of": [None] * len(rej),
                                  "detail": [None] * len(rej), "row": [b for _, _, b in rej]}, schema=REJECT_SCHEMA)
                self._commit_shard("rejects", stage, table)
                del self._pending_rejects[stage]
            self._pending_keys = {}
            self._own["commits"] += 1
            self._own["last_commit"] = now()
            self._own["identity"] = self.identity
            atomic_write(self.out / "stats" / f"{self.writer}.json", json_bytes(self._own),
                          self.out / "stats" / f".tmp-{self.writer}-stats.json")
            self._stats_dirty = False
            self._log_commit(counts)
            self._write_manifest()
        except OSError as e:
            raise StoreError(f"cannot commit to {self.out}: {e.strerror or e}; committed shards are intact, "
                             "rerun to resume") from e
        self._last_commit = time.monotonic()
        kill_point("after_commit")

    def _commit_order(self, pending: dict[str, list]) -> list[str]:
        order = {st: i for i, st in enumerate(self.stage_order)}
        return sorted(pending, key=lambda st: (order.get(st, len(order)), st))

    def _log_commit(self, counts: dict) -> None:
        """One line per commit in stats/<writer>.commits.jsonl: when, what it committed per stage, and this
        writer's cumulative stats then (tokens, seconds): throughput over time, per replica, for reports. A
        line torn by a crash is skipped by readers (engine.store.timings)."""
        line = {"commit": self._own["commits"], "time": round(time.time(), 3), **counts,
                "stages": self._own["stages"]}
        with open(self.out / "stats" / f"{self.writer}.commits.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def _commit_shard(self, kind: str, stage: str, table: pa.Table) -> None:
        kill_point("before_shard_write")
        data = parquet_bytes(table)
        digest = hashlib.sha256(data).hexdigest()
        name = f"{self.writer}-{self._seq:06d}-{digest[:16]}.parquet"
        d = self.out / kind / stage
        if not d.is_dir():
            d.mkdir(exist_ok=True)  # another writer may create it at the same moment
            fsync_dir(d.parent)
        atomic_write(d / name, data, d / f".tmp-{self.writer}-{name}", kill="shard_write")
        kill_point("after_rename")
        self._seq += 1
        rel = f"{kind}/{stage}/{name}"
        self._index(Shard(rel, kind, stage, self.writer, self._seq - 1, digest, table.num_rows), table)

    def rows(self, stage: str) -> list[dict]:
        """All committed rows of `stage` from every writer, one per key, sorted by key. A key committed
        twice (two replicas given the same key) appears once: the first in (writer, seq) order."""
        self._refresh()
        seen: dict[str, str] = {}
        for shard in self._stage_shards("stages", stage):
            t = self._read(shard)
            for k, r in zip(t.column("key").to_pylist(), t.column("row").to_pylist()):
                seen.setdefault(k, r)
        return [json.loads(seen[k]) for k in sorted(seen)]

    def rejects(self, stage: str | None = None) -> list[dict]:
        """Committed rejects (of `stage`, or all), sorted by (stage, key): dicts with key, stage, reason,
        duplicate_of, detail and row (the rejected row). Includes the quality filters' removals of the
        last finalize (reasons exact_duplicate, near_duplicate, contaminated)."""
        self._refresh()
        stages = [stage] if stage else self._stage_dirs("rejects")
        tables = [self._read(s) for st in stages for s in self._stage_shards("rejects", st)]
        tables += [pq.read_table(p) for p in sorted((self.out / "rejects" / "_quality").glob("*.parquet"))]
        out = [r for t in tables for r in t.to_pylist() if stage is None or r["stage"] == stage]
        for r in out:
            r["row"] = json.loads(r["row"])
        return sorted(out, key=lambda r: (r["stage"], r["key"], r["reason"]))

    def close(self) -> None:
        """Commit what is pending and release the writer lock."""
        try:
            self.commit()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

