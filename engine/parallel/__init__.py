"""Scale-out: N replicas generate one run, as processes on this machine or as Ray actors on a cluster.

Every replica runs the same method on the same run directory (engine.pipeline.run.run_method with
`replica=(i, N)`); the pipeline core (engine.pipeline.core) decides what each one generates:

  - partition: an item of a root or whole-stage read belongs to replica `int(hash[:8], 16) % N`
    (engine.pipeline.core.owns); a child goes with the replica that committed its parent. Each replica commits
    shards named with its writer id r<i> (engine.store). No key is generated twice, and a resume with any N
    skips every committed key.
  - meetings: only where a stage reads whole stages (`Whole(...)`), every replica waits until all have
    committed what comes before (sync.Barrier); nowhere else.
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
