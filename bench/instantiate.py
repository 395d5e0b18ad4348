"""TDG instantiation speed against a TemplateMath-style loop, per core and on all cores, and peak memory.

    sdg bench instantiate [--per-template N] [--cli-rows N | --million] [--near-rows N] [--tag NAME]

Side by side in one run on the same shipped seed templates:
  ours      engine.methods.tdg.instantiate: each template compiled once, exact int/Fraction arithmetic, no sympy
  baseline  TemplateMath's way: exec the template's Python source for every problem (bench/tdg_baseline.py)
Both on one core; ours also with every core.

--cli-rows N (--million: 1,000,000) runs `sdg tdg instantiate` itself (engine.cli.main in a fresh child process:
templates verified, every row checked twice, stage commits, publishing with TDG's quality defaults) and reports
its peak RSS, its rows per CPU-second (its own CPU and its sandbox children's: "per core") against the exec
loop's (measured just before and just after it, in this run), and the time of every phase. --near-rows N also
times near-dup detection (MinHash LSH, engine.quality.dedup.NearDedup) over the first N rows the CLI run published
(without --cli-rows: N instances of the seed templates), once over all of them and once within each template,
each in a child of its own (TDG publishes with it off).
Writes bench/results/instantiate-<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def seed_specs():
    from engine.methods.tdg.instantiate import TemplateSpec
    from engine.methods.tdg.template import DATA_DIR
    raws = [json.loads(l) for l in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines() if l.strip()]
    return [TemplateSpec(r, "seed", {"verified": True}) for r in raws]


def all_cores_rows_per_s(specs, n_per_template: int) -> tuple[float, int]:
    from engine.methods.tdg.instantiate import instantiate
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    n = sum(1 for _ in instantiate(specs, n_per_template=n_per_template, seed=0, workers=workers))
    return n / (time.perf_counter() - start), workers


_CLI_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from engine.cli import main
import engine.methods.tdg as tdg
import engine.store.publish as publish
main(["tdg", "instantiate", {templates!r}, "-n", str({per}), "--out", {out!r}])
wall = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
m = json.load(open({out!r} + "/manifest.json"))
print(json.dumps({{"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime, "sandbox_cpu_s": kids.ru_utime + kids.ru_stime,
                  "peak_rss_mib": me.ru_maxrss / 1024, "sandbox_peak_rss_mib": kids.ru_maxrss / 1024,
                  "rows": m["dataset"]["num_rows"], "quality": m["dataset"]["quality"],
                  "phases": dict(tdg.PHASE_SECONDS), "publish": dict(publish.PUBLISH_SECONDS),
                  "sandbox_inflight": tdg.SANDBOX_INFLIGHT, "row_batch": tdg.ROW_BATCH}}))
"""


