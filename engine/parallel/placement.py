"""Where replicas run: how many engines share a GPU (choose_engines_per_gpu), which GPUs and cores each
replica process gets (plan_local)."""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def say(progress: bool, msg: str) -> None:
    """Placement choices and their reasons: printed for people, logged otherwise."""
    if progress:
        print(msg, file=sys.stderr, flush=True)
    else:
        log.info(msg)
