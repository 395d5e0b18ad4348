"""Scale-out: N replicas generate one run, as processes on this machine or as Ray actors on a cluster.

Every replica runs the same method on the same run directory (engine.config.run_method with
`replica=(i, N)`), so nothing here schedules requests:

  - partition: a request belongs to replica `int(key[:8], 16) % N` (engine.runner.owns); a replica commits
    only keys it owns, as shards named with its writer id r<i> (engine.store). No key is generated twice,
    and a resume with any N skips every committed key.
  - stages: a method that reads a whole stage (`store.rows(stage)`, to build the next stage's requests)
    waits there until every replica has committed its share of it: a barrier exactly where a stage needs all
    its parents, and nowhere else (ReplicaStore).
  - publishing: replica 0 finalizes once every replica has finished (a last barrier, "end").
  - failure: the driver (run_parallel) watches its replicas; when one dies it stops the others and raises
    ReplicaError. Committed shards are kept; rerunning, with any N, completes the run.

Placement:

  - without Ray: replica i is a child process `python -m engine.parallel worker SPEC`. On a GPU machine it
    sees its GPU(s) through CUDA_VISIBLE_DEVICES: K replicas share a GPU with gpu_memory_utilization 0.8/K
    each (K = `engines_per_gpu`, chosen by choose_engines_per_gpu when unset), or one replica spans M GPUs
    (`tensor_parallel_size`). On a CPU machine it is pinned to its slice of the cores.
  - with Ray: replica i is an actor placed with (fractional) GPU resources in one placement group, so all
    N start together or none does (they wait for each other at barriers).

Engine start-ups on a shared GPU are serialized by a file lock per GPU and host, because vLLM's memory
profiling assumes nothing else on the GPU changes while it measures (../shared/gpu/bench_replicas.py).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.runner import owns

log = logging.getLogger(__name__)

GIB = 1024 ** 3
# choose_engines_per_gpu. Measured (../shared/gpu/README.md, H100 80 GB, 16 cores, SmolLM2-135M bf16):
# 1 engine 27.7k output tok/s, 2 engines 1.10x, 4 engines 3.56x (unconstrained); guidance JSON 4 engines 3.4x
# one guidance engine. Everything else below is a conservative estimate, not a measurement.
MAX_ENGINES_PER_GPU = 4  # the most measured, and the best measured
CORES_PER_ENGINE = 4  # the measured 4 engines had 16 cores; each engine's CPU side (scheduler, detokenizer,
#                      grammar masks with up to 8 threads) is what limits a small model
ENGINE_RESERVE_BYTES = 4 * GIB  # per engine beyond 2x its weights: KV cache worth having, activations, CUDA
#                                context and graphs (estimate)
SMALL_MODEL_BYTES = 2 * GIB  # above ~1B parameters (bf16) the GPU itself is the bottleneck: one engine (estimate)
GPU_MEMORY_SHARE = 0.8  # of a GPU's memory, split among its engines (as measured)
PLACEMENT_TIMEOUT_S = float(os.environ.get("SDG_RAY_PLACEMENT_TIMEOUT_S", "300"))
_SESSION = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class ReplicaError(RuntimeError):
    """A replica died or failed; committed work is kept and a rerun (with any number of replicas) resumes."""


# ============================================================================================ choosing K

def choose_engines_per_gpu(model_bytes: int, gpu_mem_bytes: int, cpu_cores: int) -> tuple[int, str]:
    """K, the engines to run side by side on one GPU, and the reason, from the model's weight size, the GPU's
    memory and the CPU cores per GPU.

    A small model leaves a GPU mostly idle behind one engine's CPU side, so K grows with the cores and the
    memory, up to the 4 engines measured best; a model above SMALL_MODEL_BYTES gets one engine.

    >>> choose_engines_per_gpu(270_000_000, 80 * GIB, 16)[0]    # SmolLM2-135M on an H100 with 16 cores
    4
    >>> choose_engines_per_gpu(270_000_000, 80 * GIB, 8)[0]     # fewer cores: fewer engines
    2
    >>> choose_engines_per_gpu(16 * GIB, 80 * GIB, 64)[0]       # an 8B model: one engine
    1
    """
    if model_bytes <= 0 or gpu_mem_bytes <= 0 or cpu_cores <= 0:
        raise ValueError(f"model_bytes, gpu_mem_bytes and cpu_cores must be > 0, got {model_bytes}, "
                         f"{gpu_mem_bytes}, {cpu_cores}")
    w, g = model_bytes / GIB, gpu_mem_bytes / GIB
    if model_bytes > SMALL_MODEL_BYTES:
        return 1, (f"1 engine per GPU: the weights ({w:.1f} GiB) exceed {SMALL_MODEL_BYTES / GIB:.0f} GiB, so the "
                   "GPU, not one engine's CPU side, is the bottleneck (several engines per GPU were measured "
                   "only with a 135M model)")
    by_mem = math.floor(GPU_MEMORY_SHARE * gpu_mem_bytes / (2 * model_bytes + ENGINE_RESERVE_BYTES))
    by_cpu = cpu_cores // CORES_PER_ENGINE
    k = max(1, min(MAX_ENGINES_PER_GPU, by_mem, by_cpu))
    return k, (f"{k} engine(s) per GPU = min({MAX_ENGINES_PER_GPU} [4 engines of a 135M model gave 3.56x one "
               f"engine on an H100], {cpu_cores} cores per GPU // {CORES_PER_ENGINE} = {by_cpu}, "
               f"{GPU_MEMORY_SHARE} x {g:.0f} GiB // (2 x {w:.2f} GiB weights + {ENGINE_RESERVE_BYTES // GIB} GiB) "
               f"= {by_mem}), at least 1")


def model_bytes(model_dir: Path) -> int:
    """Bytes of the model's weight files (safetensors, bin, pt, gguf) in `model_dir`."""
    exts = (".safetensors", ".bin", ".pt", ".gguf")
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file() and p.name.endswith(exts))


