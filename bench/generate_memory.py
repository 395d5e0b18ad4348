"""`sdg generate` over a large prompts file: does its memory stay flat while it generates? (issue #18, item 6)

    python bench/generate_memory.py [--lines 200000] [--every 0.25]

Writes a prompts file of --lines lines (plain prompts, and every tenth line with one of three constraints), then
runs the real `sdg generate` command line on it in a fresh process (engine.cli.main: the streaming preflight,
the run config, the pipeline core, the run store, publishing) with one substitution: the engine is the no-op
backend of bench/pipeline.py, REGISTERED FOR THIS BENCHMARK ONLY ("noop (benchmark only)" in the output), so a
200k-line run takes minutes on a CPU and what is measured is everything around the model. This process samples
the child's RSS (/proc/PID/status, VmRSS) every --every seconds; the child records when generating starts and
ends and when publishing starts. Printed and written to bench/results/generate-memory.json: the mean RSS of the
first and of the last quarter of the generating window and their ratio (the goal: within 10%), with the peaks of
the preflight and of publishing beside them; and the same run on a file ten times smaller, whose RSS while
generating should be the same (a file held whole would show here, not in the ratio within one run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def write_prompts(path: Path, lines: int) -> None:
    """`lines` lines: plain prompts, and on every tenth line a regex, a choice or a JSON Schema (three distinct
    constraints in all, so the preflight compiles three)."""
    constraints = [{"regex": "[0-9]+"}, {"choices": ["yes", "no"]},
                   {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}]
    with path.open("w") as f:
        for i in range(lines):
            line: dict = {"id": i, "prompt": f"Question {i}: what is {i % 97} plus {i % 13}? Answer briefly."}
            if i % 10 == 0:
                line.update(constraints[(i // 10) % 3])
            f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------------------------ the child
def child(prompts: str, out: str, marks: str) -> int:
    """`sdg generate` in this process, the engine replaced by the no-op backend; phase times go to `marks`."""
    from pipeline import NoopBackend  # bench/pipeline.py

    from engine import cli
    from engine.backends import loader
    from engine.store import RunStore
    times: dict[str, float] = {}

    class Timed(NoopBackend):
        def generate(self, requests):
            times.setdefault("generate_start", time.time())
            yield from super().generate(requests)
            times["generate_end"] = time.time()

    loader.load_backend = lambda *a, **k: Timed()
    finalize = RunStore.finalize

    def timed_finalize(self, *a, **k):
        times["publish_start"] = time.time()
        return finalize(self, *a, **k)

    RunStore.finalize = timed_finalize
    times["start"] = time.time()
    rc = cli.main(["generate", "--prompts", prompts, "--out", out, "--max-tokens", "16"])
    times["end"] = time.time()
    Path(marks).write_text(json.dumps(times))
    return rc


# ------------------------------------------------------------------------------------------------ the parent
def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure(lines: int, every: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdg-bench-genmem-") as tmp:
        prompts, out, marks = Path(tmp) / "prompts.jsonl", Path(tmp) / "run", Path(tmp) / "marks.json"
        write_prompts(prompts, lines)
        samples: list[tuple[float, int]] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(prompts), str(out), str(marks)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            kib = rss_kib(proc.pid)
            if kib:
                samples.append((time.time(), kib))
            time.sleep(every)
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"error: sdg generate failed ({proc.returncode}):\n{stderr[-3000:]}")
        times = json.loads(marks.read_text())
        manifest = json.loads((out / "manifest.json").read_text())
        file_mib = prompts.stat().st_size / 2**20
    start, end = times["generate_start"], times["generate_end"]
    quarter = (end - start) / 4
    first = [kib for t, kib in samples if start <= t <= start + quarter]
    last = [kib for t, kib in samples if end - quarter <= t <= end]
    preflight = [kib for t, kib in samples if t < start]
    publish = [kib for t, kib in samples if t >= times.get("publish_start", end)]
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    first_mean, last_mean = statistics.mean(first), statistics.mean(last)
    stage = manifest["stages"]["generate"]
    return {
        "benchmark": "generate_memory", "backend": "noop (benchmark only: no model, no work)",
        "command": "sdg generate --prompts FILE --out DIR --max-tokens 16 (engine.cli.main, engine replaced)",
        "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "lines": lines, "prompts_file_mib": round(file_mib, 1), "rows": stage["rows"], "rejects": stage["rejects"],
        "seconds": {"total": round(times["end"] - times["start"], 1),
                    "before_generating": round(start - times["start"], 1), "generating": round(end - start, 1),
                    "publishing": round(times["end"] - times.get("publish_start", end), 1)},
        "lines_per_s_generating": round(lines / (end - start)),
        "sample_every_s": every, "samples": len(samples),
        "rss_mib": {"first_quarter_mean": mib(first_mean), "last_quarter_mean": mib(last_mean),
                    "first_quarter_max": mib(max(first)), "last_quarter_max": mib(max(last)),
                    "preflight_max": mib(max(preflight)) if preflight else None,
                    "publishing_max": mib(max(publish)) if publish else None},
        "ratio_last_to_first_quarter": round(last_mean / first_mean, 4),
        "within_10_percent": abs(last_mean / first_mean - 1) <= 0.10,
        "stdout": stdout.strip().splitlines()[-2:],
    }


def report(r: dict) -> None:
    rss = r["rss_mib"]
    print(f"sdg generate, {r['lines']:,} lines ({r['prompts_file_mib']} MiB), backend {r['backend']}:")
    print(f"  {r['seconds']['total']} s in all: {r['seconds']['before_generating']} s before generating (preflight, "
          f"config), {r['seconds']['generating']} s generating ({r['lines_per_s_generating']:,} lines/s), "
          f"{r['seconds']['publishing']} s publishing")
    print(f"  RSS while generating: first quarter {rss['first_quarter_mean']} MiB (max {rss['first_quarter_max']}), "
          f"last quarter {rss['last_quarter_mean']} MiB (max {rss['last_quarter_max']}): "
          f"ratio {r['ratio_last_to_first_quarter']:.3f} ({'within' if r['within_10_percent'] else 'NOT within'} 10%)")
    print(f"  RSS peaks: preflight {rss['preflight_max']} MiB, publishing {rss['publishing_max']} MiB")
    if "smaller_run" in r:
        small = r["smaller_run"]
        print(f"  a run of {small['lines']:,} lines: last quarter {small['rss_mib']['last_quarter_mean']} MiB; "
              f"{r['lines']:,} lines / {small['lines']:,} lines = {r['rss_generating_vs_smaller_run']:.3f} "
              f"(memory while generating does not follow the file's size)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdg bench generate_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--every", type=float, default=0.25, help="seconds between RSS samples")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.exit(child(*args.child))
    small, result = measure(args.lines // 10, args.every), measure(args.lines, args.every)
    result["smaller_run"] = {k: small[k] for k in ("lines", "seconds", "rss_mib", "ratio_last_to_first_quarter")}
    result["rss_generating_vs_smaller_run"] = round(
        result["rss_mib"]["last_quarter_mean"] / small["rss_mib"]["last_quarter_mean"], 4)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "generate-memory.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {args.out_dir / 'generate-memory.json'}")
    return result


if __name__ == "__main__":
    main()
