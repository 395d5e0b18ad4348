"""Shared fixtures: ONE real vLLM engine on the embedded model per test session (its start takes ~70 s
on 2 cores), and the embedded model's folder."""
from __future__ import annotations

import os
import sys
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
    from engine.backends.base import load_backend
    backend = load_backend("vllm", str(model_dir), grammar_backend="guidance", max_num_seqs=64)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf_backend(model_dir):
    from engine.backends.base import load_backend
    return load_backend("transformers", str(model_dir), grammar_backend="guidance")


def sdg(*args: str, env: dict | None = None, timeout: int = 900):
    """Run the real `sdg` command line in a subprocess."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)
