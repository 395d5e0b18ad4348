"""The run store: every row a method generates is committed here, so a run can be killed at any moment
(SIGKILL, OOM, power loss) and resumed with nothing lost that was committed and nothing duplicated.

Layout of a run directory OUT:

    config.json                        written once at creation: format, config, config_hash, identity, created
    stages/<stage>/<writer>-<seq>-<sha16>.parquet    committed rows: columns key, row (JSON of the whole row)
    rejects/<stage>/<writer>-<seq>-<sha16>.parquet   committed rejects: key, stage, reason, duplicate_of,
                                                     detail, row
    stats/<writer>.json                each writer's cumulative record() sums (replaced atomically per commit)
    locks/<writer>.lock                flock held by the live process of that writer id
    quarantine/...                     shards that failed verification, with a .why file each
    manifest.json                      summary rebuilt from the above, replaced atomically
    data/train-00000-of-0000N.parquet  published dataset (finalize); columnar, one schema
    rejects/_quality/*.parquet         rows removed by the quality filters (finalize)
    README.md                          dataset card (finalize)

A shard is self-verifying: `sha16` is the first 16 hex digits of the sha256 of its bytes. A commit writes
a temp file (name starting with ".tmp-<writer>-"), fsyncs it, renames it to its final name and fsyncs the
directory, so the committed set is exactly the set of well-named shard files: no journal to keep in step.
Several writers (replicas) may share OUT; each writes only files named with its own writer id.

Crash tests: SDG_KILL_AT="<point>:<n>" makes the process SIGKILL itself the n-th time it reaches <point>,
one of KILL_POINTS (before_shard_write, shard_write [temp file half written], after_rename,
manifest_write [temp half written], after_commit).

    >>> with RunStore.open("runs/demo", {"method": "tdg", "seed": 0}) as store:  # doctest: +SKIP
    ...     for key in sorted({"k1", "k2"} - store.done_keys("gen")):
    ...         store.add("gen", {"key": key, "text": "..."})
    ...         store.maybe_commit()
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from engine.quality import QualityConfig, Removal, apply_filters, diversity_report
from engine.quality import card

log = logging.getLogger(__name__)

FORMAT = "sdg-run/1"
KILL_POINTS = ("before_shard_write", "shard_write", "after_rename", "manifest_write", "after_commit")
DATA_SHARD_ROWS = 100_000  # most rows per published data/ shard

ROW_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.large_string())])
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("duplicate_of", pa.string()), ("detail", pa.string()), ("row", pa.large_string())])
_KINDS = {"stages": ROW_SCHEMA, "rejects": REJECT_SCHEMA}  # shard directory -> its fixed schema
_SHARD = re.compile(r"^(?P<writer>[A-Za-z0-9_.]+)-(?P<seq>\d{6,})-(?P<sha>[0-9a-f]{16})\.parquet$")
_WRITER = re.compile(r"^[A-Za-z0-9_.]+$")
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # never starts with "_": rejects/_quality is ours


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class ConfigMismatch(StoreError):
    """OUT holds a run of a different config."""


# ---------------------------------------------------------------------------------------------- low level

_kill_counts: Counter[str] = Counter()


def _kill_point(point: str) -> None:
    """SIGKILL this process the n-th time it reaches `point` when SDG_KILL_AT="<point>:<n>" (crash tests)."""
    spec = os.environ.get("SDG_KILL_AT")
    if not spec or spec.partition(":")[0] != point:
        return
    _kill_counts[point] += 1
    if _kill_counts[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _check_kill_spec() -> None:
    spec = os.environ.get("SDG_KILL_AT")
    if spec:
        point, _, n = spec.partition(":")
        if point not in KILL_POINTS or not (n == "" or n.isdigit()):
            raise ValueError(f"SDG_KILL_AT must be '<point>:<n>' with point in {KILL_POINTS}, got {spec!r}")


def _write_file(f, data: bytes) -> None:
    """The one place bytes reach a file (a seam for fault-injection tests)."""
    f.write(data)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a renamed file is not, until its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, tmp: Path, kill: str | None = None) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename,
    fsync the directory. On any error the temp file is removed and the error propagates."""
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            _write_file(f, data[:half])
            f.flush()
            if kill:
                _kill_point(kill)  # a crash here leaves a half-written temp file, as a real one would
            _write_file(f, data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic bytes: the same table gives the same file (and so the same checksum)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_config(config: dict) -> dict:
    """The config as JSON would give it back (tuples become lists, ...), so hash and comparison agree."""
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"the run config must be JSON-serializable: {e}") from None


