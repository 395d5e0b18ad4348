"""`sdg generate` end to end (real vLLM, real model) and its refusals of bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import sdg


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


GOOD = {"prompt": "Hello", "max_tokens": 8}
BAD_INPUTS = {
    "missing prompts file": (None, [], "prompts file not found"),
    "malformed line": (["{not json"], [], "malformed JSON"),
    "empty file": ([], [], "empty"),
    "malformed schema": ([{"prompt": "x", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}], [],
                         "malformed JSON Schema"),
    "unsupported schema feature": ([{"prompt": "x", "schema": {"type": "array", "uniqueItems": True}}],
                                   ["--grammar-backend", "xgrammar"], "uniqueItems"),
    "missing model path": ([GOOD], ["--model", "/nonexistent/model"], "model path not found"),
    "hub model name": ([GOOD], ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"], "never downloads"),
    "max_tokens <= 0": ([GOOD], ["--max-tokens", "0"], "max_tokens must be > 0"),
    "per-line max_tokens <= 0": ([{"prompt": "x", "max_tokens": -1}], [], "max_tokens must be > 0"),
    "neither prompt nor messages": ([{"id": 3}], [], "exactly one of 'prompt' or 'messages'"),
    "missing schema file": ([GOOD], ["--schema", "/nonexistent.json"], "schema file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_clear_error_and_nothing_written(tmp_path, case):
    lines, extra, message = BAD_INPUTS[case]
    prompts = tmp_path / "p.jsonl"
    if lines is not None:
        _write(prompts, lines)
    out = tmp_path / "out"
    proc = sdg("generate", "--prompts", str(prompts), "--out", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    error_lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), proc.stderr
    assert message in error_lines[0]
    assert not out.exists()


def test_unknown_backend_is_refused(tmp_path):
    proc = sdg("generate", "--prompts", str(_write(tmp_path / "p.jsonl", [GOOD])), "--out", str(tmp_path / "o"),
               "--backend", "tgi")
    assert proc.returncode == 2 and "invalid choice: 'tgi'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_generate_with_per_line_constraints(tmp_path):
    """One file, one engine run: per-line schemas (inline and file), regex, choices, a default --schema and
    plain prompts. Extra fields are carried through and every row records model, backend, sampling, seed."""
    (tmp_path / "color.schema.json").write_text(json.dumps(
        {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
         "additionalProperties": False}))
    default_schema = tmp_path / "default.schema.json"
    default_schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
                                          "required": ["n"], "additionalProperties": False}))
    lines = [
        {"id": "inline", "prompt": "A number as JSON:", "schema": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": False}},
        {"id": "file", "messages": [{"role": "user", "content": "Pick a colour, JSON"}], "schema": "color.schema.json"},
        {"id": "regex", "prompt": "Year:", "regex": "(19|20)[0-9]{2}", "seed": 11},
        {"id": "choice", "prompt": "Yes or no?", "choices": ["yes", "no"], "temperature": 0.0},
        {"id": "default", "prompt": "Count things, JSON:"},
        {"id": "plain", "prompt": "Say hello", "max_tokens": 8, "group": "extra-field"},
    ]
    proc = sdg("generate", "--prompts", str(_write(tmp_path / "p.jsonl", lines)), "--out", str(tmp_path / "out"),
               "--schema", str(default_schema), "--max-tokens", "48", "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output tok/s" in proc.stdout
    from datasets import load_dataset

    from engine.store import RunStore
    out = tmp_path / "out"
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    rows = {r["id"]: r for r in ds}
    rejects = {r["row"]["id"]: r for r in RunStore.open(out, json.loads(
        (out / "config.json").read_text())["config"]).rejects("generate")}
    # every line is accounted for, once: a row, or a reject with its reason (a tiny model may be cut off)
    assert sorted([*rows, *rejects]) == sorted(line["id"] for line in lines)
    assert all(r["reason"] == "truncated" for r in rejects.values())
    assert len(rows) >= 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["rows"] == len(rows)
    for row in rows.values():
        for field in ("model", "backend", "grammar_backend", "sampling", "seed", "key", "output"):
            assert row[field] is not None, field
        assert row["backend"] == "vllm" and row["sampling"]["max_tokens"] in (8, 48)
    checks = {"inline": lambda o: 0 <= json.loads(o)["x"] <= 9,
              "file": lambda o: json.loads(o)["color"] in ("red", "blue"),
              "regex": lambda o: re.fullmatch("(19|20)[0-9]{2}", o),
              "choice": lambda o: o in ("yes", "no"),
              "default": lambda o: json.loads(o)["n"] <= 99,  # no constraint of its own: --schema applies
              "plain": lambda o: json.loads(o) is not None}
    for name, row in rows.items():
        assert checks[name](row["output"]), (name, row["output"])
    extra = rows.get("plain") or rejects["plain"]["row"]
    assert extra["group"] == "extra-field" and extra["sampling"]["max_tokens"] == 8
    if "regex" in rows:
        assert rows["regex"]["seed"] == 11


def test_rerun_resumes_and_changed_config_is_refused(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"id": i, "prompt": f"Count to {i}:", "max_tokens": 6} for i in range(4)])
    out = tmp_path / "out"
    first = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--backend", "transformers")
    assert first.returncode == 0, first.stderr[-2000:]
    again = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--backend", "transformers")
    assert again.returncode == 0 and "generated" not in again.stdout  # nothing left to generate
    changed = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--backend", "transformers",
                  "--temperature", "0.2")
    assert changed.returncode == 2 and "--new" in changed.stderr
    separate = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--backend", "transformers",
                   "--temperature", "0.2", "--new")
    assert separate.returncode == 0 and (tmp_path / "out-2" / "data").is_dir()


@pytest.mark.parametrize("config, data", [("tdg.yaml", "data/tdg/examples.jsonl"),
                                          ("glan.yaml", "data/glan/taxonomy.yaml")])
def test_input_files_are_part_of_the_run_by_content_not_path(tmp_path, monkeypatch, config, data):
    """The same config in a moved checkout, loaded from another working folder, is the same run; the same
    path with other content is not."""
    from conftest import ROOT
    from engine.pipeline.run import load_run_config, run_payload
    from engine.store import config_hash
    copies = []
    for name in ("a", "b"):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / data).parent.mkdir(parents=True)
        (tmp_path / name / "configs" / config).write_text((ROOT / "configs" / config).read_text())
        (tmp_path / name / data).write_bytes((ROOT / data).read_bytes())
        copies.append(tmp_path / name)
    monkeypatch.chdir(copies[0])
    here = run_payload(load_run_config(Path("configs") / config), model_id={"fingerprint": "m"})
    monkeypatch.chdir(tmp_path)
    moved = run_payload(load_run_config(copies[1] / "configs" / config), model_id={"fingerprint": "m"})
    assert config_hash(here) == config_hash(moved)
    assert str(tmp_path) not in json.dumps([here, moved])  # no path left in the run's identity
    with open(copies[1] / data, "a") as f:
        f.write("\n")  # one more byte
    edited = run_payload(load_run_config(copies[1] / "configs" / config), model_id={"fingerprint": "m"})
    assert config_hash(edited) != config_hash(here)
