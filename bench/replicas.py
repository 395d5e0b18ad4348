"""Scale-out: output tokens/s with 1, 2, 4 replicas, as processes and as Ray actors, side by side in one run.

    sdg bench replicas [--config configs/echo.yaml] [--replicas 1,2,4] [--backend vllm|transformers]
                       [--prompts N] [--max-tokens T] [--oversubscribe] [--tag NAME]

Each configuration is a real `sdg run CONFIG --out TMP --replicas N [--ray local]` in a fresh run dir, timed
from the outside. Generation time comes from the manifest (seconds each replica spent in its engine's generate
loop, `writers.<w>.totals.generating_seconds`, summed over replicas); what is left of the wall time, per replica, is start-up and coordination (engine loads,
waiting at stage barriers, publishing). The Ray path's coordination cost is its wall time minus the processes
path's at the same N. Replica counts above the core count are skipped with a note, or run with
--oversubscribe (replicas then share cores; the runs are marked `oversubscribed`).
Writes bench/results/replicas-<tag>.json.
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

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_once(config: dict, replicas: int, ray: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdg-bench-replicas-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "engine.cli", "run", str(path), "--out", str(Path(tmp) / "run"),
               "--replicas", str(replicas)] + (["--ray", "local"] if ray else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"replicas": replicas, "ray": ray, "error": proc.stderr.strip().splitlines()[-1:]}
        manifest = json.loads((Path(tmp) / "run" / "manifest.json").read_text())
    stages = manifest["stages"]
    tokens = sum(s.get("stats", {}).get("output_tokens", 0) for s in stages.values())
    # each writer's time inside its engines' generate loops (stages overlap when they stream)
    generating = sum(w.get("totals", {}).get("generating_seconds", 0.0) for w in manifest["writers"].values())
    return {"replicas": replicas, "ray": ray, "wall_s": round(wall, 2), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / wall, 1), "generating_s_per_replica": round(generating / replicas, 2),
            # tokens over the time replicas spent generating (start-ups and barriers left out)
            "generation_tok_per_s": round(tokens / (generating / replicas), 1) if generating else None,
            "overhead_s_per_replica": round(wall - generating / replicas, 2),
            "rows": manifest.get("dataset", {}).get("num_rows")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdg bench replicas")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "echo.yaml")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--backend", default=None, choices=["vllm", "transformers"])
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="also run replica counts above the core count (replicas then share cores: this "
                             "measures coordination and contention, not scaling)")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    if args.backend:
        config["backend"] = args.backend
    if args.prompts:
        config.setdefault("params", {})["prompts"] = args.prompts
    if args.max_tokens:
        config.setdefault("params", {}).setdefault("sampling", {})["max_tokens"] = args.max_tokens
    config.pop("parallel", None)
    cores = os.cpu_count() or 1
    runs, skipped = [], []
    for n in (int(x) for x in args.replicas.split(",")):
        if n > cores and not args.oversubscribe:
            skipped.append(f"{n} replicas: only {cores} cores here (--oversubscribe runs it anyway)")
            continue
        for ray in ([False] if args.no_ray else [False, True]):
            runs.append({**run_once(config, n, ray), "oversubscribed": n > cores})
            print(json.dumps(runs[-1]))
    one = next((r for r in runs if r["replicas"] == 1 and not r["ray"] and "error" not in r), None)
    for r in runs:
        if one and "error" not in r:
            r["speedup_vs_1"] = round(r["output_tok_per_s"] / one["output_tok_per_s"], 3)
        twin = next((p for p in runs if p["replicas"] == r["replicas"] and not p["ray"] and "error" not in p), None)
        if r["ray"] and twin and "error" not in r:
            r["ray_extra_wall_s"] = round(r["wall_s"] - twin["wall_s"], 2)
    result = {"benchmark": "replicas", "machine": platform.machine(), "cores": cores, "config": config,
              "runs": runs, "skipped": skipped}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"replicas-{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