def config_hash(config: dict) -> str:
    """sha256 of the config serialized with sorted keys: `config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})`."""
    blob = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def _fresh_dir(out: Path) -> Path:
    """OUT if it is absent or empty, else the first absent-or-empty sibling OUT-2, OUT-3, ..."""
    for i in range(1, 10_000):
        cand = out if i == 1 else out.with_name(f"{out.name}-{i}")
        try:
            cand.mkdir(parents=True)  # claims the name, even against a concurrent `--new`
            return cand
        except FileExistsError:
            if cand.is_dir() and not any(cand.iterdir()):
                return cand
    raise StoreError(f"no free sibling run directory for {out} (tried {out.name}-2 ... {out.name}-9999)")


def _differing_keys(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k, ...) != b.get(k, ...)]


def _refuse_foreign(out: Path) -> None:
    """OUT must be a directory that is empty (temp files aside) or holds config.json."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} exists and is not a directory; choose another --out")
    if not out.exists() or (out / "config.json").exists():
        return
    strays = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if strays:
        raise StoreError(f"{out} is not empty and is not a run directory (no config.json; it holds "
                         f"{', '.join(sorted(strays)[:5])}); choose another --out")


def _read_config(path: Path) -> dict:
    stored = json.loads(path.read_text())
    if stored.get("format") != FORMAT:
        raise StoreError(f"{path} has format {stored.get('format')!r}; this engine reads {FORMAT!r}")
    return stored


def _check_same(out: Path, stored: dict, config: dict, chash: str) -> None:
    if stored["config_hash"] != chash:
        keys = _differing_keys(stored["config"], config)
        raise ConfigMismatch(
            f"{out} holds a run of another config (stored hash {stored['config_hash'][:12]}, this config "
            f"{chash[:12]}; differing keys: {', '.join(keys[:5]) or '(none at top level)'}). "
            f"Pass --new to start a separate run directory, or choose another --out.")


def _create_or_read_config(out: Path, config: dict, chash: str, identity: dict | None) -> dict:
    """config.json of OUT, created (exclusively, via link) if OUT is a new or empty directory."""
    path = out / "config.json"
    if not path.exists():
        info = {"format": FORMAT, "config_hash": chash, "config": config, "identity": identity, "created": _now()}
        tmp = out / f".tmp-config-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            _write_file(f, _json_bytes(info))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created it first: then theirs is read below
            _fsync_dir(out)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _read_config(path)


# ---------------------------------------------------------------------------------------------- the store

class RunStore:
    """One writer's handle on a run directory (see the module docstring). Not thread-safe: one thread
    per handle; replicas use one handle each, with distinct writer ids."""

    @classmethod
    def open(cls, out: str | Path, config: dict, *, new: bool = False, writer: str = "w0",
             commit_rows: int = 1000, commit_seconds: float = 30.0, identity: dict | None = None) -> "RunStore":
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
        _check_kill_spec()
        out = Path(out)
        config = canonical_config(config)
        chash = config_hash(config)
        if new:
            out = _fresh_dir(out)
        _refuse_foreign(out)
        out.mkdir(parents=True, exist_ok=True)
        stored = _create_or_read_config(out, config, chash, identity)
        _check_same(out, stored, config, chash)
        return cls(out, stored, writer=writer, commit_rows=commit_rows, commit_seconds=commit_seconds,
                   identity=identity)

    @staticmethod
    def check(out: str | Path, config: dict, *, new: bool = False) -> None:
        """Raise what `open` would raise for OUT and `config` (ConfigMismatch, a foreign directory, a config
        that is not JSON), creating nothing: call it before an expensive setup such as an engine start."""
        out = Path(out)
        config = canonical_config(config)
        if new:
            return
        _refuse_foreign(out)
        if (out / "config.json").exists():
            _check_same(out, _read_config(out / "config.json"), config, config_hash(config))

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
        self._row_keys: dict[str, set[str]] = {}
        self._reject_keys: dict[str, set[str]] = {}
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
    def __enter__(self) -> "RunStore":
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
            self._reject_keys.setdefault(shard.stage, set()).update(keys)
        else:
            self._row_keys.setdefault(shard.stage, set()).update(keys)
        self._shards[shard.rel] = shard

    def _quarantine(self, path: Path, rel: str, why: str) -> None:
        dest = self.out / "quarantine" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return
        dest.with_name(dest.name + ".why").write_text(json.dumps({"file": rel, "reason": why, "time": _now()}))
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
        keysets[shard.stage] = {k for s in self._stage_shards(shard.kind, shard.stage)
                                for k in self._read(s).column("key").to_pylist()}

    def _stage_shards(self, kind: str, stage: str) -> list[Shard]:
        return sorted((s for s in self._shards.values() if s.kind == kind and s.stage == stage),
                      key=lambda s: s.order)

    # -- the public API
    def done_keys(self, stage: str) -> set[str]:
        """Keys committed for `stage`, rows and rejects alike (a rejected key is done: never regenerated),
        by any writer. Pending (uncommitted) keys are not included."""
        self._refresh()
        return set(self._row_keys.get(stage, ())) | self._reject_keys.get(stage, set())

    def _check_new_key(self, stage: str, row: dict) -> str:
        if not _STAGE.match(stage):
            raise ValueError(f"stage name must match {_STAGE.pattern}, got {stage!r}")
        key = row.get("key") if isinstance(row, dict) else None
        if not isinstance(key, str) or not key:
            raise ValueError(f"a row must be a dict with a non-empty str 'key', got {str(row)[:80]}")
        if (key in self._pending_keys.get(stage, ()) or key in self._row_keys.get(stage, ())
                or key in self._reject_keys.get(stage, ())):
            raise ValueError(f"key {key} is already committed or pending in stage {stage!r}; "
                             "skip done_keys() before generating")
        self._pending_keys.setdefault(stage, set()).add(key)
        return key

    @staticmethod
    def _dumps(stage: str, key: str, row: dict) -> str:
        try:
            return json.dumps(row, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"row {key} of stage {stage!r} is not JSON-serializable: {e}") from None

    def add(self, stage: str, row: dict) -> None:
        """Queue a row (a dict with a str "key"; other values JSON-able) for the next commit."""
        blob = self._dumps(stage, str(row.get("key")) if isinstance(row, dict) else "?", row)
        key = self._check_new_key(stage, row)
        self._pending_rows.setdefault(stage, []).append((key, blob))

    def reject(self, stage: str, row: dict, reason: str) -> None:
        """Queue a rejected row with its reason ("truncated", "invalid_json: ...") for the next commit."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"a reject needs a non-empty reason, got {reason!r}")
        blob = self._dumps(stage, str(row.get("key")) if isinstance(row, dict) else "?", row)
        key = self._check_new_key(stage, row)
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
        try:
            for stage in sorted(self._pending_rows):
                rows = self._pending_rows[stage]
                table = pa.table({"key": [k for k, _ in rows], "row": [r for _, r in rows]}, schema=ROW_SCHEMA)
                self._commit_shard("stages", stage, table)
                del self._pending_rows[stage]
            for stage in sorted(self._pending_rejects):
                rej = self._pending_rejects[stage]
                table = pa.table({"key": [k for k, _, _ in rej], "stage": [stage] * len(rej),
                                  "reason": [r for _, r, _ in rej], "duplicate_of": [None] * len(rej),
                                  "detail": [None] * len(rej), "row": [b for _, _, b in rej]}, schema=REJECT_SCHEMA)
                self._commit_shard("rejects", stage, table)
                del self._pending_rejects[stage]
            self._pending_keys = {}
            self._own["commits"] += 1
            self._own["last_commit"] = _now()
            self._own["identity"] = self.identity
            _atomic_write(self.out / "stats" / f"{self.writer}.json", _json_bytes(self._own),
                          self.out / "stats" / f".tmp-{self.writer}-stats.json")
            self._stats_dirty = False
            self._write_manifest()
        except OSError as e:
            raise StoreError(f"cannot commit to {self.out}: {e.strerror or e}; committed shards are intact, "
                             "rerun to resume") from e
        self._last_commit = time.monotonic()
        _kill_point("after_commit")

    def _commit_shard(self, kind: str, stage: str, table: pa.Table) -> None:
        _kill_point("before_shard_write")
        data = _parquet_bytes(table)
        digest = hashlib.sha256(data).hexdigest()
        name = f"{self.writer}-{self._seq:06d}-{digest[:16]}.parquet"
        d = self.out / kind / stage
        if not d.is_dir():
            d.mkdir(exist_ok=True)  # another writer may create it at the same moment
            _fsync_dir(d.parent)
        _atomic_write(d / name, data, d / f".tmp-{self.writer}-{name}", kill="shard_write")
        _kill_point("after_rename")
        self._seq += 1
        rel = f"{kind}/{stage}/{name}"
        self._index(Shard(rel, kind, stage, self.writer, self._seq - 1, digest, table.num_rows), table)

    def rows(self, stage: str, *, wait: bool = True) -> list[dict]:
        """All committed rows of `stage` from every writer, one per key, sorted by key. A key committed
        twice (two replicas given the same key) appears once: the first in (writer, seq) order. (`wait` is
        for replicas, engine.parallel.ReplicaStore: a store handle on its own has no one to wait for.)"""
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

    # -- the manifest
    def _read_stats(self, writer: str) -> dict | None:
        try:
            return json.loads((self.out / "stats" / f"{writer}.json").read_text())
        except FileNotFoundError:
            return None

    def _all_stats(self) -> dict[str, dict]:
        out = {}
        for p in sorted((self.out / "stats").glob("*.json")):
            if p.name.startswith("."):  # another writer's temp file, half written (pathlib's glob matches it)
                continue
            w = p.stem
            out[w] = self._own if w == self.writer else self._read_stats(w)
        out.setdefault(self.writer, self._own)
        return {w: s for w, s in out.items() if s}

    def _stage_summary(self, stage: str, writers: dict[str, dict]) -> dict:
        rows = self._stage_shards("stages", stage)
        rej = self._stage_shards("rejects", stage)
        reasons = sum((s.reasons for s in rej), Counter())
        stats: dict[str, float] = {}
        for w in writers.values():
            for k, v in w.get("stages", {}).get(stage, {}).items():
                stats[k] = stats.get(k, 0) + v
        n_rows = len(self._row_keys.get(stage, ()))
        return {
            "rows": n_rows,
            "duplicate_keys": sum(s.rows for s in rows) - n_rows,
            "rejects": len(self._reject_keys.get(stage, ())),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "stats": dict(sorted(stats.items())),
            "shards": [{"file": s.rel, "rows": s.rows, "sha256": s.sha256} for s in rows],
            "reject_shards": [{"file": s.rel, "rows": s.rows, "sha256": s.sha256} for s in rej],
        }

    def _quarantined(self) -> list[dict]:
        out = []
        for why in sorted((self.out / "quarantine").rglob("*.why")):
            try:
                out.append(json.loads(why.read_text()))
            except ValueError:
                out.append({"file": why.name[:-4], "reason": "unknown"})
        return out

    def manifest(self, dataset: dict | None = None) -> dict:
        """The manifest as it would be written now; `dataset` is finalize's section (None before)."""
        writers = self._all_stats()
        stages = sorted({s.stage for s in self._shards.values()}
                        | {st for w in writers.values() for st in w.get("stages", {})})
        commits = [w["last_commit"] for w in writers.values() if w.get("last_commit")]
        return {
            "format": FORMAT,
            "name": self.out.name,
            "config_hash": self.config_hash,
            "config": self.config,
            "seed": self.config.get("seed"),
            "identity": self.identity,
            "created": self.created,
            "updated": max(commits, default=self.created),
            "writers": {w: {"commits": s.get("commits", 0), "last_commit": s.get("last_commit"),
                            "identity": s.get("identity")} for w, s in writers.items()},
            "stages": {st: self._stage_summary(st, writers) for st in stages},
            "quarantined": self._quarantined(),
            "dataset": dataset,
        }

    def _write_manifest(self, dataset: dict | None = None) -> dict:
        m = self.manifest(dataset)
        _atomic_write(self.out / "manifest.json", _json_bytes(m), self.out / f".tmp-{self.writer}-manifest.json",
                      kill="manifest_write")
        return m

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
            _atomic_write(self.out / "README.md", card.render(m).encode(), self.out / f".tmp-{self.writer}-README.md")
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
            data = _parquet_bytes(table.slice(i * DATA_SHARD_ROWS, DATA_SHARD_ROWS))
            name = f"{prefix}-{i:05d}-of-{n:05d}.parquet"
            _atomic_write(d / name, data, d / f".tmp-{self.writer}-{name}")
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

    def one(r: dict) -> str:
        vals = [r.get(f) for f in fields]
        return "\n".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
                         for v in vals if v is not None)
    return [one(r) for r in rows]


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
