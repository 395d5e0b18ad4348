"""Which backend serves a run: `load_backend` picks and loads one by name (kept apart from base.py so that the
backends import base and nothing imports them back)."""
from __future__ import annotations

from engine.backends.base import DEFAULT_GRAMMAR_BACKEND, GRAMMAR_BACKENDS, Backend, BackendError


def load_backend(name: str = "vllm", model: str | None = None, **options) -> Backend:
    """Load `model` (None: the embedded SmolLM2) on backend `name` ('vllm' or 'transformers')."""
    from engine import models

    if name not in ("vllm", "transformers"):
        raise BackendError(f"unknown backend {name!r}; expected 'vllm' or 'transformers'")
    grammar = options.get("grammar_backend", DEFAULT_GRAMMAR_BACKEND)
    if grammar not in GRAMMAR_BACKENDS:
        raise BackendError(f"unknown grammar backend {grammar!r}; expected one of {', '.join(GRAMMAR_BACKENDS)}")
    model_dir = models.prepare(model)
    if name == "vllm":
        from engine.backends.vllm import VllmBackend
        return VllmBackend(model_dir, **options)
    from engine.backends.transformers import TransformersBackend
    return TransformersBackend(model_dir, **options)