@dataclass
class Gpu:
    index: str  # as CUDA_VISIBLE_DEVICES names it (a physical index or a UUID)
    mem_bytes: int


def detect_gpus() -> list[Gpu]:
    """The GPUs this process may use (nvidia-smi, restricted to CUDA_VISIBLE_DEVICES if set); [] if none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        idx, uid, mib = (x.strip() for x in line.split(","))
        gpus.append((idx, uid, int(float(mib)) * 1024 ** 2))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [Gpu(i, m) for i, _, m in gpus]
    names = [v.strip() for v in visible.split(",") if v.strip()]
    return [Gpu(n, m) for n in names for i, u, m in gpus if n in (i, u)]


# ============================================================================================ placement

@dataclass
class Placement:
    """Where replica `index` runs and what it is given."""

    index: int
    where: str  # for people: "GPU 0 (2 engines on it)", "cores 0-7"
    env: dict[str, str] = field(default_factory=dict)
    cpus: list[int] | None = None  # CPU affinity (CPU machines)
    engine: dict[str, Any] = field(default_factory=dict)  # engine overrides (not hashed into the run)


def _cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out, start = [], None
    for a, b in zip(cpus, cpus[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = None
    return ",".join(out)


def plan_local(settings, replicas: int, gpus: list[Gpu], cpus: list[int], weights: int) -> tuple[list[Placement], str]:
    """Placements of `replicas` processes on this machine, and a line saying how they were chosen.

    GPUs: with tensor_parallel_size M > 1, replica i gets GPUs i*M .. i*M+M-1; otherwise replicas go round robin
    over the GPUs, at most K per GPU, each with gpu_memory_utilization 0.8/(engines on its GPU). CPU only:
    each replica is pinned to its own slice of `cpus` (replicas share cores only when there are more of them).
    """
    if not gpus:
        n = len(cpus)
        out = []
        for i in range(replicas):
            mine = cpus[i * n // replicas:(i + 1) * n // replicas] or [cpus[i % n]]
            out.append(Placement(i, f"CPU core(s) {_cpu_ranges(mine)}", cpus=mine,
                                 env={"OMP_NUM_THREADS": str(len(mine)), "VLLM_CPU_OMP_THREADS_BIND": _cpu_ranges(mine),
                                      "CUDA_VISIBLE_DEVICES": ""}))
        note = f"{replicas} replica(s) on {n} CPU core(s), {n // replicas or 1} core(s) each"
        return out, note
    m = settings.tensor_parallel_size
    if m > 1:
        if replicas * m > len(gpus):
            raise ReplicaError(f"{replicas} replicas x tensor_parallel_size {m} need {replicas * m} GPUs; "
                               f"{len(gpus)} visible. Lower --replicas, or use Ray across nodes")
        out = [Placement(i, f"GPUs {','.join(g.index for g in gpus[i * m:(i + 1) * m])}",
                         env={"CUDA_VISIBLE_DEVICES": ",".join(g.index for g in gpus[i * m:(i + 1) * m])},
                         engine={"tensor_parallel_size": m, "distributed_executor_backend": "mp"})
               for i in range(replicas)]
        return out, f"{replicas} replica(s), each on {m} GPUs (tensor parallel)"
    if settings.engines_per_gpu:
        k, why = settings.engines_per_gpu, f"{settings.engines_per_gpu} engine(s) per GPU (set in the config)"
    else:
        k, why = choose_engines_per_gpu(weights, min(g.mem_bytes for g in gpus), max(1, len(cpus) // len(gpus)))
    if replicas > k * len(gpus):
        raise ReplicaError(f"{replicas} replicas at {k} engine(s) per GPU need {math.ceil(replicas / k)} GPUs; "
                           f"{len(gpus)} visible ({why}). Lower --replicas, set parallel.engines_per_gpu, or use Ray")
    on = [sum(1 for j in range(replicas) if j % len(gpus) == g) for g in range(len(gpus))]
    why += f"; {replicas} replica(s) over {len(gpus)} GPU(s): {max(on)} on the busiest"
    out = []
    for i in range(replicas):
        g = i % len(gpus)
        engine = {"gpu_memory_utilization": round(GPU_MEMORY_SHARE / on[g], 3)} if on[g] > 1 else {}
        out.append(Placement(i, f"GPU {gpus[g].index} ({on[g]} engine(s) on it)",
                             env={"CUDA_VISIBLE_DEVICES": gpus[g].index}, engine=engine))
    return out, why


# ============================================================================================ in a replica

class Barrier:
    """Named meeting points of the N replicas of one launch, as marker files on the shared run directory:
    `<root>/<name>.<k>/r<i>` for the k-th meeting of that name. `wait` returns once all N markers exist."""

    def __init__(self, root: Path, replica: tuple[int, int], poll: float = 0.02) -> None:
        self.root, (self.index, self.count), self.poll = Path(root), replica, poll
        self._seen: dict[str, int] = {}
        driver = os.environ.get("SDG_DRIVER_PID")
        self._driver = int(driver) if driver and driver.isdigit() else None

    def arrive(self, name: str) -> Path:
        k = self._seen.get(name, 0)
        self._seen[name] = k + 1
        d = self.root / f"{name}.{k}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"r{self.index}").write_text(str(os.getpid()))
        return d

    def wait(self, name: str) -> None:
        d = self.arrive(name)
        delay, started, told = self.poll, time.monotonic(), False
        while len(os.listdir(d)) < self.count:
            if self._driver is not None and os.getppid() != self._driver:
                raise ReplicaError(f"replica {self.index}: the driver (pid {self._driver}) is gone; stopping. "
                                   "Committed work is kept; rerun to resume")
            if not told and time.monotonic() - started > 2:
                log.info("replica %d waits at %s for %d replica(s)", self.index, d.name,
                         self.count - len(os.listdir(d)))
                told = True
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


class ReplicaStore:
    """Replica i's view of the shared RunStore; everything else is the store's own.

    - `rows(stage)` (a method building the next stage from all of a stage's rows) commits, then waits until
      every replica has reached the same read: every replica's share of the stage is committed when it returns.
    - `add`/`reject` of a key another replica owns do nothing: that replica, running the same code, commits it.
      Steps that compute rows without the model (TDG's seeds and problems, TarGEN's dataset, GLAN's rows)
      are thus split among replicas like model requests are, and no key is committed twice.
    """

    def __init__(self, store, replica: tuple[int, int], barrier: Barrier) -> None:
        self._store, self._replica, self._barrier = store, replica, barrier
        self._claimed: set[str] = set()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def claim(self, keys: Iterable[str]) -> None:
        """Keys this replica generates though another owns them by hash (run_stage with `group`)."""
        self._claimed.update(keys)

    def _mine(self, row: Any) -> bool:
        key = row.get("key") if isinstance(row, dict) else None
        if not isinstance(key, str):
            return True  # a malformed row: the store says why
        return key in self._claimed or owns(key, self._replica)

    def add(self, stage: str, row: dict) -> None:
        if self._mine(row):
            self._store.add(stage, row)

    def reject(self, stage: str, row: dict, reason: str) -> None:
        if self._mine(row):
            self._store.reject(stage, row, reason)

    def rows(self, stage: str, *, wait: bool = True) -> list[dict]:
        """Every committed row of `stage`; with `wait`, after every replica has committed its share. Without,
        this replica's own share is complete but the others' may not be (a method reading rows of its own
        groups only)."""
        self._store.commit()
        if wait:
            self._barrier.wait(f"rows.{stage}")
        return self._store.rows(stage)


class ReplicaSync:
    """What run_method adds for replica (i, N), N > 1, of the launch `session`: the store view, serialized
    engine start-ups on a shared GPU, and the final meeting before replica 0 publishes."""

    def __init__(self, store, replica: tuple[int, int], session: str | None) -> None:
        index, count = replica
        if not 0 <= index < count:
            raise ValueError(f"replica index must be in [0, {count}), got {index}")
        if not session or not _SESSION.match(session):
            raise ValueError(f"replica {index}/{count} needs a session name (letters, digits, _.-), the same for all "
                             f"replicas of one launch and new for each launch; got {session!r}")
        self.replica = replica
        self.barrier = Barrier(store.out / "parallel" / session / "barriers", replica)
        self.store = ReplicaStore(store, replica, self.barrier)
        self._raw = store

    def serialized(self, start: Callable[[], Any]) -> Callable[[], Any]:
        """`start` (an engine start-up) under a lock per GPU and host when a GPU is in use, so that engines
        sharing a GPU start one at a time (vLLM sizes its KV cache from the memory it sees free)."""
        def wrapped():
            tag = _gpu_tag()
            if tag is None:
                return start()
            path = Path(tempfile.gettempdir()) / f"sdg-engine-start-{tag}.lock"
            with open(path, "a") as f:
                t = time.monotonic()
                fcntl.flock(f, fcntl.LOCK_EX)
                log.info("replica %d: engine start lock %s after %.1fs", self.replica[0], path, time.monotonic() - t)
                try:
                    return start()
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return wrapped

    def finish(self) -> None:
        """Every replica commits and arrives at "end"; replica 0 waits for all of them, then publishes."""
        self._raw.commit()
        if self.replica[0] == 0:
            self.barrier.wait("end")
        else:
            self.barrier.arrive("end")


def _gpu_tag() -> str | None:
    """'<host>-gpu<CUDA_VISIBLE_DEVICES>' when this process uses a GPU, else None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "":
        return None
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-gpu{visible or 'all'}")


def replica_main(spec: dict) -> int:
    """Run one replica from a spec the driver wrote (also the body of a Ray actor)."""
    os.environ.update(spec.get("env") or {})
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    from engine.config import RunConfig, run_method
    config = RunConfig.model_validate(spec["config"])
    config._source = Path(spec["source"]) if spec.get("source") else None
    run_method(config, Path(spec["out"]), stop_after=spec.get("stop_after"), replica=tuple(spec["replica"]),
               progress=spec.get("progress", True), session=spec["session"], engine_overrides=spec.get("engine"))
    return 0


# ============================================================================================ the driver

def run_parallel(config, out: Path, *, new: bool = False, stop_after: str | None = None, progress: bool = True,
                 replica_env: dict[int, dict[str, str]] | None = None) -> tuple[Path, dict | None]:
    """Run `config` with `config.parallel.replicas` replicas (processes, or Ray actors when
    `config.parallel.ray_address` is set) into `out`; returns (run dir, manifest). Raises ReplicaError when a
    replica dies, after stopping the others. `replica_env` adds environment variables to some replicas
    (crash tests: {1: {"SDG_KILL_AT": "after_commit:2"}})."""
    from engine import models
    from engine.config import run_payload
    from engine.store import RunStore

    settings = config.parallel
    n = settings.replicas
    payload = run_payload(config)
    # Create (or check) the run dir once, here: a config mismatch fails before anything starts, and `new`
    # picks one sibling directory for all replicas.
    with RunStore.open(out, payload, new=new, writer="r0") as store:
        out = store.out.resolve()
    session = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    sdir = out / "parallel" / session
    sdir.mkdir(parents=True)
    source = str(Path(config._source).resolve()) if config._source else None
    base = dict(config=config.model_dump(mode="json"), source=source, out=str(out), session=session,
                stop_after=stop_after, progress=progress)
    weights = model_bytes(models.prepare(config.model))
    if settings.ray_address is None:
        _run_processes(base, n, settings, weights, sdir, replica_env or {}, progress)
    else:
        _run_ray(base, n, settings, weights, replica_env or {}, progress)
    shutil.rmtree(sdir / "barriers", ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest


def _say(progress: bool, msg: str) -> None:
    """Placement choices and their reasons: printed for people, logged otherwise."""
    if progress:
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info(msg)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [x for x in f.read().decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every replica's process group (vLLM's engine-core children included), SIGKILL after `grace`."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _run_processes(base: dict, n: int, settings, weights: int, sdir: Path, replica_env: dict, progress: bool) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    placements, why = plan_local(settings, n, detect_gpus(), cpus, weights)
    _say(progress, f"parallel: {why}")
    procs, logs = [], []
    try:
        for pl in placements:
            spec = dict(base, replica=[pl.index, n], engine=pl.engine, cpus=pl.cpus,
                        env={**pl.env, **replica_env.get(pl.index, {})})
            spec_path = sdir / f"r{pl.index}.json"
            spec_path.write_text(json.dumps(spec))
            logs.append(sdir / f"r{pl.index}.log")
            env = {**os.environ, **pl.env, **replica_env.get(pl.index, {}), "SDG_DRIVER_PID": str(os.getpid()),
                   "PYTHONUNBUFFERED": "1"}
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            with open(logs[-1], "ab") as lf:
                procs.append(subprocess.Popen([sys.executable, "-m", "engine.parallel", "worker", str(spec_path)],
                                              stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            _say(progress, f"replica {pl.index}/{n}: {pl.where}, pid {procs[-1].pid}, log {logs[-1]}")
        shown, last_show = {}, time.monotonic()
        while True:
            rcs = [p.poll() for p in procs]
            bad = [(i, rc) for i, rc in enumerate(rcs) if rc not in (None, 0)]
            if bad:
                i, rc = bad[0]
                what = f"died (exit {rc}{', ' + signal.Signals(-rc).name if rc < 0 else ''})" if rc < 0 \
                    else f"failed (exit {rc}: {_last_line(logs[i])})"
                raise ReplicaError(f"replica {i} of {n} {what}; the other replicas were stopped; committed work is "
                                   f"kept; rerun to resume (with any number of replicas). Log: {logs[i]}")
            if all(rc == 0 for rc in rcs):
                return
            if progress and time.monotonic() - last_show > (2 if sys.stderr.isatty() else 10):
                last_show = time.monotonic()
                for i, path in enumerate(logs):
                    line = _last_line(path)
                    if line and shown.get(i) != line:
                        shown[i] = line
                        print(f"r{i}: {line[:150]}", file=sys.stderr, flush=True)
            time.sleep(0.1)
    finally:
        _stop(procs)


# -- Ray

def _ray_init(ray, address: str, progress: bool) -> bool:
    """Connect to `address`, or start a private cluster bound to 127.0.0.1; returns whether we started it."""
    if ray.is_initialized():
        return False
    if address not in ("local", "auto"):
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=progress)
        return False
    if address == "auto":
        try:
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=progress)
            return False
        except ConnectionError:
            _say(progress, "parallel: no running Ray cluster found; starting a local one on 127.0.0.1")
    # Ray binds its servers to the node's address; with clusters off it uses the loopback one.
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=progress)
    return True


def _ray_probe(ray) -> tuple[int, int]:
    """(GPU memory in bytes, CPU cores per GPU) of a GPU node of the cluster, measured by a task on it."""
    @ray.remote(num_gpus=1, num_cpus=0)
    def probe():
        import torch
        gpus = max(1, torch.cuda.device_count())
        return torch.cuda.get_device_properties(0).total_memory, os.cpu_count() or 1, gpus

    mem, cores, _ = ray.get(probe.remote(), timeout=PLACEMENT_TIMEOUT_S)
    node_gpus = max((int(nd["Resources"].get("GPU", 0)) for nd in ray.nodes() if nd.get("Alive")), default=1)
    return mem, max(1, cores // max(1, node_gpus))


def ray_resources(settings, n: int, cluster: dict, weights: int,
                  probe: Callable[[], tuple[int, int]]) -> tuple[dict, dict, str]:
    """(per-replica resources, engine overrides, why) for `n` actors on a cluster with `cluster` resources."""
    gpus = cluster.get("GPU", 0)
    if gpus:
        m = settings.tensor_parallel_size
        if m > 1:
            return {"num_gpus": m, "num_cpus": 1}, {"tensor_parallel_size": m, "distributed_executor_backend": "mp"}, \
                f"{n} replica(s), each on {m} GPUs (tensor parallel)"
        if settings.engines_per_gpu:
            k, why = settings.engines_per_gpu, f"{settings.engines_per_gpu} engine(s) per GPU (set in the config)"
        else:
            k, why = choose_engines_per_gpu(weights, *probe())
        if k > math.ceil(n / gpus):  # fewer replicas than GPUs x K: spread them
            k = max(1, math.ceil(n / gpus))
            why += f"; {n} replica(s) over {gpus:g} GPU(s): {k} per GPU"
        engine = {"gpu_memory_utilization": round(GPU_MEMORY_SHARE / k, 3)} if k > 1 else {}
        return {"num_gpus": 1 / k, "num_cpus": 1}, engine, why
    cpus = cluster.get("CPU", 1)
    per = math.floor(cpus / n) if cpus >= n else cpus / n
    return {"num_cpus": per}, {}, f"{n} replica(s) on {cpus:g} CPU(s), {per:g} each"


def _run_ray(base: dict, n: int, settings, weights: int, replica_env: dict, progress: bool) -> None:
    try:
        import ray
    except ImportError:
        raise ReplicaError("ray_address is set but Ray is not installed: pip install 'sdg-engine[ray]'") from None
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = _ray_init(ray, settings.ray_address, progress)
    actors, pg = [], None
    try:
        res, engine, why = ray_resources(settings, n, ray.cluster_resources(), weights, lambda: _ray_probe(ray))
        _say(progress, f"parallel (Ray {ray.get_runtime_context().gcs_address}): {why}; per replica {res}")
        bundle = {"CPU": res.get("num_cpus", 0), **({"GPU": res["num_gpus"]} if "num_gpus" in res else {})}
        pg = placement_group([bundle] * n, strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ReplicaError(f"the Ray cluster cannot place {n} replicas of {bundle} at once within "
                               f"{PLACEMENT_TIMEOUT_S:.0f}s (cluster: {ray.cluster_resources()}); all replicas "
                               "must run together: lower --replicas or add nodes") from None
        Actor = ray.remote(max_restarts=0)(_ReplicaActor)
        for i in range(n):
            actors.append(Actor.options(**res, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i)).remote())
        cores = _ray_core_slices(ray, actors, settings, weights) if "num_gpus" not in res else {}
        futures = {}
        for i, a in enumerate(actors):
            pl = cores.get(i)
            spec = dict(base, replica=[i, n], engine=engine, cpus=pl.cpus if pl else None,
                        env={"PYTHONUNBUFFERED": "1", **(pl.env if pl else {}), **replica_env.get(i, {})})
            if pl:
                _say(progress, f"replica {i}/{n}: {pl.where} of its node")
            futures[a.run.remote(spec)] = i
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                i = futures[ref]
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise ReplicaError(f"replica {i} of {n} died ({type(e).__name__}); the other replicas were "
                                       "stopped; committed work is kept; rerun to resume (with any number of "
                                       "replicas)") from None
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise ReplicaError(f"replica {i} of {n} failed ({type(cause).__name__}: "
                                       f"{str(cause).splitlines()[-1] if str(cause) else ''}); the other replicas "
                                       "were stopped; committed work is kept; rerun to resume") from None
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        if started or ray.is_initialized():
            ray.shutdown()
        if started:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def _ray_core_slices(ray, actors: list, settings, weights: int) -> dict[int, Placement]:
    """CPU-only clusters: each actor's own slice of its node's cores, as plan_local gives processes. Ray does
    not pin actors to cores, and vLLM-CPU binds its threads to the node's cores from the first one on: two
    unpinned engines on one node share the same cores (measured: each replica then ran at half speed)."""
    where = ray.get([a.where.remote() for a in actors], timeout=PLACEMENT_TIMEOUT_S)
    by_node: dict[str, list[int]] = {}
    for i, (node, _) in enumerate(where):
        by_node.setdefault(node, []).append(i)
    out = {}
    for node, members in by_node.items():
        plan, _ = plan_local(settings, len(members), [], where[members[0]][1], weights)
        out.update({i: pl for i, pl in zip(members, plan)})
    return out


class _ReplicaActor:
    """A Ray actor holding one replica (and so one engine)."""

    def where(self) -> tuple[str, list[int]]:
        """(the actor's node id, the cores it may run on)."""
        import ray
        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def run(self, spec: dict) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        return replica_main(spec)


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.parallel worker SPEC.json`: one replica process started by run_parallel."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "worker":
        print("usage: python -m engine.parallel worker SPEC.json (started by `sdg run --replicas N`)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    logging.basicConfig(level=logging.INFO if os.environ.get("SDG_VERBOSE") else logging.WARNING,
                        format=f"r{spec['replica'][0]} %(levelname)s %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from engine.cli import _user_errors
    try:
        return replica_main(spec)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ReplicaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from engine.parallel import main as _main  # the module's own classes (ReplicaError), not __main__'s copies
    sys.exit(_main())
