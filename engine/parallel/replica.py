"""One replica: `python -m engine.parallel worker SPEC.json` (a process started by the driver), or the body of a
Ray actor. It runs the same method on the shared run directory as every other replica (engine.pipeline.run)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

from engine.parallel.placement import ReplicaError


def replica_main(spec: dict) -> int:
    """Run one replica from a spec the driver wrote (also the body of a Ray actor)."""
    os.environ.update(spec.get("env") or {})
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    from engine.config import RunConfig
    from engine.pipeline.run import run_method
    config = RunConfig.model_validate(spec["config"])
    config._source = Path(spec["source"]) if spec.get("source") else None
    run_method(config, Path(spec["out"]), stop_after=spec.get("stop_after"), replica=tuple(spec["replica"]),
               progress=spec.get("progress", True), session=spec["session"], engine_overrides=spec.get("engine"))
    return 0



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
    from engine.errors import user_errors
    try:
        return replica_main(spec)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ReplicaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


