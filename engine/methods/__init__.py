"""Methods (TDG, TarGEN, GLAN) and what they are handed to run.

A method module exposes `Config` (a pydantic model of its `params:` section, extra fields forbidden) and
`pipeline(config, ctx) -> engine.pipeline.stages.Pipeline`: its declared stages, which the pipeline core runs.
The engine knows methods only through this registry.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REGISTRY = {"tdg": "engine.methods.tdg", "targen": "engine.methods.targen", "glan": "engine.methods.glan",
            "echo": "engine.methods.echo",  # echo: a two-stage smoke/scale-out method, no paper
            "generate": "engine.methods.generate"}  # `sdg generate`: one request per line of a prompts file


class MethodError(ValueError):
    """An unknown method or a method config that does not validate."""


def load(name: str):
    """The method module registered as `name`; unknown names get a 'did you mean'."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MethodError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})")
    return importlib.import_module(REGISTRY[name])


@dataclass
class Context:
    """What a method's stage functions may use (engine.pipeline.run builds it): the run directory, the run seed,
    the model's name for request keys, and `start_engine(model_dir)`, which gives a function starting a second
    engine like the run's own (same backend and settings, serialized start-ups on a shared GPU), for a
    pipeline's named engines (GLAN's answer model)."""

    out: Path
    seed: int = 0
    model_name: str = "model"
    start_engine: Callable[[Path], Callable[[], Any]] | None = None
    progress: bool = True
    run_id: str = ""
    """The run's config hash, shortened (row provenance)."""
    stop_after: str | None = None
    """The stage the run stops after (`--stop-after`), for a method that tells the user what to do next."""
