"""`sdg export RUN --format superglue`: a TarGEN run's published rows in the layout of the official SuperGLUE
JSON Lines files, so that a training script written for SuperGLUE reads them unchanged.

A run is one task; the export writes that task's file where the official zip has it (BoolQ/train.jsonl, ...,
AX-b/AX-b.jsonl, AX-g/AX-g.jsonl) and a README.md card. The layouts below were read from the official files
(the copies in the Hugging Face `super_glue` loader's test data, and how that loader reads them):

  flat tasks   each row is one line; keys in the official order; `idx` numbers the lines from 0.
  WSC          the two spans nest under `target`.
  WiC, MultiRC carry "version": 1.1.
  MultiRC      one line per passage: {"idx", "version", "passage": {"text", "questions": [{"question",
               "answers": [{"text", "idx", "label"}], "idx"}]}}; question and answer idx count over the file.
  ReCoRD       one line per passage: {"source", "passage": {"text", "entities": [{"start", "end"}]},
               "qas": [{"query", "answers": [{"start", "end", "text"}], "idx"}], "idx"}; `end` is INCLUSIVE
               (text[start:end + 1]), where our rows keep Python's exclusive end.
  AX-b         `idx` is a string ("0"), as in the official file; AX-g carries `pair_id` (an int).

Labels take the official types: BoolQ, WiC and WSC bool; COPA 0/1 (choice1/choice2); CB, RTE, AX-b and AX-g
their label names; MultiRC answers 0/1; ReCoRD has no label (its answers are the label).

Every row is checked before anything is written; all problems are reported in one error.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from engine.request import stable_hash
from engine.store import StoreError
from engine.store.files import atomic_text

BOOL = {"true": True, "false": False}
NLI2 = {"entailment": "entailment", "not_entailment": "not_entailment"}
NLI3 = {"entailment": "entailment", "contradiction": "contradiction", "neutral": "neutral"}
RECORD_SOURCE = "sdg TarGEN"
"""ReCoRD's `source` names the news site a passage came from (\"CNN\", \"Daily mail\"); ours is generated."""
MAX_LISTED = 20
"""At most this many row problems are spelled out in the error (the count is always given)."""


class ExportError(StoreError):
    """The run's rows cannot be written in the SuperGLUE layout (a user error: exit status 2)."""


