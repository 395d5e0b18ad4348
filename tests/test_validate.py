"""`sdg validate CONFIG` and `sdg run CONFIG --dry-run`: nothing generated, nothing written, every problem named
at once (config fields, missing files, a schema the grammar backend cannot take, a pathological schema that
would stall the engine), and per stage what the config implies. Constraints are compiled by the grammar
backends' real libraries with the embedded model's real tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, sdg



def nested_one_of(depth: int) -> dict:
    """xgrammar's compile time grows super-exponentially with oneOf nesting (vllm issue #54003): on this 2-core
    VM, idle, depth 6 compiles in 0.7 s, 8 in 10 s, 9 in more than 20 s."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"oneOf": [{"type": "object", "properties": {"a": schema, "b": {"type": "integer"}},
                             "required": ["a"]}, {"type": "array", "items": schema}, schema]}
    return schema


PATHOLOGICAL = {"title": "nested oneOf", **nested_one_of(9)}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_config_shows_what_it_implies():
    proc = sdg("validate", str(ROOT / "configs" / "tdg.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    # 3 topics + 3 example problems, 2 templates each; 768 output tokens at most per request
    assert "template_variables  model    12 requests; prompt tokens " in out
    assert "output at most 9,216 tokens" in out
    assert "drafts              model    1 request per parent row" in out  # a schema built from the variables
    assert ("problems            computed computed, no model [reads each row of seed_templates, templates, "
            "file_templates]") in out
    assert "JSON Schema 'TDG template variables v1'" in out and "[template_variables]: compiled in" in out
    assert out.rstrip().endswith("ok: no problem found")


def test_every_problem_is_named_at_once(tmp_path):
    """One config with a bad field, an unknown field, a missing decontamination file, a schema xgrammar cannot
    enforce, a schema it cannot compile and a pathological one: all six named, the good regex compiled."""
    prompts = _write(tmp_path / "prompts.jsonl", "\n".join(json.dumps(line) for line in (
        {"prompt": "a", "schema": {"title": "negated", "type": "object", "not": {"required": ["a"]}}},
        {"prompt": "b", "schema": {"title": "dangling ref", "$ref": "#/definitions/nope"}},
        {"prompt": "c", "schema": PATHOLOGICAL},
        {"prompt": "d", "regex": "(19|20)[0-9]{2}"},
    )) + "\n")
    config = _write(tmp_path / "bad.yaml", f"""method: generate
grammar_backend: xgrammar
seed: not-a-number
colour: blue
quality:
  decontam_files: [{{path: {tmp_path / 'missing.jsonl'}, columns: [question]}}]
params:
  prompts: {prompts}
  sampling: {{max_tokens: 32}}
""")
    proc = sdg("validate", str(config), "--timeout", "3")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert "6 problems:" in proc.stdout, proc.stdout
    expected = ["seed: Input should be a valid integer", "colour: Extra inputs are not permitted",
                "decontam file not found", "JSON Schema 'negated'", "JSON Schema 'dangling ref'",
                "JSON Schema 'nested oneOf'"]
    for text in expected:
        assert sum(text in e for e in errors) == 1, (text, errors)
    assert any("'negated'" in e and "cannot enforce /not" in e for e in errors)
    assert any("'dangling ref'" in e and "xgrammar cannot compile it" in e for e in errors)
    assert any("'nested oneOf'" in e and "did not compile within 3 s" in e for e in errors)
    assert "regex '(19|20)[0-9]{2}' [generate]: compiled in" in proc.stdout
    assert "generate  model    4 requests" in proc.stdout


def test_dry_run_names_a_missing_file_and_writes_nothing(tmp_path):
    config = _write(tmp_path / "tdg.yaml", f"""method: tdg
params:
  topics: [fractions]
  examples_file: {tmp_path / 'no-such-examples.jsonl'}
  templates_per_topic: 1
""")
    out = tmp_path / "out"
    proc = sdg("run", str(config), "--out", str(out), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "error: params.examples_file: file not found: " in proc.stdout
    assert "no-such-examples.jsonl" in proc.stdout
    assert not out.exists()


def test_unreadable_config_is_one_problem(tmp_path):
    proc = sdg("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "error: config file not found" in proc.stdout


def test_sdg_run_names_every_problem_of_a_config_at_once(tmp_path):
    """Not only the first: a bad top-level field and three bad params of the method, in one error line."""
    config = tmp_path / "bad.yaml"
    config.write_text("method: glan\nseed: x\nparams:\n  num_rows: -5\n  attempts: 0\n  nonsense: 1\n")
    proc = sdg("run", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "4 problems" in errors[0]
    for field in ("seed", "num_rows", "attempts", "nonsense"):
        assert field in errors[0]
    assert not (tmp_path / "out").exists()
