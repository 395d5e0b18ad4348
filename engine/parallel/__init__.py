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

Modules (import them directly; this package imports nothing, so that none of them imports another through it):
placement (choosing K, plan_local), sync (Barrier, ReplicaSync), replica (one replica's main), launch (the driver,
run_parallel), ray_actors (Ray).
"""
