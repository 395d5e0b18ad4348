"""The engine's contract: a `Request` goes in, a `Result` comes out.

Every method builds Requests, hands them to a backend (through the runner), and gets Results back in the
order they finish. A Request's `key` is a stable hash of everything that determines its output, so a
resumed run can skip what is already committed and a cache can be keyed by it.

    >>> r = Request.build(stage="demo", model="smollm2", prompt="Say hi", sampling=Sampling(max_tokens=8), seed=3)
    >>> len(r.key)
    32
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.constraints import Constraint


class Sampling(BaseModel):
    """Sampling parameters of one request; the same names and meanings as vLLM's SamplingParams."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, description="Most tokens to generate; an output cut here is 'truncated'.")
    """Most tokens to generate. A constrained output cut off here is invalid (`truncated`)."""
    temperature: float = 0.7
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks use it to equalize lengths)."""

    @field_validator("max_tokens")
    @classmethod
    def _positive_tokens(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"max_tokens must be > 0, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v


def stable_hash(payload: Any, length: int = 32) -> str:
    """sha256 of `payload` serialized as JSON with sorted keys: the same payload gives the same hash
    in every process and on every machine."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Request:
    """One generation: chat `messages` or a raw `prompt`, an optional output constraint, sampling, seed.

    `meta` travels with the request untouched (the caller's ids, parent keys, ...) and is handed back
    with its Result; it is not part of the key unless the caller put it into the prompt.
    """

    key: str
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    constraint: Constraint | None = None
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request needs exactly one of `messages` or `prompt`")

    @classmethod
    def build(cls, *, stage: str, model: str, messages: list[dict] | None = None, prompt: str | None = None,
              constraint: Constraint | None = None, sampling: Sampling | None = None, seed: int | None = None,
              meta: dict | None = None, salt: Any = None) -> "Request":
        """Make a Request whose key hashes stage, model, prompt, constraint, sampling and seed (and `salt`,
        for callers that need several distinct requests with otherwise equal inputs)."""
        sampling = sampling or Sampling()
        key = stable_hash({
            "stage": stage, "model": model, "messages": messages, "prompt": prompt,
            "constraint": constraint.identity() if constraint else None,
            "sampling": sampling.model_dump(), "seed": seed, "salt": salt,
        })
        return cls(key=key, messages=tuple(messages) if messages is not None else None, prompt=prompt,
                   constraint=constraint, sampling=sampling, seed=seed, meta=dict(meta or {}))


@dataclass
class Result:
    """What the model produced for one Request.

    `valid` is False when the output does not satisfy the request's constraint; `reason` then says why
    (`truncated` when max_tokens cut it off, `invalid_json: ...`, `schema: ...`, `regex`, `choice`, ...).
    Token counts come from the engine's own token ids.
    """

    key: str
    text: str
    parsed: Any
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    valid: bool
    reason: str | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "text": self.text, "parsed": self.parsed, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason,
                "valid": self.valid, "reason": self.reason}
