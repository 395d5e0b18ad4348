"""Run configs: one YAML file names the method, the model and engine settings, and the method's params.

    method: tdg                    # tdg | targen | glan
    model: null                    # null: the embedded SmolLM2; else a local HF folder or .gguf file
    backend: vllm                  # vllm | transformers
    grammar_backend: guidance      # guidance | xgrammar | outlines
    seed: 0
    params: {...}                  # validated by the method's own Config

Every field is checked (unknown fields are errors, not warnings) before any model is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from engine.backends.base import DEFAULT_GRAMMAR_BACKEND


class ConfigError(ValueError):
    """A run config that cannot be used."""


class StoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    commit_rows: int = Field(1000, gt=0)
    """Commit pending rows once this many are waiting."""
    commit_seconds: float = Field(30.0, gt=0)
    """...or once this many seconds have passed since the last commit: at most this much work is at risk."""


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


def load_run_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a mapping")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_first_error(e, str(path))) from None
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


def run_method(config: RunConfig, out: Path, *, new: bool = False, stop_after: str | None = None,
               replica: tuple[int, int] = (0, 1), progress: bool = True):
    """Run `config`'s method into run dir `out`; returns (run dir, manifest, last stage stats)."""
    from engine import methods, models
    from engine.backends.base import load_backend
    from engine.quality import QualityConfig
    from engine.store import RunStore

    module = methods.load(config.method)
    params = method_config(config)
    # Methods publish deduplicated rows by default; `quality: {exact_dedup: false, ...}` turns filters off.
    quality = QualityConfig.model_validate(config.quality or {})
    quality.check_files()
    model_dir = models.prepare(config.model)
    model_id = models.identity(model_dir)
    payload = config.model_dump(mode="json")
    payload["params"] = params.model_dump(mode="json")
    payload["model_fingerprint"] = model_id["fingerprint"]
    payload.pop("store", None)  # commit cadence does not change what is generated
    store = RunStore.open(out, payload, new=new, writer=f"r{replica[0]}",
                          commit_rows=config.store.commit_rows, commit_seconds=config.store.commit_seconds,
                          identity={"model": model_id})
    ctx = methods.Context(
        store=store, seed=config.seed, model_name=model_id["fingerprint"], replica=replica, progress=progress,
        load_backend=lambda: load_backend(config.backend, str(model_dir), grammar_backend=config.grammar_backend,
                                          seed=config.seed, **config.engine),
        extras={"stop_after": stop_after, "quality": quality})
    try:
        output = module.run(params, ctx)
    finally:
        store.commit()
    if output is None:  # stopped early on purpose (e.g. after GLAN's taxonomy)
        store.close()
        return store.out, None, None
    manifest = store.finalize(output.final_stage, quality=quality, text_fields=output.text_fields)
    store.close()
    return store.out, manifest, ctx.extras.get("last_stats")
