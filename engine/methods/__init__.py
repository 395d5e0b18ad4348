"""Methods (TDG, TarGEN, GLAN) and what they are handed to run.

A method module exposes `Config` (a pydantic model of its `params:` section, extra fields forbidden) and
`run(config, ctx) -> Output`. The engine knows methods only through this registry.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

REGISTRY = {"tdg": "engine.methods.tdg", "targen": "engine.methods.targen", "glan": "engine.methods.glan",
            "echo": "engine.methods.echo"}  # echo: a two-stage smoke/scale-out method, no paper


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
class Output:
    """Which stage holds the published rows, and which of their fields are the text to dedup/decontaminate."""

    final_stage: str
    text_fields: list[str]


@dataclass
class Context:
    """What a method gets: the store, a lazily loaded backend (stages that need no model never load one),
    the run seed, the model's name for request keys, and this process's replica (index, count)."""

    store: Any
    load_backend: Callable[[], Any]
    seed: int = 0
    model_name: str = "model"
    replica: tuple[int, int] = (0, 1)
    progress: bool = True
    extras: dict = field(default_factory=dict)
    serialized: Callable[[Callable[[], Any]], Callable[[], Any]] = lambda start: start
    """Wraps an engine start-up of a second backend (GLAN's answer_model) like the run's own: engines sharing
    a GPU start one at a time (engine.parallel.ReplicaSync.serialized)."""

    @cached_property
    def backend(self):
        return self.load_backend()
