"""Replicas as Ray actors: one placement group so that all N start together, fractional GPUs for several engines
per GPU, cores pinned on CPU-only nodes."""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

log = logging.getLogger(__name__)

from engine.parallel.placement import (PLACEMENT_TIMEOUT_S, GPU_MEMORY_SHARE, Placement, ReplicaError,
                                       choose_engines_per_gpu, plan_local, say)
from engine.parallel.replica import replica_main



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
            say(progress, "parallel: no running Ray cluster found; starting a local one on 127.0.0.1")
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


def run_ray(base: dict, n: int, settings, weights: int, replica_env: dict, progress: bool) -> None:
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
        say(progress, f"parallel (Ray {ray.get_runtime_context().gcs_address}): {why}; per replica {res}")
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
                say(progress, f"replica {i}/{n}: {pl.where} of its node")
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


