"""The benchmarks run on a tiny input and write well-formed results (figures are never asserted)."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_bench_writes_results(vllm_backend, tmp_path):
    bench = _load("throughput")
    result = bench.measure(vllm_backend, prompts=6, max_tokens=8, constraint="choice", repeat=1)
    path = bench.write(result, tmp_path, "tiny")
    saved = json.loads(path.read_text())
    assert set(saved["median_output_tok_per_s"]) == {"raw", "engine", "constrained", "unconstrained_same_length"}
    assert all(v > 0 for v in saved["median_output_tok_per_s"].values())
    assert saved["runs"]["raw"][0]["output_tokens"] == saved["runs"]["engine"][0]["output_tokens"] == 6 * 8
    # equal length: the unconstrained twin produced exactly the constrained run's tokens
    assert saved["runs"]["constrained"][0]["output_tokens"] == saved["runs"]["unconstrained_same_length"][0]["output_tokens"]
    assert (tmp_path / "throughput-tiny.png").stat().st_size > 1000


def test_instantiate_bench_writes_results(tmp_path):
    bench = _load("instantiate")
    result = bench.main(["--per-template", "20", "--baseline-per-template", "5", "--tag", "tiny",
                         "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "instantiate-tiny.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["ours_rows_per_s"] > 0 and saved["baseline_rows_per_s"] > 0 and saved["all_cores_rows_per_s"] > 0


def test_replicas_bench_writes_results(tmp_path):
    bench = _load("replicas")
    result = bench.main(["--backend", "transformers", "--prompts", "2", "--max-tokens", "2", "--replicas", "1,2",
                         "--tag", "tiny", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "replicas-tiny.json").read_text())
    assert [(r["replicas"], r["ray"]) for r in saved["runs"]] == [(1, False), (1, True), (2, False), (2, True)]
    assert all("error" not in r and r["output_tokens"] > 0 and r["wall_s"] > 0 for r in saved["runs"])
    assert len({r["rows"] for r in saved["runs"]}) == 1  # every configuration published the same rows
    assert result["runs"][3]["speedup_vs_1"] > 0 and "ray_extra_wall_s" in result["runs"][3]
