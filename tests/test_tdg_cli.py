"""TDG on the command line: `sdg tdg verify`, `sdg tdg instantiate` (a resumable run with no model stage),
`sdg export --format templategsm` (TemplateGSM's fields and types; each exported solution_code run with exec
leaves its answer in `result`), and the paper-scale defaults (1,000 problems per template, never cut below the
count but for exact duplicates, the repeat rate reported). No engine: these runs have no model stage."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from tests.conftest import ROOT, sdg

SEEDS = [json.loads(line) for line in (ROOT / "data" / "tdg" / "seed_templates.jsonl").read_text().splitlines()
         if line.strip()]
LEGACY = ROOT / "tests" / "data" / "tdg_legacy"


def _file(path: Path, templates: list) -> Path:
    path.write_text("".join((t if isinstance(t, str) else json.dumps(t)) + "\n" for t in templates))
    return path


def _bad_template() -> dict:
    """A seed template whose step names a variable it never declares."""
    bad = json.loads(json.dumps(SEEDS[1]))
    bad["steps"][0]["expr"] = bad["steps"][0]["expr"] + " + bonus"
    bad["skill"] = "bad on purpose"
    return bad


def test_verify_prints_a_line_per_template_and_fails_on_a_reject(tmp_path):
    good = _file(tmp_path / "good.jsonl", SEEDS[:2])
    r = sdg("tdg", "verify", str(good))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("\taccepted" in line for line in lines)
    mixed = _file(tmp_path / "mixed.jsonl", [SEEDS[0], _bad_template()])
    r = sdg("tdg", "verify", str(mixed))
    assert r.returncode == 1
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("line 1\t") and first.endswith("accepted")
    assert second.startswith("line 2\t") and "rejected unknown_name" in second and "bonus" in second


def test_a_bad_templates_file_names_every_bad_line(tmp_path):
    bad = _file(tmp_path / "bad.jsonl", [SEEDS[0], "{not json", '{"hello": 1}', SEEDS[1], "[1, 2]"])
    for command in (["tdg", "verify", str(bad)], ["tdg", "instantiate", str(bad), "-n", "3", "--out",
                                                  str(tmp_path / "out")]):
        r = sdg(*command)
        assert r.returncode == 2, r.stderr[-2000:]
        error = r.stderr.strip().splitlines()[-1]
        assert error.startswith("error:") and "3 bad lines" in error
        assert "line 2: not JSON" in error and "line 3: neither" in error and "line 5: neither" in error
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def instantiated(tmp_path_factory):
    """`sdg tdg instantiate` of three seed templates and one rejected template, 300 problems each."""
    tmp = tmp_path_factory.mktemp("tdg-cli")
    templates = _file(tmp / "templates.jsonl", SEEDS[:3] + [_bad_template()])
    out = tmp / "run"
    r = sdg("tdg", "instantiate", str(templates), "-n", "300", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"tmp": tmp, "templates": templates, "out": out, "stdout": r.stdout,
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_instantiate_publishes_the_count_of_every_accepted_template(instantiated):
    import pyarrow.parquet as pq
    manifest = instantiated["manifest"]
    rows = pq.read_table(instantiated["out"] / "data").to_pylist()
    per_template: dict = {}
    for row in rows:
        per_template[row["template_id"]] = per_template.get(row["template_id"], 0) + 1
    assert len(per_template) == 3  # the rejected template is not instantiated
    assert manifest["stages"]["file_templates"]["rejects"] == 1
    # never cut below the count, except exact duplicates, which are counted
    exact = manifest["dataset"]["quality"]["exact_duplicate"]
    assert manifest["dataset"]["quality"]["near_duplicate"] == 0 and not manifest["dataset"]["quality"]["config"]["near_dedup"]
    assert all(n <= 300 for n in per_template.values()) and sum(per_template.values()) + exact == 900
    assert all(row["row_code_verified"] and row["origin"].startswith("templates.jsonl line") for row in rows)
    assert len({(row["template_id"], row["variables"]) for row in rows}) == len(rows)  # repeats drawn again
    figures = manifest["stages"]["problems"]["stats"]
    assert figures["instances"] == 900 and figures["templates_short"] == 0
    assert 0.0 <= figures["repeat_rate"] < 0.5
    assert figures["repeat_rate"] == round(figures["repeats_redrawn"] / (900 + figures["repeats_redrawn"]), 4)


def test_instantiate_resumes_without_redoing_work(instantiated):
    before = sorted(p.name for p in (instantiated["out"] / "stages").rglob("*.parquet"))
    r = sdg("tdg", "instantiate", str(instantiated["templates"]), "-n", "300", "--out", str(instantiated["out"]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (instantiated["out"] / "stages").rglob("*.parquet")) == before


def test_templategsm_export_is_drop_in(instantiated):
    to = instantiated["tmp"] / "templategsm"
    r = sdg("export", str(instantiated["out"]), "--format", "templategsm", "--to", str(to))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (to / "templategsm.jsonl").read_text().splitlines()]
    assert rows and len(rows) == instantiated["manifest"]["dataset"]["num_rows"]
    types = {"problem": str, "solution_code": str, "result": str, "solution_wocode": str, "source": str,
             "template_id": int, "problem_id": int}
    for row in rows:
        assert list(row) == list(types) and all(type(row[k]) is t for k, t in types.items())
        assert "def solution" not in row["solution_code"] and row["solution_code"].lstrip().startswith(("#", "import"))
        namespace: dict = {}
        exec(row["solution_code"], namespace)  # our own compiled code, as a TemplateGSM user would run it
        assert Fraction(str(namespace["result"])) == Fraction(row["result"])
    card = (to / "README.md").read_text()
    assert all(f"| {field} | {'int64' if t is int else 'string'} |" in card for field, t in types.items())
    import datasets
    loaded = datasets.load_dataset("json", data_files=str(to / "templategsm.jsonl"), split="train")
    assert loaded.num_rows == len(rows) and loaded.features["template_id"].dtype == "int64"


def test_paper_scale_defaults():
    from engine.methods import tdg
    from engine.methods.tdg.template import word_lists
    assert tdg.Config().problems_per_template == 1000
    assert tdg.QUALITY_DEFAULTS == {"near_dedup": False}
    lists = word_lists()
    assert len(lists["names"]) >= 500 and len(lists["places"]) >= 50 and len(lists["items"]) >= 50


@pytest.mark.skipif(not LEGACY.is_dir(), reason="legacy fixtures not present")
def test_legacy_templates_verify_and_instantiate(tmp_path):
    good = sorted(LEGACY.glob("good*.jsonl"))
    assert good
    r = sdg("tdg", "verify", str(good[0]))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert all("\tlegacy\taccepted" in line for line in r.stdout.strip().splitlines())
    out = tmp_path / "run"
    r = sdg("tdg", "instantiate", str(good[0]), "-n", "20", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    to = tmp_path / "export"
    assert sdg("export", str(out), "--format", "templategsm", "--to", str(to)).returncode == 0
    for row in map(json.loads, (to / "templategsm.jsonl").read_text().splitlines()):
        namespace: dict = {}
        exec(row["solution_code"], namespace)
        assert float(namespace["result"]) == pytest.approx(float(row["result"]))
