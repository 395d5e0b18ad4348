"""Durable bytes: every file of a run directory reaches the disk through `atomic_write` (temp file, fsync,
rename, fsync the directory), and crash tests stop the process at named points of it (SDG_KILL_AT)."""
from __future__ import annotations

import json
import os
import signal
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

KILL_POINTS = ("before_shard_write", "shard_write", "after_rename", "manifest_write", "after_commit")


_kill_counts: Counter[str] = Counter()


def kill_point(point: str) -> None:
    """SIGKILL this process the n-th time it reaches `point` when SDG_KILL_AT="<point>:<n>" (crash tests)."""
    spec = os.environ.get("SDG_KILL_AT")
    if not spec or spec.partition(":")[0] != point:
        return
    _kill_counts[point] += 1
    if _kill_counts[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def check_kill_spec() -> None:
    spec = os.environ.get("SDG_KILL_AT")
    if spec:
        point, _, n = spec.partition(":")
        if point not in KILL_POINTS or not (n == "" or n.isdigit()):
            raise ValueError(f"SDG_KILL_AT must be '<point>:<n>' with point in {KILL_POINTS}, got {spec!r}")


def _write_file(f, data: bytes) -> None:
    """The one place bytes reach a file (a seam for fault-injection tests)."""
    f.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a renamed file is not, until its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp: Path, kill: str | None = None) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename,
    fsync the directory. On any error the temp file is removed and the error propagates."""
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            _write_file(f, data[:half])
            f.flush()
            if kill:
                kill_point(kill)  # a crash here leaves a half-written temp file, as a real one would
            _write_file(f, data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic bytes: the same table gives the same file (and so the same checksum)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def atomic_text(path: Path):
    """A text file written to a temporary name, renamed onto `path` when complete (exports: a reader never
    sees half a file)."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
