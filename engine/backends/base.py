"""What every backend does: turn Requests into Results, streaming them out as they finish."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Iterator

from engine.request import Request, Result

GRAMMAR_BACKENDS = ("guidance", "xgrammar", "outlines")
# Chosen by measurement: guidance was the fastest of the three in vLLM both on this CPU and on an H100
# (see bench/ and ../shared/gpu/README.md), with xgrammar close behind.
DEFAULT_GRAMMAR_BACKEND = "guidance"


class BackendError(RuntimeError):
    """The backend cannot run: unknown name, missing package, engine failure."""


class Backend(ABC):
    """A loaded model that generates. `generate` yields one Result per Request, in the order they finish."""

    name: str

    @abstractmethod
    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Run every request; yield each Result as soon as it is final. Requests may be a lazy iterable (a
        pipeline's feed): a None from it means "nothing ready until one of the requests in flight finishes"
        (it never says so while none is in flight), and the iterable's end means no more requests."""

    @abstractmethod
    def preflight(self, requests: list[Request]) -> None:
        """Raise ConstraintError naming the feature when a request's constraint cannot be enforced here.
        Called before any generation starts, so a bad schema costs nothing."""

    @abstractmethod
    def identity(self) -> dict:
        """Backend, library versions, model and settings: what a manifest records about who generated."""

    def generate_all(self, requests: list[Request]) -> list[Result]:
        """All Results, in the order of `requests`."""
        by_key = {r.key: r for r in self.generate(requests)}
        return [by_key[r.key] for r in requests]

    def close(self) -> None:
        """Release the model."""
