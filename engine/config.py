"""Run configs: one YAML file names the method, the model and engine settings, and the method's params.

    method: tdg                    # tdg | targen | glan
    model: null                    # null: the embedded SmolLM2; else a local HF folder or .gguf file
    backend: vllm                  # vllm | transformers
    grammar_backend: guidance      # guidance | xgrammar | outlines
    seed: 0
    parallel: {replicas: 1}        # scale-out (engine.parallel); not part of the run's identity
    params: {...}                  # validated by the method's own Config

Every field is checked (unknown fields are errors, not warnings) before any model is loaded. Loading a
config with its method's params and running it: engine.pipeline.run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engine.backends.base import DEFAULT_GRAMMAR_BACKEND
from engine.request import Sampling


class ConfigError(ValueError):
    """A run config that cannot be used."""


class StoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    commit_rows: int = Field(1000, gt=0)
    """Commit pending rows once this many are waiting."""
    commit_seconds: float = Field(30.0, gt=0)
    """...or once this many seconds have passed since the last commit: at most this much work is at risk."""


class ParallelSettings(BaseModel):
    """How many replicas generate one run, and where they run (engine.parallel, docs/scale-out.md).
    None of it changes what is generated: a run may be resumed with other settings."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, le=4096)
    """N: replicas sharing the run directory, each generating the keys it owns (a split by key hash)."""
    engines_per_gpu: int | None = Field(None, ge=1, le=64)
    """K: replicas (vLLM engines) sharing one GPU, each with 0.8/K of its memory; None: chosen from the model
    size, GPU memory and CPU cores (engine.parallel.choose_engines_per_gpu), with the reason logged."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """M: GPUs of one replica's engine (vLLM tensor parallelism, within one node)."""
    ray_address: str | None = None
    """None: replicas are processes on this machine. "local": a private Ray cluster on this machine, bound to
    127.0.0.1. "auto": the Ray cluster this machine belongs to (RAY_ADDRESS or `ray start`), else a local one.
    "HOST:PORT" or "ray://HOST:PORT": that cluster. With Ray, each replica is an actor."""

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        import re
        if v is None or v in ("auto", "local") or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", v):
            return v
        raise ValueError(f"ray_address must be null, 'auto', 'local', 'HOST:PORT' or 'ray://HOST:PORT', got {v!r}")

    @model_validator(mode="after")
    def _one_kind_of_sharing(self) -> "ParallelSettings":
        if (self.engines_per_gpu or 1) > 1 and self.tensor_parallel_size > 1:
            raise ValueError(f"engines_per_gpu > 1 shares a GPU among engines, tensor_parallel_size > 1 spreads one "
                             f"engine over GPUs: set one of them, got {self.engines_per_gpu} and "
                             f"{self.tensor_parallel_size}")
        return self


class JudgeSettings(BaseModel):
    """An optional last stage (engine.pipeline.run.add_judge): a local model scores each row the method publishes
    on a rubric, its answer constrained to one of "1".."scale"; a row scoring below `threshold` is a reject
    (`judge_below_threshold`), the others are published with their score as a column."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    """A local HF folder or .gguf file; None (or the run's own model): the run's engine judges. Another model is
    a second engine of the same backend and settings, started when the first row is judged."""
    rubric: str | None = None
    """What a good row is, in words; None: the prompt's own rubric (prompts/judge/score.jinja)."""
    prompt: str = "judge/score.jinja"
    """The judge's prompt, a template under prompts/ (variables: rubric, fields, scale)."""
    scale: int = Field(5, ge=2, le=10)
    """Scores are 1..scale."""
    threshold: int = Field(3, ge=1)
    """Rows scoring below it are rejects; 1 keeps every row, scale + 1 rejects every row."""
    fields: list[str] | None = None
    """The row fields the judge reads; None: the published text fields."""
    column: str = Field("judge_score", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The published column holding the score."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=2, temperature=0.0))
    """The judge's sampling: greedy by default."""

    @model_validator(mode="after")
    def _in_range(self) -> "JudgeSettings":
        if self.threshold > self.scale + 1:
            raise ValueError(f"threshold must be in [1, scale + 1] = [1, {self.scale + 1}], got {self.threshold}")
        from engine.prompting import PROMPTS_DIR
        if not (PROMPTS_DIR / self.prompt).is_file():
            raise ValueError(f"judge prompt {self.prompt!r} is not a file under {PROMPTS_DIR}")
        return self


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    """Which method runs: tdg, targen or glan."""
    model: str | None = None
    """A local Hugging Face folder or .gguf file; None for the embedded SmolLM2-135M-Instruct."""
    backend: Literal["vllm", "transformers"] = "vllm"
    grammar_backend: Literal["guidance", "xgrammar", "outlines"] = DEFAULT_GRAMMAR_BACKEND
    engine: dict[str, Any] = Field(default_factory=dict)
    """Extra engine settings (vLLM: max_model_len, kv_cache_gib, max_num_seqs, gpu_memory_utilization, ...)."""
    seed: int = 0
    compile_timeout_s: float = Field(30.0, gt=0, exclude=True)
    """Seconds one distinct JSON Schema, regex or grammar may take to compile in `sdg generate`'s preflight
    (a worker process, killed past it; engine.compiling.ConstraintChecker) before the engine starts. vLLM has no
    such limit (vllm issue #54003). Not part of the run's identity."""
    store: StoreSettings = Field(default_factory=StoreSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    """Replicas, engines per GPU, tensor parallelism, Ray (docs/scale-out.md); not hashed into the run."""
    quality: dict[str, Any] | None = None
    """Dedup / decontamination / diversity settings for the published rows, and the quality gates' switches and
    thresholds (engine.quality.QualityConfig)."""
    judge: JudgeSettings | None = None
    """An optional judge stage scoring every published row (JudgeSettings); None: no judge."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's own settings, validated by its Config."""
    _source: Path | None = PrivateAttr(None)
    """The YAML file it came from: relative paths in params are resolved against its folder."""


def first_error(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{where}: {loc + ': ' if loc else ''}{err['msg']}"


def load_yaml_mapping(path: Path, what: str, error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file that must hold a mapping; any problem is one `error` naming the file."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} must be a mapping")
    return raw


def validated(model: type[BaseModel], raw: dict, where: str, error: type[ConfigError] = ConfigError):
    """`model` validated from `raw`; the first validation error becomes one `error` line."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(first_error(e, where)) from None
