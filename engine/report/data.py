"""What a report reads from a run directory, read-only: committed shards (parquet, read with pyarrow), the
writers' stats, the per-commit timings and the manifest. Nothing is written to the run directory and no writer
lock is taken, so a report of a run still in progress sees exactly what is committed at that moment (temp files,
named `.tmp-...`, are never read).

    run = read_run(Path("runs/tdg-demo"))
    run.stages["templates"].reasons    # Counter of reject reasons
    run.fields["problems"]["template_id"]   # values of one field over the rows read
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from engine.config import ConfigError
from engine.store.timings import commits as read_commits

_SHARD = re.compile(r"^(?P<writer>[A-Za-z0-9_.]+)-(?P<seq>\d{6,})-(?P<sha>[0-9a-f]{16})\.parquet$")

ROWS_READ = 200_000
"""Rows read per stage for per-row figures (lengths, method figures); counts always cover every row."""
SAMPLES = 4
"""Sample rows (and sample rejects) shown per stage."""


class ReportError(ConfigError):
    """The directory is not a run directory a report can be made of."""


@dataclass
class StageData:
    """One stage as committed: counts of every shard, and per-row figures of the rows read."""

    name: str
    rows: int = 0
    rejects: int = 0
    reasons: Counter = field(default_factory=Counter)
    stats: dict = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    """output_tokens of the rows and rejects read that record it (model stages)."""
    reject_lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    """Rejects whose reason is `truncated` plus rows whose finish_reason is `length`."""
    rows_read: int = 0
    finish_known: int = 0
    """Rows read that record their finish_reason (rows that do not can only be counted as truncated by their
    rejects)."""
    samples: list[dict] = field(default_factory=list)
    reject_samples: list[dict] = field(default_factory=list)
    first_commit: float | None = None

    @property
    def model(self) -> bool:
        """Whether the model generated this stage (a Compute stage records no generated count)."""
        return bool(self.stats.get("generated") or self.stats.get("output_tokens"))

    @property
    def settled(self) -> int:
        return self.rows + self.rejects


@dataclass
class RunData:
    out: Path
    config: dict
    manifest: dict | None
    stages: dict[str, StageData]
    commits: list[dict]
    removals: list[dict]
    """The quality filters' removals of the last publish (reason, duplicate_of, detail, key)."""
    fields: dict[str, dict[str, list]]
    """stage -> field -> values over the rows read, for the fields the method sections ask for."""
    reject_fields: dict[str, dict[str, list]]
    published: bool
    in_progress: bool
    writer_totals: dict[str, dict] = field(default_factory=dict)
    """writer -> its totals that belong to no stage (generating_seconds: its engines' generate loops)."""

    @property
    def method(self) -> str:
        return str(self.config.get("method") or "?")


def _shards(out: Path, kind: str) -> dict[str, list[Path]]:
    """stage -> its committed shard files, in (writer, seq) order."""
    base = out / kind
    found: dict[str, list[Path]] = {}
    if not base.is_dir():
        return found
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        files = [(m["writer"], int(m["seq"]), p) for p in d.iterdir() if (m := _SHARD.match(p.name))]
        found[d.name] = [p for _, _, p in sorted(files)]
    return found