@dataclass(frozen=True)
class Layout:
    """One task's official file: where it lies, its keys in order, its label values."""
    folder: str
    file: str
    keys: tuple[str, ...]
    """Top-level keys, in the official order."""
    labels: dict[str, Any] | None
    """Our label name -> the official value; None: no top-level label (MultiRC, ReCoRD)."""
    fields: tuple[str, ...]
    """Our row's columns the line is built from."""
    nested: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Official key -> our columns that nest under it, in the official order (WSC's target)."""
    constants: dict[str, Any] = field(default_factory=dict)
    idx: Callable[[int], Any] = int


LAYOUTS: dict[str, Layout] = {
    "boolq": Layout("BoolQ", "train.jsonl", ("question", "passage", "idx", "label"), BOOL,
                    ("question", "passage")),
    "cb": Layout("CB", "train.jsonl", ("premise", "hypothesis", "label", "idx"), NLI3, ("premise", "hypothesis")),
    "copa": Layout("COPA", "train.jsonl", ("premise", "choice1", "choice2", "question", "label", "idx"),
                   {"choice1": 0, "choice2": 1}, ("premise", "choice1", "choice2", "question")),
    "rte": Layout("RTE", "train.jsonl", ("premise", "hypothesis", "label", "idx"), NLI2, ("premise", "hypothesis")),
    "wic": Layout("WiC", "train.jsonl", ("word", "sentence1", "sentence2", "idx", "label", "start1", "start2",
                                         "end1", "end2", "version"), BOOL,
                  ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"), constants={"version": 1.1}),
    "wsc": Layout("WSC", "train.jsonl", ("text", "target", "idx", "label"), BOOL,
                  ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
                  nested={"target": ("span2_index", "span1_index", "span1_text", "span2_text")}),
    "multirc": Layout("MultiRC", "train.jsonl", ("idx", "version", "passage"), None,
                      ("passage", "question", "answers"), constants={"version": 1.1}),
    "record": Layout("ReCoRD", "train.jsonl", ("source", "passage", "qas", "idx"), None,
                     ("passage", "query", "entities", "answers")),
    "axb": Layout("AX-b", "AX-b.jsonl", ("idx", "label", "sentence1", "sentence2"), NLI2,
                  ("sentence1", "sentence2"), idx=str),
    "axg": Layout("AX-g", "AX-g.jsonl", ("hypothesis", "idx", "label", "pair_id", "premise"), NLI2,
                  ("premise", "hypothesis")),
}


# ================================================================================== checks of one row

def row_problems(task: str, row: dict) -> list[str]:
    """What keeps `row` from its task's official layout, in words; [] when it fits.

    >>> row_problems("rte", {"premise": "A.", "label": "maybe"})
    ["no field 'hypothesis'", "label 'maybe' is not one of entailment, not_entailment"]
    """
    layout = LAYOUTS[task]
    problems = [f"no field {f!r}" for f in layout.fields if row.get(f) is None]
    if layout.labels is not None and row.get("label") not in layout.labels:
        problems.append(f"label {row.get('label')!r} is not one of {', '.join(layout.labels)}")
    if not problems and task in SPAN_CHECKS:
        try:
            problems += SPAN_CHECKS[task](row)
        except (KeyError, TypeError, AttributeError) as e:  # a span or answer not shaped as the contract says
            problems.append(f"malformed {task} fields ({type(e).__name__}: {e})")
    return problems


def _record_spans(row: dict) -> list[str]:
    """ReCoRD: every entity and answer is the passage text at its (exclusive) offsets; answers are entities."""
    passage, problems = row["passage"], []
    if "@placeholder" not in row["query"]:
        problems.append("query has no @placeholder")
    for kind in ("entities", "answers"):
        for span in row[kind]:
            if passage[span["start"]:span["end"]] != span["text"] or span["start"] >= span["end"]:
                problems.append(f"{kind} span {span['start']}:{span['end']} is not {span['text']!r} in the passage")
    entity_spans = {(e["start"], e["end"]) for e in row["entities"]}
    if not row["answers"]:
        problems.append("no answers")
    problems += [f"answer {a['text']!r} is not an entity" for a in row["answers"]
                 if (a["start"], a["end"]) not in entity_spans]
    return problems


def _wic_spans(row: dict) -> list[str]:
    """WiC: each offset pair lies inside its sentence (the word may be inflected there, so no text match)."""
    return [f"start{i}/end{i} {row[f'start{i}']}:{row[f'end{i}']} outside sentence{i}" for i in (1, 2)
            if not 0 <= row[f"start{i}"] < row[f"end{i}"] <= len(row[f"sentence{i}"])]


def _wsc_spans(row: dict) -> list[str]:
    """WSC: span_index is the word index (text.split()) where span_text starts."""
    words = row["text"].split()
    problems = []
    for i in (1, 2):
        index, text = row[f"span{i}_index"], row[f"span{i}_text"]
        if not 0 <= index < len(words) or words[index:index + len(text.split())] != text.split():
            problems.append(f"span{i}_text {text!r} is not at word {index} of text")
    return problems


def _multirc_answers(row: dict) -> list[str]:
    answers = row["answers"]
    if not answers:
        return ["no answers"]
    return [f"answer {a.get('text')!r} has label {a.get('label')!r}, not 0 or 1" for a in answers
            if a.get("label") not in (0, 1) or not isinstance(a.get("text"), str)]


SPAN_CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "record": _record_spans, "wic": _wic_spans, "wsc": _wsc_spans, "multirc": _multirc_answers}


# ================================================================================== rows -> official lines

def flat_lines(task: str, rows: list[dict]) -> list[dict]:
    """One official line per row (every task but MultiRC and ReCoRD), keys in the official order."""
    layout = LAYOUTS[task]
    lines = []
    for i, row in enumerate(rows):
        values = {f: row[f] for f in layout.fields} | dict(layout.constants)
        values |= {"idx": layout.idx(i), "label": layout.labels[row["label"]]}
        values |= {key: {f: row[f] for f in cols} for key, cols in layout.nested.items()}
        if task == "axg":  # a stable number from the row's key, so a line traces back to its row
            values["pair_id"] = int(stable_hash(["axg-pair", row["key"]])[:12], 16)
        lines.append({key: values[key] for key in layout.keys})
    return lines


def by_passage(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by identical passage text, in first-appearance order (MultiRC and ReCoRD nest the questions
    of one passage in one line)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["passage"], []).append(row)
    return list(groups.values())


def multirc_lines(rows: list[dict]) -> list[dict]:
    """One line per passage; question and answer idx count over the whole file, as in the official one."""
    lines, question_idx, answer_idx = [], 0, 0
    for p, group in enumerate(by_passage(rows)):
        questions = []
        for row in group:
            answers = []
            for a in row["answers"]:
                answers.append({"text": a["text"], "idx": answer_idx, "label": int(a["label"])})
                answer_idx += 1
            questions.append({"question": row["question"], "answers": answers, "idx": question_idx})
            question_idx += 1
        lines.append({"idx": p, "version": 1.1, "passage": {"text": group[0]["passage"], "questions": questions}})
    return lines


def record_lines(rows: list[dict]) -> list[dict]:
    """One line per passage: its entities (of all its rows, by position), one qas entry per row; offsets
    turn from our exclusive `end` to ReCoRD's inclusive one."""
    lines, query_idx = [], 0
    for p, group in enumerate(by_passage(rows)):
        spans = sorted({(e["start"], e["end"]) for row in group for e in row["entities"]})
        qas = []
        for row in group:
            answers = [{"start": a["start"], "end": a["end"] - 1, "text": a["text"]} for a in row["answers"]]
            qas.append({"query": row["query"], "answers": answers, "idx": query_idx})
            query_idx += 1
        entities = [{"start": start, "end": end - 1} for start, end in spans]
        lines.append({"source": RECORD_SOURCE, "passage": {"text": group[0]["passage"], "entities": entities},
                      "qas": qas, "idx": p})
    return lines


def superglue_lines(task: str, rows: list[dict]) -> list[dict]:
    """The task's official lines for `rows` (already checked by row_problems)."""
    if task == "multirc":
        return multirc_lines(rows)
    if task == "record":
        return record_lines(rows)
    return flat_lines(task, rows)


# ================================================================================== the export

def published_rows(run_dir: Path) -> list[dict]:
    """The run's published rows, file by file (a TarGEN dataset is small enough to hold: it is checked whole
    before anything is written)."""
    rows = []
    for f in sorted(Path(run_dir, "data").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def check_rows(rows: list[dict]) -> str:
    """The run's one task, after checking every row; raises ExportError naming every problem found."""
    tasks = sorted({str(r.get("task")) for r in rows})
    if len(tasks) != 1:
        raise ExportError(f"a SuperGLUE export is of one task; the rows hold {len(tasks)}: {', '.join(tasks)}")
    task = tasks[0]
    if task not in LAYOUTS:
        raise ExportError(f"task {task!r} has no SuperGLUE layout; the layouts are for: {', '.join(LAYOUTS)} "
                          f"(the task spec's `name`)")
    problems = [f"row {i} ({row.get('key')}): {p}" for i, row in enumerate(rows) for p in row_problems(task, row)]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + ("; ..." if len(problems) > MAX_LISTED else "")
        raise ExportError(f"{len(problems)} problem(s) keep the rows from the official {task} layout: {listed}")
    return task


CARD = """# SuperGLUE-format export

Exported by `sdg export {run} --format superglue` from a TarGEN run of sdg: {rows} generated {task} rows, written
as {lines} lines of `{path}` in the layout of the official SuperGLUE file (field names, nesting, label types,
`idx`). Load it with `datasets.load_dataset("json", data_files="{path}")` or any SuperGLUE reader.
{note}
The rows are synthetic: generated by a language model with label-constrained prompts and self-correction
(TarGEN, arXiv 2310.17876), not drawn from the benchmark.
"""
NOTES = {"record": "\nReCoRD offsets are inclusive, as in the official file: the text is `passage[start:end + 1]`.\n",
         "multirc": "\nQuestions that share a passage are one line, as in the official file.\n",
         "axb": "\n`idx` is a string, as in the official AX-b file.\n",
         "axg": "\n`pair_id` is a number derived from the row's key (our rows are not Winogender pairs).\n"}


def export(run_dir: Path, to: Path) -> int:
    """Write the run's published rows to `to`/<Task folder>/<file>.jsonl (plus `to`/README.md); returns the
    number of rows exported. Nothing is written when a row does not fit."""
    run_dir, to = Path(run_dir), Path(to)
    rows = published_rows(run_dir)
    if not rows:
        raise ExportError(f"{run_dir} published no rows; nothing to export")
    task = check_rows(rows)
    layout, lines = LAYOUTS[task], superglue_lines(task, rows)
    path = to / layout.folder / layout.file
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_text(path) as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    with atomic_text(to / "README.md") as fh:
        fh.write(CARD.format(run=run_dir.name, rows=len(rows), task=task, lines=len(lines),
                             path=path.relative_to(to).as_posix(), note=NOTES.get(task, "")))
    return len(rows)

