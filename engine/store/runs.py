"""A run directory's identity: config.json holds the run's config and its hash, written once; a directory holding
another config is refused, a new or empty one is claimed, `--new` picks a fresh sibling."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import engine.store.files as files
from engine.store.files import fsync_dir, json_bytes, now

FORMAT = "sdg-run/1"


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class ConfigMismatch(StoreError):
    """OUT holds a run of a different config."""



def canonical_config(config: dict) -> dict:
    """The config as JSON would give it back (tuples become lists, ...), so hash and comparison agree."""
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"the run config must be JSON-serializable: {e}") from None


def config_hash(config: dict) -> str:
    """sha256 of the config serialized with sorted keys: `config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})`."""
    blob = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def fresh_dir(out: Path) -> Path:
    """OUT if it is absent or empty, else the first absent-or-empty sibling OUT-2, OUT-3, ..."""
    for i in range(1, 10_000):
        cand = out if i == 1 else out.with_name(f"{out.name}-{i}")
        try:
            cand.mkdir(parents=True)  # claims the name, even against a concurrent `--new`
            return cand
        except FileExistsError:
            if cand.is_dir() and not any(cand.iterdir()):
                return cand
    raise StoreError(f"no free sibling run directory for {out} (tried {out.name}-2 ... {out.name}-9999)")


def _differing_keys(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k, ...) != b.get(k, ...)]


def refuse_foreign(out: Path) -> None:
    """OUT must be a directory that is empty (temp files aside) or holds config.json."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} exists and is not a directory; choose another --out")
    if not out.exists() or (out / "config.json").exists():
        return
    strays = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if strays:
        raise StoreError(f"{out} is not empty and is not a run directory (no config.json; it holds "
                         f"{', '.join(sorted(strays)[:5])}); choose another --out")


def read_config(path: Path) -> dict:
    stored = json.loads(path.read_text())
    if stored.get("format") != FORMAT:
        raise StoreError(f"{path} has format {stored.get('format')!r}; this engine reads {FORMAT!r}")
    return stored


def check_same(out: Path, stored: dict, config: dict, chash: str) -> None:
    if stored["config_hash"] != chash:
        keys = _differing_keys(stored["config"], config)
        raise ConfigMismatch(
            f"{out} holds a run of another config (stored hash {stored['config_hash'][:12]}, this config "
            f"{chash[:12]}; differing keys: {', '.join(keys[:5]) or '(none at top level)'}). "
            f"Pass --new to start a separate run directory, or choose another --out.")


def create_or_read_config(out: Path, config: dict, chash: str, identity: dict | None) -> dict:
    """config.json of OUT, created (exclusively, via link) if OUT is a new or empty directory."""
    path = out / "config.json"
    if not path.exists():
        info = {"format": FORMAT, "config_hash": chash, "config": config, "identity": identity, "created": now()}
        tmp = out / f".tmp-config-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            files._write_file(f, json_bytes(info))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created it first: then theirs is read below
            fsync_dir(out)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return read_config(path)


