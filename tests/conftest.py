"""Shared fixtures: ONE real vLLM engine on the embedded model per test session (its start takes ~70 s
on 2 cores), and the embedded model's folder."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from engine import models
    return models.prepare(None)


@pytest.fixture(scope="session")
def vllm_backend(model_dir):
    from engine.backends.loader import load_backend
    backend = load_backend("vllm", str(model_dir), grammar_backend="guidance", max_num_seqs=64)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf_backend(model_dir):
    from engine.backends.loader import load_backend
    return load_backend("transformers", str(model_dir), grammar_backend="guidance")


def sdg(*args: str, env: dict | None = None, timeout: int = 900, cwd: Path | None = None):
    """Run the real `sdg` command line in a subprocess (in the repository, or in `cwd`)."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    if cwd is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=full_env)


# GLAN's tries, rounds and token budgets in tests: those at which the 135M model reaches the rows on any
# machine, not only on one. Its samples differ between machines (float rounding), so budgets that pass by luck
# on one fail on another (CI's did: no syllabus, or no row in 3-4 rounds). Measured on one machine with these
# prompts by tests/scripts/glan_acceptance.py (96 syllabi, 72 questions and their answers): syllabi at 300
# tokens 9% accepted (74 of 96 cut at max_tokens), at 800 tokens 53% (most others repeated_concepts); questions
# ~31%; answers at 300 tokens 35%, at 800 45%. So 10 tries a syllabus (a subject fails all ~0.47^10 < 0.1%)
# and a round asks 8 questions per missing row (round 1 of 4 rows: ~4.5 pairs expected).
GLAN_BUDGETS = dict(
    attempts=10, overprovision=8.0, max_rounds=8,
    subject_sampling={"max_tokens": 256, "temperature": 0.8},
    syllabus_sampling={"max_tokens": 800, "temperature": 0.7},
    question_sampling={"max_tokens": 160, "temperature": 0.8},
    answer_sampling={"max_tokens": 600, "temperature": 0.3})


# ------------------------------------------------------------------------------ replicas of a method, in threads

def committed_keys(out: Path, kinds: tuple[str, ...] = ("stages", "rejects")) -> dict[str, list[str]]:
    """Every committed key of every stage (rows and rejects; `kinds=("stages",)`: rows only), read from the
    shard files: a key listed twice was committed twice."""
    import pyarrow.parquet as pq
    keys: dict[str, list[str]] = {}
    for kind in kinds:
        for f in sorted((out / kind).glob("*/*.parquet")):
            if not f.parent.name.startswith("_") and not f.name.startswith("."):  # not a temp file
                keys.setdefault(f.parent.name, []).extend(pq.read_table(f).column("key").to_pylist())
    return keys


class SharedBackend:
    """The session's one real engine lent to replica threads: one replica generates at a time (the lock is held
    for each batch the pipeline's feed has ready), and each replica's requests are recorded. Every output
    still comes from the model."""

    def __init__(self, inner, lock, asked: list) -> None:
        self.inner, self.lock, self.asked = inner, lock, asked

    def preflight(self, requests):
        with self.lock:
            return self.inner.preflight(requests)

    def generate(self, requests):
        batch = []
        for request in requests:
            if request is not None:
                batch.append(request)
                continue
            yield from self._run(batch)  # the feed waits for results: generate what it gave so far
            batch = []
        yield from self._run(batch)

    def _run(self, batch):
        if not batch:
            return
        self.asked.extend(batch)
        with self.lock:
            results = list(self.inner.generate(batch))
        yield from results

    def identity(self) -> dict:
        return self.inner.identity()


def run_replica_threads(module, params, payload: dict, out: Path, backend, *, replicas: int = 2,
                        model_name: str = "smollm2", quality=None, timeout: float = 1200) -> tuple[dict, dict]:
    """Replicas (i, N) of one launch of `module` as threads sharing `backend`, each with its own store writer
    and the same meetings (engine.parallel.sync.ReplicaSync) that replica processes use; replica 0 publishes.
    Returns (manifest, {replica index: [requests it generated]})."""
    import threading
    import uuid
    from engine.methods import Context
    from engine.parallel.sync import ReplicaSync
    from engine.pipeline.core import Executor
    from engine.quality import QualityConfig
    from engine.store import RunStore

    quality = quality or QualityConfig()
    session, lock = f"t{uuid.uuid4().hex[:8]}", threading.Lock()
    stores = [RunStore.open(out, payload, writer=f"r{i}") for i in range(replicas)]
    asked: dict[int, list] = {i: [] for i in range(replicas)}
    result: dict = {}
    errors: list[BaseException] = []

    def replica(i: int) -> None:
        store = stores[i]
        try:
            sync = ReplicaSync(store, (i, replicas), session)
            ctx = Context(out=store.out, seed=0, model_name=model_name, progress=False, run_id=store.config_hash[:16])
            pipeline = module.pipeline(params, ctx)
            engines = {"main": lambda: SharedBackend(backend, lock, asked[i])}
            Executor(pipeline, store, engines, seed=0, replica=(i, replicas), sync=sync, quality=quality,
                     progress=False).run()
            store.commit()
            sync.finish()
            if i == 0:
                result["manifest"] = store.finalize(pipeline.publish.stage, quality=quality,
                                                    text_fields=pipeline.publish.text_fields)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=replica, args=(i,), daemon=True) for i in range(replicas)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and not errors and time.monotonic() < deadline:
        time.sleep(0.2)
    if errors:  # the other replicas may wait for it at a meeting forever: they are daemon threads, left behind
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a replica is still waiting (a meeting one replica skipped?)"
    return result["manifest"], asked