def _stats(out: Path, writer_totals: dict[str, dict] | None = None) -> dict[str, dict]:
    """stage -> the writers' record() sums added up (what the manifest shows, but as of now); each writer's own
    totals (generating seconds) go to `writer_totals`."""
    total: dict[str, dict] = {}
    for p in sorted((out / "stats").glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            data = json.loads(p.read_text())
            stages = data.get("stages", {})
        except (OSError, ValueError, AttributeError):
            continue
        if writer_totals is not None and isinstance(data.get("totals"), dict):
            writer_totals[p.stem] = data["totals"]
        for stage, sums in stages.items():
            t = total.setdefault(stage, {})
            for k, v in sums.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    t[k] = t.get(k, 0) + v
    return total


def declared_stages(config: dict) -> list[str] | None:
    """The stage names the run's method declares, in order, from its stored config; None when the method cannot
    declare them from it (an input file's content is not stored: file params are left at their defaults)."""
    import tempfile

    from engine import methods
    try:
        module = methods.load(str(config.get("method")))
        params = {k: v for k, v in (config.get("params") or {}).items()
                  if not (k in getattr(module, "FILE_PARAMS", ()) and isinstance(v, dict))}
        with tempfile.TemporaryDirectory(prefix="sdg-report-") as tmp:
            ctx = methods.Context(out=Path(tmp), seed=int(config.get("seed") or 0), progress=False)
            return module.pipeline(module.Config.model_validate(params), ctx).names
    except Exception:  # noqa: BLE001 - the order is a nicety; commit order is the fallback
        return None


def _stage_order(names: set[str], commits: list[dict], config: dict) -> list[str]:
    """Stages in the method's declared order; else in the order they first committed (a parent commits no
    later than its children); then any others by name."""
    declared = declared_stages(config)
    if declared:
        return [n for n in declared if n in names] + sorted(names - set(declared))
    order: list[str] = []
    for c in commits:
        for part in ("rows", "rejects"):
            for stage in (c.get(part) or {}):
                if stage in names and stage not in order:
                    order.append(stage)
    return order + sorted(names - set(order))


def read_run(out: Path, wanted: dict[str, list[str]] | None = None, rows_read: int = ROWS_READ,
             samples: int = SAMPLES) -> RunData:
    """Everything a report shows about run directory `out`. `wanted` maps stage -> row fields whose values
    are collected over the rows read (the method sections' figures)."""
    out = Path(out)
    config_file = out / "config.json"
    if not config_file.is_file():
        raise ReportError(f"{out} is not a run directory (no config.json)")
    try:
        config = json.loads(config_file.read_text()).get("config") or {}
    except ValueError as e:
        raise ReportError(f"{config_file}: unreadable ({e})") from None
    manifest = None
    if (out / "manifest.json").is_file():
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except ValueError:
            manifest = None  # being replaced: the shards say the same
    commits = read_commits(out)
    writer_totals: dict[str, dict] = {}
    stats = _stats(out, writer_totals)
    row_shards, reject_shards = _shards(out, "stages"), _shards(out, "rejects")
    names = set(row_shards) | set(reject_shards) | set(stats)
    wanted = wanted or {}
    stages: dict[str, StageData] = {}
    fields: dict[str, dict[str, list]] = {}
    reject_fields: dict[str, dict[str, list]] = {}
    for name in _stage_order(names, commits, config):
        s = stages[name] = StageData(name, stats=stats.get(name, {}))
        want = wanted.get(name, [])
        fields[name] = {f: [] for f in want}
        reject_fields[name] = {f: [] for f in want}
        rng = random.Random(f"report:{name}")
        seen: set[str] = set()
        for path in row_shards.get(name, []):
            table = pq.read_table(path)
            keys = table.column("key").to_pylist()
            fresh = [i for i, k in enumerate(keys) if k not in seen]
            seen.update(keys)
            s.rows += len(fresh)
            if s.rows_read >= rows_read:
                continue
            blobs = table.column("row").to_pylist()
            for i in fresh[: rows_read - s.rows_read]:
                row = json.loads(blobs[i])
                s.rows_read += 1
                _row_figures(s, row, accepted=True)
                for f in want:
                    fields[name][f].append(row.get(f))
                _reservoir(s.samples, row, s.rows_read, samples, rng)
        seen_rej: set[str] = set()
        read_rej = 0
        for path in reject_shards.get(name, []):
            table = pq.read_table(path)
            keys, reasons = table.column("key").to_pylist(), table.column("reason").to_pylist()
            blobs = table.column("row").to_pylist() if read_rej < rows_read else None
            for i, (k, reason) in enumerate(zip(keys, reasons)):
                if k in seen_rej:
                    continue
                seen_rej.add(k)
                s.rejects += 1
                s.reasons[_reason_kind(reason)] += 1
                if _reason_kind(reason) == "truncated":
                    s.truncated += 1
                if blobs is None or read_rej >= rows_read:
                    continue
                read_rej += 1
                row = json.loads(blobs[i])
                tokens = row.get("output_tokens") if isinstance(row, dict) else None
                if isinstance(tokens, int):
                    s.reject_lengths.append(tokens)
                for f in want:
                    reject_fields[name][f].append(row.get(f) if isinstance(row, dict) else None)
                _reject_sample(s, {"reason": reason, "row": row}, rng, samples)
    removals: list[dict] = []
    for p in sorted((out / "rejects" / "_quality").glob("*.parquet")):
        if not p.name.startswith("."):
            removals += [{k: r[k] for k in ("key", "reason", "duplicate_of", "detail")}
                         for r in pq.read_table(p, columns=["key", "reason", "duplicate_of", "detail"]).to_pylist()]
    dataset = (manifest or {}).get("dataset")
    published = bool(dataset)
    in_progress = not published or _newer_than_publish(out, manifest)
    return RunData(out=out, config=config, manifest=manifest, stages=stages, commits=commits, removals=removals,
                   fields=fields, reject_fields=reject_fields, published=published, in_progress=in_progress,
                   writer_totals=writer_totals)


def _newer_than_publish(out: Path, manifest: dict | None) -> bool:
    """Whether a shard was committed after the last publish (the published figures are then older)."""
    data = [p.stat().st_mtime for p in (out / "data").glob("*.parquet")] if (out / "data").is_dir() else []
    if not data:
        return True
    newest = max((p.stat().st_mtime for kind in ("stages", "rejects")
                  for files in _shards(out, kind).values() for p in files), default=0)
    return newest > max(data)


def _reason_kind(reason: str) -> str:
    return (reason or "").split(":", 1)[0].strip() or (reason or "?")


def _row_figures(s: StageData, row: dict, accepted: bool) -> None:
    tokens = row.get("output_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        s.lengths.append(tokens)
    if "finish_reason" in row:
        s.finish_known += 1
        if row["finish_reason"] == "length":
            s.truncated += 1


def _reservoir(sample: list, item: Any, n_seen: int, k: int, rng: random.Random) -> None:
    """Keep a uniform sample of k items of a stream (Algorithm R), deterministic per stage."""
    if len(sample) < k:
        sample.append(item)
    else:
        j = rng.randrange(n_seen)
        if j < k:
            sample[j] = item


def _reject_sample(s: StageData, item: dict, rng: random.Random, k: int) -> None:
    """Rejects shown: one per reason first (so every reason has an example), up to k."""
    kinds = {_reason_kind(r["reason"]) for r in s.reject_samples}
    kind = _reason_kind(item["reason"])
    if kind not in kinds:
        if len(s.reject_samples) < k:
            s.reject_samples.append(item)
        else:  # replace an example of a reason shown twice
            counts = Counter(_reason_kind(r["reason"]) for r in s.reject_samples)
            twice = [i for i, r in enumerate(s.reject_samples) if counts[_reason_kind(r["reason"])] > 1]
            if twice:
                s.reject_samples[twice[-1]] = item
    elif len(s.reject_samples) < k:
        s.reject_samples.append(item)
