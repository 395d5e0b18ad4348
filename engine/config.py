"""Run configs: one YAML file names the method, the model and engine settings, and the method's params.

    method: tdg                    # tdg | targen | glan
    model: null                    # null: the embedded SmolLM2; else a local HF folder or .gguf file
    backend: vllm                  # vllm | transformers
    grammar_backend: guidance      # guidance | xgrammar | outlines
    seed: 0
    parallel: {replicas: 1}        # scale-out (engine.parallel); not part of the run's identity
    params: {...}                  # validated by the method's own Config

Every field is checked (unknown fields are errors, not warnings) before any model is loaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engine.backends.base import DEFAULT_GRAMMAR_BACKEND


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
    store: StoreSettings = Field(default_factory=StoreSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    """Replicas, engines per GPU, tensor parallelism, Ray (docs/scale-out.md); not hashed into the run."""
    quality: dict[str, Any] | None = None
    """Dedup / decontamination / diversity settings for the published rows (engine.quality.QualityConfig)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's own settings, validated by its Config."""
    _source: Path | None = PrivateAttr(None)
    """The YAML file it came from: relative paths in params are resolved against its folder."""


def _first_error(e: ValidationError, where: str) -> str:
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
        raise error(_first_error(e, where)) from None


def load_run_config(path: Path) -> RunConfig:
    config = validated(RunConfig, load_yaml_mapping(path, "config file"), str(path))
    config._source = path
    method_config(config)  # fail now on bad params, before any model loads
    return config


def method_config(config: RunConfig):
    from engine import methods
    module = methods.load(config.method)
    params = dict(config.params)
    base = config._source
    try:
        if base is not None and hasattr(module, "resolve_paths"):
            params = module.resolve_paths(params, Path(base).parent)
        return module.Config.model_validate(params)
    except ValidationError as e:
        raise ConfigError(_first_error(e, f"params of method {config.method}")) from None


def file_identity(path: str) -> dict | str:
    """An input file as the run's identity sees it: its name and the sha256 of its bytes, not where it lies, so
    a run resumes from another working folder or a moved checkout, and refuses to when the file's content
    changed. A path that is not a readable file stays as it is (the method reports it)."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return path
    return {"file": Path(path).name, "sha256": digest}


def run_payload(config: RunConfig, params=None, model_id: dict | None = None) -> dict:
    """What identifies a run (hashed by the store): the config with the method's validated params and the
    model's fingerprint, without the settings that do not change what is generated (store, parallel)."""
    from engine import methods, models
    params = params if params is not None else method_config(config)
    model_id = model_id or models.identity(models.prepare(config.model))
    payload = config.model_dump(mode="json")
    payload["params"] = params.model_dump(mode="json")
    for name in getattr(methods.load(config.method), "FILE_PARAMS", ()):
        if isinstance(payload["params"].get(name), str):
            payload["params"][name] = file_identity(payload["params"][name])
    for f in (payload.get("quality") or {}).get("decontam_files") or []:
        if isinstance(f, dict) and isinstance(f.get("path"), str):
            f["path"] = file_identity(f["path"])
    payload["model_fingerprint"] = model_id["fingerprint"]
    payload.pop("store", None)  # commit cadence does not change what is generated
    payload.pop("parallel", None)  # nor does how many replicas generate it: resume with any N
    return payload


def run_method(config: RunConfig, out: Path, *, new: bool = False, stop_after: str | None = None,
               replica: tuple[int, int] = (0, 1), progress: bool = True, session: str | None = None,
               engine_overrides: dict | None = None):
    """Run `config`'s method into run dir `out`; returns (run dir, manifest, last stage stats).

    With `replica=(i, N)`, N > 1, this process is replica i of the launch named `session` (engine.parallel
    starts them): it generates only the keys it owns, waits for the other replicas wherever the method reads
    a whole stage, and replica 0 publishes once all of them are done; the others return manifest None.
    `engine_overrides` (a replica's GPU memory share, tensor parallelism) reach the backend, not the run hash.
    """
    from engine import methods, models
    from engine.backends.loader import load_backend
    from engine.quality import QualityConfig
    from engine.store import RunStore

    module = methods.load(config.method)
    params = method_config(config)
    # Methods publish deduplicated rows by default; `quality: {exact_dedup: false, ...}` turns filters off.
    quality = QualityConfig.model_validate(config.quality or {})
    quality.check_files()
    model_dir = models.prepare(config.model)
    model_id = models.identity(model_dir)
    payload = run_payload(config, params, model_id)
    store = RunStore.open(out, payload, new=new, writer=f"r{replica[0]}",
                          commit_rows=config.store.commit_rows, commit_seconds=config.store.commit_seconds,
                          identity={"model": model_id})
    engine_opts = {**config.engine, **(engine_overrides or {})}

    def start_backend():
        return load_backend(config.backend, str(model_dir), grammar_backend=config.grammar_backend,
                            seed=config.seed, **engine_opts)

    sync = None
    if replica[1] > 1:
        from engine.parallel.sync import ReplicaSync
        sync = ReplicaSync(store, replica, session)
    serialized = sync.serialized if sync else methods.Context.serialized  # engine start-ups, one per GPU at a time
    ctx = methods.Context(
        store=sync.store if sync else store, seed=config.seed, model_name=model_id["fingerprint"], replica=replica,
        progress=progress, load_backend=serialized(start_backend), serialized=serialized,
        extras={"stop_after": stop_after, "quality": quality})
    try:
        output = module.run(params, ctx)
    finally:
        store.commit()
    if sync is not None:
        sync.finish()  # every replica's work is committed before replica 0 publishes
    if output is None or replica[0] != 0:  # stopped early on purpose, or not the publishing replica
        store.close()
        return store.out, None, (ctx.extras.get("last_stats") if output is not None else None)
    manifest = store.finalize(output.final_stage, quality=quality, text_fields=output.text_fields)
    store.close()
    return store.out, manifest, ctx.extras.get("last_stats")
