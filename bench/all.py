"""Every GPU figure of this engine from one command, inside a time budget: `bench/gpu.sh` runs this.

    bench/gpu.sh [--out DIR] [--budget SECONDS] [--steps NAME,...] [--model PATH]
    bench/gpu.sh --cpu            # or SDG_BENCH_SIZE=tiny: the same steps at a tiny size, no budget

Steps, in this order, each a subprocess given what is left of the budget (default 480 s on a GPU: they are sized
for SmolLM2-135M on one H100/H200; a step that cannot start with MIN_STEP_S left is skipped and says so):

  throughput-guidance  `sdg bench throughput --constraint json --backend guidance`: raw LLM.generate against
                       the engine persisting rows (one engine), and JSON-constrained against unconstrained at
                       equal lengths
  engines              bench/engines.py: 1, 2 and 4 engines side by side on the GPU and the automatic choice,
                       unconstrained and JSON (guidance)
  throughput-xgrammar  the constraint's cost for xgrammar
  pipeline             `sdg bench pipeline --backend vllm`: echo's two stages through the pipeline core vs raw
  replicas             `sdg bench replicas --replicas K`: the automatic engines per GPU end to end through
                       `sdg run --replicas` (placement, start-up lock, stage meetings)

Writes OUT/summary.json (every step's status, the headline figures, the issue's goals met or not) and
OUT/summary.png, next to each step's own JSON/PNG and OUT/logs/<step>.log. Exit status 1 if a step failed.

The tiny size (CPU, and the test suite) starts ONE vLLM engine: guidance only (xgrammar is the same step with
another flag), 1 and 2 engines and the replicas on the transformers backend (each engine on its own cores), and
the pipeline step on its no-model backend.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # 8 minutes on one GPU
MIN_STEP_S = 45  # a step needs at least this to start an engine and measure anything
GOALS = {"engine_over_raw": 0.97, "auto_engines_over_one_raw": 3.5, "auto_json_over_one_raw": 1.0}
SIZES = {
    "gpu": {"prompts": 2048, "max_tokens": 128, "grammars": ["guidance", "xgrammar"], "engines": "1,2,4",
            "engine_backend": "vllm", "pipeline": ["--backend", "vllm", "--prompts", "1024", "--max-tokens", "128",
                                                   "--repeat", "1"],
            "replicas": ["--backend", "vllm", "--prompts", "1024", "--max-tokens", "64"]},
    "tiny": {"prompts": 2, "max_tokens": 4, "grammars": ["guidance"], "engines": "1,2",
             "engine_backend": "transformers", "pipeline": ["--backend", "noop", "--sizes", "200"],
             "replicas": ["--backend", "transformers", "--prompts", "2", "--max-tokens", "2"]},
}


@dataclass
class Step:
    """One benchmark run as a subprocess, and what became of it."""

    name: str
    command: list[str]
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""


def _sdg(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "bench", *args]


def plan(size: str, out: Path, model: str | None, auto_k: int) -> list[Step]:
    """The steps of one invocation at `size`, in order of importance."""
    s = SIZES[size]
    common = ["--prompts", str(s["prompts"]), "--max-tokens", str(s["max_tokens"])]
    model_args = ["--model", model] if model else []
    steps = [Step(f"throughput-{g}", _sdg("throughput", *common, "--constraint", "json", "--backend", g,
                                          "--repeat", "1", "--tag", f"{size}-{g}", "--out-dir", str(out),
                                          *model_args))
             for g in s["grammars"]]
    steps.insert(1, Step("engines", [sys.executable, str(ROOT / "bench" / "engines.py"), *common, "--engines",
                                     s["engines"], "--auto", "--backend", s["engine_backend"], "--tag", size,
                                     "--out-dir", str(out), *model_args]))
    steps.append(Step("pipeline", _sdg("pipeline", *s["pipeline"], "--out-dir", str(out), *model_args)))
    steps.append(Step("replicas", _sdg("replicas", *s["replicas"], "--replicas", str(auto_k), "--no-ray",
                                       "--tag", f"{size}-auto", "--out-dir", str(out))))
    return steps


def automatic_k(model: str | None) -> int:
    """The engines per GPU `sdg run --replicas` chooses here (1 without a GPU)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from engines import automatic
    return automatic(model)["k"] or 1