def cli_run(n_rows: int, work: Path) -> dict:
    """`sdg tdg instantiate` of the seed templates, n_rows in all, in a fresh child: its figures (see _CLI_CHILD)."""
    from engine.methods.tdg.template import DATA_DIR
    specs = seed_specs()
    out = work / "run"
    code = _CLI_CHILD.format(root=str(ROOT), templates=str(DATA_DIR / "seed_templates.jsonl"),
                             per=-(-n_rows // len(specs)), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sdg tdg instantiate failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phases(r: dict) -> dict:
    """Seconds of each phase of the CLI run. The parent instantiates while sandbox children check earlier
    batches, so 'sandbox re-run' is the children's CPU seconds; 'stage commits' is the rest of the generating
    part (rows to JSON and stage shards, template verification, the pipeline's own work) but the problems stage's
    figures, which read every row back."""
    pub = r["publish"]
    publishing = sum(v for k, v in pub.items() if not k.startswith("filter_"))
    generating = r["wall_s"] - publishing
    dedup = sum(v for k, v in pub.items() if k.startswith("filter_"))
    inst, wait = r["phases"].get("instantiate", 0.0), r["phases"].get("sandbox_wait", 0.0)
    figures = r["phases"].get("problem_figures", 0.0)
    return {k: round(v, 2) for k, v in {
        "instantiation": inst, "sandbox_rerun_cpu": r["sandbox_cpu_s"], "sandbox_wait": wait,
        "stage_commits": generating - inst - wait - figures, "problem_figures": figures,
        "publish_sort": pub.get("sort", 0.0),
        "publish_scan_without_dedup": pub.get("scan", 0.0) - dedup, "dedup": dedup,
        "publish_writing": pub.get("write", 0.0) + pub.get("manifest", 0.0), "total_wall": r["wall_s"]}.items()}


def both_checks(n_rows: int, specs, baseline_n: int, work: Path) -> dict:
    """The CLI run between two measurements of the exec loop (one core), all in this run."""
    from tdg_baseline import baseline_cpu_rows_per_s

    from engine.methods.tdg.template import check_template
    checked = [check_template(s.raw, source=s.source) for s in specs]
    before = baseline_cpu_rows_per_s(checked, n_per_template=baseline_n)
    r = cli_run(n_rows, work)
    after = baseline_cpu_rows_per_s(checked, n_per_template=baseline_n)
    cpu = r["cpu_s"] + r["sandbox_cpu_s"]
    base = (before + after) / 2
    ours = r["rows"] / cpu
    return {"rows": r["rows"], "peak_rss_mib": round(r["peak_rss_mib"], 1),
            "sandbox_child_peak_rss_mib": round(r["sandbox_peak_rss_mib"], 1),
            "wall_s": round(r["wall_s"], 2), "rows_per_s_wall": round(r["rows"] / r["wall_s"]),
            "cpu_s": round(cpu, 2), "cores_used": round(cpu / r["wall_s"], 2),
            "rows_per_cpu_s": round(ours), "baseline_rows_per_cpu_s": round(base),
            "baseline_before_after": [round(before), round(after)], "per_core_speedup": round(ours / base, 2),
            "phases_s": phases(r), "publish_s": r["publish"], "quality": r["quality"],
            "sandbox_inflight": r["sandbox_inflight"], "row_batch": r["row_batch"]}


_NEAR_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import pyarrow.parquet as pq
from engine.quality.dedup import NearDedup
from engine.store.publish import row_text
f = pq.ParquetFile({path!r})
items, by_template = [], {{}}
for b in f.iter_batches(columns=["key", "template_id", "problem", "solution_wocode"]):
    for r in b.to_pylist():
        item = (r["key"], row_text(r, ["problem", "solution_wocode"]))
        items.append(item)
        by_template.setdefault(r["template_id"], []).append(item)
    if len(items) >= {n}:
        break
items = items[:{n}]
mode = {mode!r}
t = time.perf_counter()
if mode == "global":
    removed = len(NearDedup(threshold=0.85, num_perm=128, shingle=5, seed=0).feed(items))
else:
    removed = sum(len(NearDedup(threshold=0.85, num_perm=128, shingle=5, seed=0).feed(sorted(v)))
                  for v in by_template.values())
print(json.dumps({{"rows": len(items), "seconds": round(time.perf_counter() - t, 2), "removed": removed,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def _published(data: Path, cols: list[str]):
    import pyarrow.parquet as pq
    for f in sorted(data.glob("*.parquet")):
        yield pq.read_table(f, columns=cols)


def _instances(n_rows: int, cols: list[str]):
    """n_rows instances of the seed templates as the problems stage keys them (no CLI run: faster)."""
    import pyarrow as pa

    from engine.methods.tdg.instantiate import instantiate
    from engine.request import stable_hash
    specs, rows = seed_specs(), []
    for r in instantiate(specs, n_per_template=-(-n_rows // len(specs)), seed=0, workers=1):
        rows.append({**r, "key": stable_hash(["tdg-problem", 0, r["template_id"], r["problem_id"]])})
        if len(rows) == 100_000:
            yield pa.Table.from_pylist(rows).select(cols)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows).select(cols)


def near_dedup_cost(n_rows: int, work: Path, done=lambda out: None) -> dict:
    """Near-dup detection over the first n_rows rows published in `work`/run by a CLI run (without one: n_rows
    instances of the seed templates, before exact dedup), globally and within each template, each in a child of
    its own (for its peak RSS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    data, path = work / "run" / "data", work / "texts.parquet"
    cols = ["key", "template_id", "problem", "solution_wocode"]
    with pq.ParquetWriter(path, pa.schema([(c, pa.string()) for c in cols])) as w:
        for table in (_published(data, cols) if data.is_dir() else _instances(n_rows, cols)):
            w.write_table(table)
    out = {}
    for mode in ("global", "per_template"):
        code = _NEAR_CHILD.format(root=str(ROOT), path=str(path), n=n_rows, mode=mode)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[mode] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                     else {"error": proc.stderr[-500:]})
        done(out)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdg bench instantiate")
    parser.add_argument("--per-template", type=int, default=2000)
    parser.add_argument("--baseline-per-template", type=int, default=200)
    parser.add_argument("--million", action="store_true", help="--cli-rows 1000000")
    parser.add_argument("--cli-rows", type=int, default=0, help="also run `sdg tdg instantiate` of N rows, both checks")
    parser.add_argument("--near-rows", type=int, default=0, help="also time near-dup detection over N rows")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    from tdg_baseline import bench_rows_per_s
    specs = seed_specs()
    result = {"benchmark": "instantiate", "machine": platform.machine(), "cores": os.cpu_count(),
              **bench_rows_per_s(specs, n_per_template=args.per_template, baseline_n=args.baseline_per_template)}
    rate, workers = all_cores_rows_per_s(specs, args.per_template)
    result.update(all_cores_rows_per_s=round(rate), all_cores_workers=workers)
    n_cli = 1_000_000 if args.million else args.cli_rows
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"instantiate-{args.tag}.json"
    with tempfile.TemporaryDirectory(prefix="sdg-bench-tdg-") as work:
        if n_cli:
            result["cli_both_checks"] = both_checks(n_cli, specs, args.baseline_per_template, Path(work))
            path.write_text(json.dumps(result, indent=2) + "\n")  # kept if near dedup runs out of time
        if args.near_rows:
            def save(near: dict) -> None:
                path.write_text(json.dumps({**result, "near_dedup": near}, indent=2) + "\n")
            result["near_dedup"] = near_dedup_cost(args.near_rows, Path(work), save)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours (1 core)      {result['ours_rows_per_s']:>10,} rows/s")
    print(f"baseline (1 core)  {result['baseline_rows_per_s']:>10,} rows/s   speed-up {result['speedup']}x")
    print(f"ours ({workers} workers)   {result['all_cores_rows_per_s']:>10,} rows/s")
    if n_cli:
        c = result["cli_both_checks"]
        print(f"sdg tdg instantiate, both checks: {c['rows']:,} rows in {c['wall_s']}s, "
              f"peak RSS {c['peak_rss_mib']} MiB,"
              f" {c['rows_per_cpu_s']:,} rows per CPU-s vs the exec loop's {c['baseline_rows_per_cpu_s']:,}:"
              f" {c['per_core_speedup']}x per core")
        print("phases (s): " + ", ".join(f"{k} {v}" for k, v in c["phases_s"].items()))
    if args.near_rows:
        print("near dedup: " + json.dumps(result["near_dedup"]))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
