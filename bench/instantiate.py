"""TDG instantiation speed against a TemplateMath-style loop, per core and on all cores, and peak memory.

    sdg bench instantiate [--per-template N] [--million] [--tag NAME]

Side by side in one run on the same shipped seed templates:
  ours      engine.methods.tdg.instantiate: each template compiled once, exact int/Fraction arithmetic, no sympy
  baseline  TemplateMath's way: exec the template's Python source for every problem (bench/tdg_baseline.py)
Both on one core; ours also with every core. --million streams 1,000,000 rows through `instantiate` in a child
process and reports its peak RSS. Writes bench/results/instantiate-<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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


def million_rows_peak_rss() -> dict:
    """Stream 1M rows in a fresh child process (so its peak RSS is only this), counting them."""
    code = ("import sys, json, time, resource; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "from instantiate import seed_specs\nfrom engine.methods.tdg.instantiate import instantiate\n"
            "specs = seed_specs(); per = -(-1_000_000 // len(specs)); t = time.perf_counter()\n"
            "n = sum(1 for _ in instantiate(specs, n_per_template=per, seed=0, workers=1))\n"
            "print(json.dumps({'rows': n, 'seconds': round(time.perf_counter() - t, 2),"
            " 'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))"
            % (str(ROOT), str(ROOT / "bench")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdg bench instantiate")
    parser.add_argument("--per-template", type=int, default=2000)
    parser.add_argument("--baseline-per-template", type=int, default=200)
    parser.add_argument("--million", action="store_true", help="also measure peak RSS for 1M rows")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    from tdg_baseline import bench_rows_per_s
    specs = seed_specs()
    result = {"benchmark": "instantiate", "machine": platform.machine(), "cores": os.cpu_count(),
              **bench_rows_per_s(specs, n_per_template=args.per_template, baseline_n=args.baseline_per_template)}
    rate, workers = all_cores_rows_per_s(specs, args.per_template)
    result.update(all_cores_rows_per_s=round(rate), all_cores_workers=workers)
    if args.million:
        result["million"] = million_rows_peak_rss()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"instantiate-{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours (1 core)      {result['ours_rows_per_s']:>10,} rows/s")
    print(f"baseline (1 core)  {result['baseline_rows_per_s']:>10,} rows/s   speed-up {result['speedup']}x")
    print(f"ours ({workers} workers)   {result['all_cores_rows_per_s']:>10,} rows/s")
    if args.million:
        m = result["million"]
        print(f"1M rows: {m['rows']:,} in {m['seconds']}s, peak RSS {m['peak_rss_mib']} MiB")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