def run_step(step: Step, logs: Path, seconds_left: float | None) -> None:
    """Run `step` with at most `seconds_left`; its whole process group is killed if it runs over."""
    if step.name == "pipeline" and not (ROOT / "bench" / "pipeline.py").is_file():
        step.status, step.note = "skipped", "bench/pipeline.py does not exist yet"
        return
    if seconds_left is not None and seconds_left < MIN_STEP_S:
        step.status, step.note = "skipped", f"no time left in the budget ({seconds_left:.0f}s < {MIN_STEP_S}s)"
        return
    log = logs / f"{step.name}.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(step.command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=seconds_left)
            step.status = "ok" if code == 0 else "failed"
            step.note = "" if code == 0 else f"exit status {code}; last lines: {_tail(log)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.status, step.note = "timed out", f"killed after {seconds_left:.0f}s (the budget's end)"
    step.seconds = round(time.monotonic() - started, 1)


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def figures(size: str, out: Path) -> dict:
    """The headline figures of the steps' own JSON files (None where a step did not produce them)."""
    found = {}
    for g in SIZES[size]["grammars"]:
        t = _read(out / f"throughput-{size}-{g}-json.json")
        found[f"throughput_{g}"] = t and {"device": t["device"], "tok_per_s": t["median_output_tok_per_s"],
                                          "engine_over_raw": t["engine_over_raw"],
                                          "constrained_over_unconstrained": t.get("constrained_over_unconstrained"),
                                          "constrained_valid": t.get("constrained_valid"), "prompts": t["prompts"]}
    e = _read(out / f"engines-{size}.json")
    found["engines"] = e and {"automatic": e["automatic"], "backend": e["backend"],
                              "runs": {r["engines"]: {p: r[p]["output_tok_per_s"] for p in ("none", "json")}
                                       for r in e["runs"]}}
    r = _read(out / f"replicas-{size}-auto.json")
    found["replicas"] = r and [{k: run.get(k) for k in ("replicas", "wall_s", "generation_tok_per_s", "rows",
                                                        "error")} for run in r["runs"]]
    p = next((_read(f) for f in sorted(out.glob("pipeline-*.json"))), None)
    found["pipeline"] = p and {k: p.get(k) for k in ("backend", "device", "median_output_tok_per_s",
                                                      "ratio_streaming_to_raw", "ratio_barriers_to_raw") if k in p}
    return found


def goals(found: dict) -> dict:
    """The issue's three goals, each with its value, its target and whether it is met (None: not measured)."""
    one = found.get("throughput_guidance")
    raw = one and one["tok_per_s"]["raw"]
    engines = found.get("engines") or {}
    auto = (engines.get("automatic") or {}).get("k")
    at_auto = (engines.get("runs") or {}).get(auto) if engines.get("backend") == "vllm" else None
    values = {"engine_over_raw": one and one["engine_over_raw"],
              "auto_engines_over_one_raw": at_auto and raw and round(at_auto["none"] / raw, 3),
              "auto_json_over_one_raw": at_auto and raw and round(at_auto["json"] / raw, 3)}
    return {k: {"value": v, "target": GOALS[k], "met": None if v is None else v >= GOALS[k]}
            for k, v in values.items()}


def plot(summary: dict, path: Path) -> None:
    """One bar chart of the output tok/s that every step measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found, bars = summary["figures"], {}
    for key, t in found.items():
        if key.startswith("throughput_") and t:
            g = key.split("_", 1)[1]
            bars.setdefault("raw, 1 engine", t["tok_per_s"]["raw"])
            bars.setdefault("engine, 1 engine", t["tok_per_s"]["engine"])
            bars[f"JSON {g}, 1 engine"] = t["tok_per_s"]["constrained"]
    engines = found.get("engines") or {}
    on = "" if engines.get("backend") in (None, "vllm") else f" ({engines['backend']})"
    for k, r in (engines.get("runs") or {}).items():
        bars[f"{k} engine(s){on}"] = r["none"]
        bars[f"{k} engine(s) JSON{on}"] = r["json"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(bars)), list(bars.values()), color="#36c")
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bars)), list(bars), rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{summary['device']} · bench/gpu.sh ({summary['size']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny size (as SDG_BENCH_SIZE=tiny)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/all-<size>")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds in all (gpu default {BUDGET_S})")
    parser.add_argument("--steps", default=None, help="only these steps, comma-separated")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    size = "tiny" if args.cpu or os.environ.get("SDG_BENCH_SIZE") == "tiny" else "gpu"
    budget = args.budget if args.budget is not None else (BUDGET_S if size == "gpu" else None)
    out = (args.out or ROOT / "bench" / "results" / f"all-{size}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps = plan(size, out, args.model, automatic_k(args.model))
    wanted = set(args.steps.split(",")) if args.steps else None
    for step in steps:
        if wanted is not None and step.name not in wanted:
            step.status, step.note = "skipped", "not in --steps"
            continue
        left = None if budget is None else budget - (time.monotonic() - started)
        print(f"[{time.monotonic() - started:5.0f}s] {step.name} ...", flush=True)
        run_step(step, out / "logs", left)
        print(f"        {step.status} ({step.seconds}s){': ' + step.note if step.note else ''}", flush=True)
    summary = write_summary(size, out, steps, budget, time.monotonic() - started)
    for name, g in summary["goals"].items():
        state = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        print(f"goal {name} >= {g['target']}: {g['value']} ({state})")
    print(f"wrote {out / 'summary.json'}")
    return 1 if any(s.status in ("failed", "timed out") for s in steps) else 0


def write_summary(size: str, out: Path, steps: list[Step], budget: float | None, seconds: float) -> dict:
    found = figures(size, out)
    device = next((t["device"] for k, t in found.items() if k.startswith("throughput_") and t), "unknown")
    summary = {"benchmark": "bench/gpu.sh", "size": size, "device": device, "budget_s": budget,
               "seconds": round(seconds, 1), "steps": [vars(s) for s in steps], "figures": found,
               "goals": goals(found)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(summary, out / "summary.png")
    return summary


if __name__ == "__main__":
    sys.exit(main())
