"""The driver: `sdg run --replicas N` starts N replicas (processes here, or Ray actors), watches them, and stops
the rest when one fails."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

from engine.parallel.placement import ReplicaError, detect_gpus, model_bytes, plan_local, say


# ============================================================================================ the driver

def run_parallel(config, out: Path, *, new: bool = False, stop_after: str | None = None, progress: bool = True,
                 replica_env: dict[int, dict[str, str]] | None = None) -> tuple[Path, dict | None]:
    """Run `config` with `config.parallel.replicas` replicas (processes, or Ray actors when
    `config.parallel.ray_address` is set) into `out`; returns (run dir, manifest). Raises ReplicaError when a
    replica dies, after stopping the others. `replica_env` adds environment variables to some replicas
    (crash tests: {1: {"SDG_KILL_AT": "after_commit:2"}})."""
    from engine import models
    from engine.pipeline.run import run_payload
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
        from engine.parallel.ray_actors import run_ray
        run_ray(base, n, settings, weights, replica_env or {}, progress)
    shutil.rmtree(sdir / "barriers", ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest


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
    say(progress, f"parallel: {why}")
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
            say(progress, f"replica {pl.index}/{n}: {pl.where}, pid {procs[-1].pid}, log {logs[-1]}")
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
