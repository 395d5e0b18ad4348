#!/usr/bin/env python3
"""Install an `sdg bundle` on a machine with no network, with nothing but the machine's own Python (3.10+).

    python3 install.py [--dest DIR] [--check] [--isolated | --system-site-packages] [--no-model]

This file is copied into every bundle by `sdg bundle` (engine/bundle.py); it imports only the standard library.
Next to it lie manifest.json and the pieces `sdg-bundle.tar.NNNN`. It:

  1. checks every piece (present, size, sha256) and refuses the bundle, naming every bad piece, if one is wrong;
  2. joins the pieces as one tar stream (nothing is written twice) and unpacks it into DEST (default: a folder
     `sdg` next to this file): DEST/wheels, DEST/project (the sdg source tree), DEST/model (a --model, if any);
  3. creates the virtual environment DEST/venv (seeing the system's packages when the bundle was built for a
     server that has some, such as its torch), installs pip from the bundle if the venv has none, then
     `pip install --no-index --no-deps` every wheel and the project (editable: it reads prompts/, grammars/ and
     data/ from DEST/project);
  4. writes DEST/env.sh (PATH and the environment variables the bundle's engine needs) and prepares the model
     once (`sdg model prepare`), so that `sdg generate` and `sdg run` work straight away.

Exit status 2 and one `error:` line for a bundle that is incomplete or damaged; nothing is unpacked then.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

HERE = Path(os.path.abspath(__file__)).parent  # not resolve(): a linked install.py checks the pieces beside it
CHUNK = 1 << 20


class BundleBroken(Exception):
    """A bundle that must not be installed: a piece missing, cut short or altered, or a bad manifest."""


def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleBroken(f"cannot read {path}: {e}") from None
    if manifest.get("format") != "sdg-bundle/1" or not manifest.get("pieces"):
        raise BundleBroken(f"{path} is not an sdg bundle manifest (format sdg-bundle/1 with pieces)")
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def piece_problems(bundle: Path, manifest: dict) -> list[str]:
    """One line per missing, short or altered piece; [] when every piece is as the manifest says."""
    problems = []
    for piece in manifest["pieces"]:
        path = bundle / piece["name"]
        if not path.is_file():
            problems.append(f"{piece['name']} is missing")
        elif path.stat().st_size != piece["bytes"]:
            problems.append(f"{piece['name']} has {path.stat().st_size} bytes, expected {piece['bytes']}")
        elif sha256_of(path) != piece["sha256"]:
            problems.append(f"{piece['name']} is corrupted (sha256 differs from the manifest)")
    return problems


class JoinedPieces:
    """The pieces read back to back as one stream (what tarfile's stream mode reads), hashed on the way."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.current, self.digest = list(paths), None, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self.current is None:
                if not self.paths:
                    break
                self.current = self.paths.pop(0).open("rb")
            block = self.current.read(CHUNK if size < 0 else size - len(out))
            if not block:
                self.current.close()
                self.current = None
                continue
            out += block
        self.digest.update(out)
        return bytes(out)


def unpack(bundle: Path, manifest: dict, dest: Path) -> None:
    """Extract the joined pieces into `dest`; the whole stream must hash to the manifest's archive sha256."""
    stream = JoinedPieces([bundle / p["name"] for p in manifest["pieces"]])
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths, '..' and device files
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    stream.read()  # the tar end padding, so that the hash covers the whole archive
    if stream.digest.hexdigest() != manifest["archive"]["sha256"]:
        raise BundleBroken("the joined pieces do not hash to the manifest's archive sha256 (a piece changed "
                           "while it was being read?)")


def offline_env() -> dict:
    """The environment for pip here: no index, no configuration files that could name one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", PIP_NO_CACHE_DIR="1")
    return env


def run(cmd: list, **kwargs) -> None:
    """Run `cmd`, showing it with its wheel files counted rather than listed."""
    args = [str(c) for c in cmd]
    wheels = sum(a.endswith(".whl") for a in args)
    shown = [a for a in args if not a.endswith(".whl")] + ([f"<{wheels} wheel file(s)>"] if wheels else [])
    print("+", " ".join(shlex.quote(a) for a in shown), flush=True)
    subprocess.run(args, check=True, **kwargs)


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_venv(path: Path, system_site_packages: bool) -> Path:
    """Create (or reuse) the venv without ensurepip, which some systems lack; pip comes from the bundle."""
    if not venv_python(path).exists():
        venv.EnvBuilder(with_pip=False, system_site_packages=system_site_packages, symlinks=os.name != "nt",
                        upgrade_deps=False).create(path)
    if system_site_packages:
        see_running_environment(path)
    return venv_python(path)


def see_running_environment(venv_dir: Path) -> None:
    """When the Python running install.py is itself a venv (the H200 image's python3 is /opt/torch/.venv, which
    holds torch), `system_site_packages` shows only its base interpreter's packages: torch and
    typing_extensions were missing there. A .pth file puts the running venv's site-packages after the new
    venv's own, so the bundle's wheels still come first."""
    if sys.prefix == sys.base_prefix:
        return
    import site
    theirs = [p for p in site.getsitepackages() if Path(p).is_dir()]
    for ours in venv_dir.glob("lib/python*/site-packages"):
        (ours / "_sdg_server_site.pth").write_text("".join(f"{p}\n" for p in theirs))
    for ours in venv_dir.glob("Lib/site-packages"):
        (ours / "_sdg_server_site.pth").write_text("".join(f"{p}\n" for p in theirs))


def ensure_pip(venv_dir: Path, python: Path, wheels: Path) -> None:
    """Give the venv its own pip (not the system's, which a venv seeing system packages would otherwise run):
    the bundle's pip wheel runs from the wheel file itself to install itself."""
    if any(venv_dir.glob("lib/python*/site-packages/pip")) or (venv_dir / "Lib/site-packages/pip").is_dir():
        return
    found = sorted(wheels.glob("pip-*.whl"))
    if not found:
        raise BundleBroken("the venv has no pip and the bundle carries no pip wheel")
    run([python, found[-1] / "pip", "install", "--no-index", "--no-deps", found[-1]], env=offline_env())


def install(dest: Path, manifest: dict, system_site_packages: bool) -> Path:
    """Every carried wheel, then the project (editable), into DEST/venv, with the network closed for pip."""
    wheels = dest / "wheels"
    python = make_venv(dest / "venv", system_site_packages)
    ensure_pip(dest / "venv", python, wheels)
    files = [wheels / w["file"] for w in manifest["wheels"] if w["name"] != "pip"]  # pip: ensure_pip's
    # --no-compile: byte-compiling every module of torch, vLLM and transformers at install time took longer
    # than the rest of the installation; Python compiles what is imported, once, on first use.
    pip = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--find-links", wheels]
    run(pip + files, env=offline_env())
    run(pip + ["--no-build-isolation", "-e", dest / "project"], env=offline_env())
    return python


def write_env(dest: Path, manifest: dict) -> Path:
    """DEST/env.sh: `source` it to get `sdg` on PATH and the variables this bundle's engine needs."""
    lines = ["# written by install.py of an sdg bundle: source this file",
             f"export PATH={shlex.quote(str(dest / 'venv' / 'bin'))}:\"$PATH\""]
    for key, value in sorted(manifest["install"].get("env", {}).items()):
        lines.append(f"export {key}={shlex.quote(str(value))}")
    path = dest / "env.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def model_argument(dest: Path, manifest: dict) -> list[str]:
    """The `--model` to pass to sdg for the carried model ([] for the embedded one)."""
    where = manifest.get("model", {}).get("in_bundle")
    return ["--model", str(dest / where)] if where else []


def prepare_model(dest: Path, manifest: dict) -> None:
    env = dict(os.environ, **manifest["install"].get("env", {}))
    sdg = dest / "venv" / "bin" / "sdg"
    run([sdg, "model", "prepare", *model_argument(dest, manifest)], env=env)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="install.py", description="Install an sdg bundle with no network.")
    parser.add_argument("--dest", type=Path, default=HERE / "sdg", help="where to install (default: ./sdg here)")
    parser.add_argument("--check", action="store_true", help="only check the pieces, install nothing")
    site = parser.add_mutually_exclusive_group()
    site.add_argument("--system-site-packages", dest="site", action="store_const", const=True,
                      help="the venv sees the system's packages (default when the bundle leaves some out)")
    site.add_argument("--isolated", dest="site", action="store_const", const=False,
                      help="the venv sees only what the bundle installs")
    parser.add_argument("--no-model", action="store_true", help="do not run `sdg model prepare` at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        manifest = load_manifest(HERE)
        problems = piece_problems(HERE, manifest)
        if problems:
            raise BundleBroken(f"refusing to install: {'; '.join(problems)}. Copy the bad piece(s) again "
                               f"from the bundle folder (checksums: manifest.json, SHA256SUMS)")
        print(f"{len(manifest['pieces'])} pieces verified ({manifest['archive']['bytes'] / 2**20:,.0f} MiB, "
              f"{time.monotonic() - started:.0f}s)", flush=True)
        if args.check:
            return 0
        dest = args.dest.resolve()
        unpack(HERE, manifest, dest)
        print(f"unpacked into {dest} ({time.monotonic() - started:.0f}s)", flush=True)
        site = manifest["install"]["system_site_packages"] if args.site is None else args.site
        install(dest, manifest, site)
        print(f"installed into {dest / 'venv'} ({time.monotonic() - started:.0f}s)", flush=True)
        env_file = write_env(dest, manifest)
        if not args.no_model:
            prepare_model(dest, manifest)
    except BundleBroken as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd[:4]))} ... failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    model = " ".join(model_argument(dest, manifest))
    print(f"installed in {time.monotonic() - started:.0f}s: {dest}\n"
          f"  source {env_file}\n"
          f"  cd {dest / 'project'} && sdg generate --prompts examples/demo_prompts.jsonl --out runs/demo"
          f"{' ' + model if model else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
