"""The manifest: what a run directory holds, rebuilt from its shards and the writers' stats and replaced
atomically at every commit (a mixin of RunStore: it reads the store's shard index)."""
from __future__ import annotations

import json
from collections import Counter

from engine.store.files import atomic_write, json_bytes
from engine.store.runs import FORMAT


class ManifestMixin:
    """RunStore's manifest methods."""

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
        # the quality gates that ran on this stage (declared as stats "gate:<code>"), counted from its rejects
        gates = {k[5:]: reasons.get(k[5:], 0) for k in stats if k.startswith("gate:")}
        stats = {k: v for k, v in stats.items() if not k.startswith("gate:")}
        return {
            "rows": n_rows,
            "duplicate_keys": sum(s.rows for s in rows) - n_rows,
            "rejects": len(self._reject_keys.get(stage, ())),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "gates": gates,
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
        summaries = {st: self._stage_summary(st, writers) for st in stages}
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
                            "totals": s.get("totals", {}), "identity": s.get("identity")}
                        for w, s in writers.items()},
            "stages": summaries,
            "gates": {st: s["gates"] for st, s in summaries.items() if s["gates"]},  # quality gates: rejects
            "quarantined": self._quarantined(),
            "dataset": dataset,
        }

    def _write_manifest(self, dataset: dict | None = None) -> dict:
        m = self.manifest(dataset)
        atomic_write(self.out / "manifest.json", json_bytes(m), self.out / f".tmp-{self.writer}-manifest.json",
                      kill="manifest_write")
        return m

    # -- publishing
