"""GLAN: Generalized Instruction Tuning (Li et al., "Synthetic Data (Almost) from Scratch", arXiv 2402.13064).

Read top to bottom, like the paper: config, prompts, the declared stages, parsers; then the taxonomy file and
the concept sampling they use. The stages (engine.pipeline runs them: resume, replicas, retries, seeds, stats):

  1. Taxonomy.  Fields -> sub-fields -> disciplines, from a user-given YAML file (`taxonomy_file`) or written by
     the model as constrained lists (stages taxonomy_fields, taxonomy_subfields, taxonomy_disciplines, each
     node's children as soon as the node is accepted). Either way stage `taxonomy` writes OUT/taxonomy.yaml
     once, and every later stage reads THAT file: stop with `--stop-after taxonomy`, edit it (the paper's human
     check), rerun the same command to continue. The file is not a stored stage: it is read again by every run.
  2. Subjects.  Per discipline, `subject_samples` constrained JSON lists of {name, level, subtopics}, asked as
     soon as the taxonomy is read.
  3. Syllabus.  Reads every subject list (a whole-stage read): per discipline the samples are merged and
     deduplicated by name, the first `subjects_per_discipline` kept; per subject, constrained JSON class
     sessions, each with a title, a description and key concepts.
  4. Questions.  Per question, a syllabus (round-robin over disciplines) and a draw made the paper's way
     (`sample_a`/`sample_b`): first the class sessions, then how many key concepts (uniform in its range),
     then which ones:
       A ("single_session"): one session, then 1-5 of its key concepts;
       B ("two_sessions"):   two sessions, then 2-5 concepts from their union, at least one from each.
     The question prompt holds the syllabus up to the last sampled session ("the student has learned up to").
  5. Answers.  Per accepted question, as soon as it is accepted: its own sampling and, optionally, its own model
     (`answer_model`, the pipeline's engine "answer", started only when an answer is asked).
  6. Rows.  The first `num_rows` question-answer pairs (in question order) that pass the run's quality filters,
     with discipline, subject, level, sessions, key concepts, strategy and provenance. Questions and answers
     run in rounds until that count is reached: each round asks for the shortfall x `overprovision` more
     questions, at most `max_rounds` rounds, so a small model that produces rejects still reaches the count (or
     says how short). Round r's questions follow from what rounds 1..r-1 committed, so a resume asks the same.

Request keys hash the rendered prompt (which names the parents: discipline, subject, syllabus), the schema, the
sampling and the core's seed (run seed, stage, item identity, attempt). Identities are content, not positions:
a subject list is its discipline's (the hash of its path) and sample number, a syllabus its subject's path, a
question its number and syllabus.

Taxonomy edits and resume: the run's identity holds `taxonomy_file`'s content, not OUT/taxonomy.yaml's, so
editing OUT/taxonomy.yaml never changes the config hash (editing the source file does: edit the run's copy). An
unchanged discipline is not asked again, an edited or added one is generated, a removed one is ignored (its
committed rows stay in the store but no later stage reads them). The question -> syllabus assignment depends on
the whole pool of syllabi, so an edit made after the questions stage re-asks questions; rows already committed
to stage `rows` stay published, so edit before that stage (or start a run with --new).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import ConfigError
from engine.constraints import Constraint
from engine.methods import Context
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish, Whole
from engine.plan import StageEstimate
from engine.prompting import render
from engine.quality import gates
from engine.request import Request, Result, Sampling, stable_hash

GRAMMARS = Path(__file__).resolve().parents[2] / "grammars" / "glan"
LEVELS = ("high school", "undergraduate", "graduate")  # the levels of a curriculum (default `levels`)
MAX_SESSIONS = 30  # a course: the maxItems of sessions in grammars/glan/syllabus.schema.json (max_sessions)
SINGLE, MULTI = "single_session", "two_sessions"  # the paper's two ways to sample concepts (A and B)
A_SIZES = (1, 5)  # strategy A: 1-5 key concepts of one session
B_SIZES = (2, 5)  # strategy B: 2-5 key concepts of two sessions, from both
# Output shapes, checked against the JSON Schema meta-schema here, when the method is loaded, not mid-run.
SCHEMAS = {name: Constraint.json_schema(GRAMMARS / f"{name}.schema.json")
           for name in ("taxonomy_list", "subjects", "syllabus", "question")}
TAXONOMY_FILE = "taxonomy.yaml"  # in the run directory: what every stage after `taxonomy` reads
TEXT_FIELDS = ["question", "answer"]  # the published text (dedup, decontamination, diversity)


# ================================================================================================ config

class TaxonomyGeneration(BaseModel):
    """How the model writes the taxonomy when no `taxonomy_file` is given (one constrained list per node)."""

    model_config = ConfigDict(extra="forbid")

    num_fields: int = Field(4, ge=1, le=8)
    """Fields of human knowledge (the top level)."""
    subfields_per_field: int = Field(2, ge=1, le=8)
    """Sub-fields asked for under each field."""
    disciplines_per_subfield: int = Field(2, ge=1, le=8)
    """Disciplines asked for under each sub-field."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=160, temperature=0.7))
    """Sampling of each list; a list cut off by max_tokens is rejected ('truncated') and asked again."""


class Config(BaseModel):
    """The `params:` of a GLAN run config."""

    model_config = ConfigDict(extra="forbid")

    taxonomy_file: Path | None = None
    """A taxonomy YAML (field -> sub-field -> list of disciplines), copied to OUT/taxonomy.yaml; a relative path
    is resolved against the config file's folder. None: the model writes it (`taxonomy_generation`)."""
    taxonomy_generation: TaxonomyGeneration = Field(default_factory=TaxonomyGeneration)
    """Used only when `taxonomy_file` is None."""
    levels: list[str] = Field(default_factory=lambda: list(LEVELS), min_length=1)
    """The levels a curriculum has: a discipline's subjects are asked for level by level."""
    subjects_per_level: int = Field(10, ge=1, le=20)
    """Subjects asked for in each list (one list per discipline, level and sample; at most 20, the schema's
    maxItems). A discipline gets up to levels x subject_samples x this many subjects: raise subject_samples for
    more; no per-request ceiling caps a discipline."""
    subject_samples: int = Field(1, ge=1, le=50)
    """Subject-list samples per discipline and level (distinct seeds), merged and deduplicated by name."""
    subjects_per_discipline: int | None = Field(None, ge=1, le=10_000)
    """Subjects kept per discipline after merging (the first ones: level by level, in sample order); None
    keeps them all."""
    num_rows: int = Field(100, ge=1, le=10_000_000)
    """Question-answer rows to publish."""
    two_session_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """Share of questions drawn with strategy B (two sessions); the rest use A (one session). A syllabus with
    no valid B draw (one session with concepts) always uses A."""
    attempts: int = Field(3, ge=1, le=10)
    """Most requests (distinct seeds) per taxonomy node, subject sample and syllabus until one is accepted."""
    overprovision: float = Field(1.5, ge=1.0, le=20.0)
    """Each question round asks for (rows still missing) x this many questions."""
    max_rounds: int = Field(4, ge=1, le=100)
    """Most question/answer rounds; after them the run publishes what it has and records the shortfall."""
    max_sessions: int = Field(MAX_SESSIONS, ge=2, le=MAX_SESSIONS)
    """Most class sessions of a syllabus (the prompt says it and the schema's maxItems enforces it)."""
    subject_sampling: Sampling = Field(
        default_factory=lambda: Sampling(max_tokens=1024, temperature=1.0, top_p=0.95))
    """Sampling of each subject list (the paper's reference settings: temperature 1.0, top_p 0.95)."""
    syllabus_sampling: Sampling = Field(
        default_factory=lambda: Sampling(max_tokens=4096, temperature=1.0, top_p=0.95))
    """Sampling of each syllabus, up to 30 sessions (the paper's reference settings: temperature 1.0, top_p
    0.95)."""
    question_sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=200, temperature=0.8))
    """Sampling of each question."""
    answer_sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=2048, temperature=0.3))
    """Sampling of each answer: a budget that fits a worked answer; an answer cut off by max_tokens is rejected
    ('truncated'), one that declines ('I don't know', 'as an AI') is rejected ('declined')."""
    answer_model: str | None = None
    """A local HF folder or .gguf file for the answers (the paper answers with another model than it asks with).
    None, or the run's own model: the run's backend answers. Another model is loaded as a second backend of the
    same kind and engine settings as the run's (both stay loaded: mind the memory)."""

    @field_validator("taxonomy_file")
    @classmethod
    def _taxonomy_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"taxonomy file not found: {v}")
        return v


# Hashed into the run's identity by content, not path (engine.config.file_identity).
FILE_PARAMS = ("taxonomy_file",)


def resolve_paths(params: dict, base: Path) -> dict:
    """taxonomy_file relative to the config file's folder; a malformed file fails here, before any model loads."""
    p = dict(params)
    if p.get("taxonomy_file"):
        path = Path(p["taxonomy_file"])
        p["taxonomy_file"] = str(path if path.is_absolute() else base / path)
        if Path(p["taxonomy_file"]).is_file():
            load_taxonomy(Path(p["taxonomy_file"]))
    return p


# ================================================================================================ prompts

def json_request(model: str, stage: str, template: str, constraint: Constraint, sampling: Sampling, seed: int,
                 meta: dict, **variables) -> Request:
    """A chat request (system + rendered user template) constrained to `constraint`'s JSON."""
    messages = [{"role": "system", "content": render("glan/system.jinja")},
                {"role": "user", "content": render(template, **variables)}]
    return Request.build(stage=stage, model=model, messages=messages, constraint=constraint, sampling=sampling,
                         seed=seed, meta={"stage": stage, "model": model, **meta})


_LEVEL_NAMES = {"taxonomy_fields": "fields", "taxonomy_subfields": "sub-fields",
                "taxonomy_disciplines": "disciplines"}


def taxonomy_request(config: Config, model: str, stage: str, parents: tuple[str, ...], seed: int) -> Request:
    """One node of the model-written taxonomy: a list of the children of `parents` (outermost first)."""
    gen = config.taxonomy_generation
    n = {"taxonomy_fields": gen.num_fields, "taxonomy_subfields": gen.subfields_per_field,
         "taxonomy_disciplines": gen.disciplines_per_subfield}[stage]
    return json_request(model, stage, "glan/taxonomy.jinja", SCHEMAS["taxonomy_list"], gen.sampling, seed,
                        meta={"parents": list(parents), "n": n}, level=_LEVEL_NAMES[stage], parents=list(parents),
                        n=n)


def subjects_request(config: Config, model: str, item: tuple[dict, str, int], seed: int) -> Request:
    """Sample `sample` of a discipline's subject list at one level."""
    d, level, sample = item
    return json_request(model, "subjects", "glan/subjects.jinja", SCHEMAS["subjects"], config.subject_sampling,
                        seed, meta={**_discipline_of(d), "level": level, "sample": sample}, field=d["field"],
                        subfield=d["subfield"], discipline=d["discipline"], level=level,
                        n=config.subjects_per_level)


def syllabus_request(config: Config, model: str, subject: dict, seed: int) -> Request:
    """The syllabus of one subject (its discipline, level and subtopics), at most `max_sessions` sessions."""
    return json_request(model, "syllabus", "glan/syllabus.jinja", syllabus_schema(config.max_sessions),
                        config.syllabus_sampling, seed, meta=subject, discipline=subject["discipline"],
                        subject=subject["subject"], level=subject["level"], subtopics=subject["subtopics"],
                        max_sessions=config.max_sessions)


def syllabus_schema(max_sessions: int) -> Constraint:
    """grammars/glan/syllabus.schema.json with at most `max_sessions` sessions."""
    if max_sessions == MAX_SESSIONS:
        return SCHEMAS["syllabus"]
    spec = json.loads(json.dumps(SCHEMAS["syllabus"].spec))
    spec["properties"]["sessions"]["maxItems"] = max_sessions
    return Constraint.json_schema(spec)


def question_request(config: Config, ctx: Context, item: tuple[int, dict], seed: int) -> Request:
    """Question q on syllabus s: a seeded draw of its sessions and concepts, the syllabus up to the last one."""
    q, s = item
    sessions = s["sessions"]
    rng = random.Random(stable_hash(["glan-draw", ctx.seed, q, s["syllabus_key"]]))
    strategy, (picked, concepts) = sample_concepts([len(x["key_concepts"]) for x in sessions], rng,
                                                   config.two_session_ratio)
    last = max(picked) + 1
    names = [sessions[i]["key_concepts"][c] for i, c in concepts]
    meta = {**{k: s[k] for k in ("field", "subfield", "discipline", "subject", "level", "subtopics",
                                 "subjects_key", "syllabus_key")},
            "question_index": q, "strategy": strategy, "sessions": [i + 1 for i in picked],
            "session_titles": [sessions[i]["title"] for i in picked], "key_concepts": names}
    return json_request(
        ctx.model_name, "questions", "glan/question.jinja", SCHEMAS["question"], config.question_sampling, seed,
        meta=meta, subject=s["subject"], level=s["level"], discipline=s["discipline"], last=last,
        learned=[{"number": n + 1, **x} for n, x in enumerate(sessions[:last])],
        selected=[{"number": i + 1, "title": sessions[i]["title"]} for i in picked], concepts=names,
        strategy=strategy)


def answer_request(config: Config, model: str, question: dict, seed: int) -> Request:
    """One free-text answer per accepted question: the question alone, as a user would ask it."""
    messages = [{"role": "system", "content": render("glan/answer_system.jinja")},
                {"role": "user", "content": render("glan/answer.jinja", question=question["question"])}]
    return Request.build(stage="answers", model=model, sampling=config.answer_sampling, seed=seed,
                         messages=messages,
                         meta={"stage": "answers", "question_key": question["key"],
                               "question_index": question["question_index"], "model": model})


# ================================================================================================ the stages

def pipeline(config: Config, ctx: Context) -> Pipeline:
    """GLAN's declared stages: taxonomy (model-written or a file) -> subjects -> syllabus -> questions and
    answers in rounds -> rows."""
    model = ctx.model_name
    answer_model, answer_dir = answering_model(config, ctx)
    engines = {}
    if answer_dir is not None:  # another model answers: a second engine, started when the first answer is asked
        engines["answer"] = (ctx.start_engine(answer_dir) if ctx.start_engine is not None
                             else _no_engine(answer_dir))
    qa = QuestionRounds(config, ctx.run_id)
    model_writes = lambda: config.taxonomy_file is None and not (ctx.out / TAXONOMY_FILE).exists()  # noqa: E731

    def node_request(stage: str) -> Callable[[tuple[str, ...], int], Request]:
        return partial(taxonomy_request, config, model, stage)

    stages = [
        # 1. the taxonomy: the model's lists (only while OUT/taxonomy.yaml does not exist), then THE file
        Generate("taxonomy_fields", items=lambda: [()] if model_writes() else [],
                 request=node_request("taxonomy_fields"), parse=taxonomy_row, attempts=config.attempts),
        Generate("taxonomy_subfields", reads=Each("taxonomy_fields"),
                 items=lambda row: [(*row["parents"], name) for name in row["items"]],
                 request=node_request("taxonomy_subfields"), parse=taxonomy_row, attempts=config.attempts),
        Generate("taxonomy_disciplines", reads=Each("taxonomy_subfields"),
                 items=lambda row: [(*row["parents"], name) for name in row["items"]],
                 request=node_request("taxonomy_disciplines"), parse=taxonomy_row, attempts=config.attempts),
        Compute("taxonomy", reads=Whole("taxonomy_disciplines"), persist=False,
                rows=lambda reader, _round: taxonomy_rows(config, ctx, reader)),
        # 2. subject lists, per discipline of the file and level of the curriculum
        Generate("subjects", reads=Each("taxonomy"),
                 items=lambda d: [(d, level, sample) for level in config.levels
                                  for sample in range(config.subject_samples)],
                 request=partial(subjects_request, config, model), parse=subjects_row, attempts=config.attempts),
        # 3. a syllabus per kept subject (keeping needs every sample of a discipline)
        Generate("syllabus", reads=Whole("subjects"), items=lambda reader, _round: subjects_of(config, reader),
                 ident=subject_id, request=partial(syllabus_request, config, model), parse=syllabus_row,
                 attempts=config.attempts),
        # 4-5. questions over the whole pool of syllabi, in rounds; each accepted question's answer
        Generate("questions", reads=Whole("syllabus", "questions", "answers"), rounds=config.max_rounds,
                 items=qa.questions, ident=lambda item: [item[0], item[1]["syllabus_key"]],
                 request=partial(question_request, config, ctx), parse=question_row, gates=QUESTION_GATES),
        Generate("answers", reads=Each("questions"), items=lambda question: [question],
                 request=partial(answer_request, config, answer_model), parse=answer_row, gates=ANSWER_GATES,
                 engine="answer" if answer_dir is not None else "main"),
        # 6. the first num_rows publishable pairs
        Compute("rows", reads=Whole("questions", "answers"), rows=qa.rows),
    ]
    return Pipeline(stages, Publish("rows", text_fields=TEXT_FIELDS), engines=engines)


# ------------------------------------------------------------------------------------------ the plan

PLAN_SESSIONS = 12  # the syllabus length a plan assumes for question prompts (the schema allows up to 30) ...
PLAN_SESSION_TOKENS = 80  # ... or fewer, when the syllabus budget holds fewer sessions of about this size


def plan(config: Config, ctx: Context) -> list[StageEstimate]:
    """What this config implies per stage, from the config and the taxonomy file alone (`sdg run --plan`):
    first-attempt requests, and requests like each stage's (real prompts where the file gives the content,
    stand-ins where a parent's output would: a subject's name, a syllabus, a question)."""
    model = ctx.model_name
    estimates: list[StageEstimate] = []
    if config.taxonomy_file is not None:
        disciplines = load_taxonomy(config.taxonomy_file)
        estimates.append(StageEstimate("taxonomy", len(disciplines),
                                       note=f"{len(disciplines)} disciplines in {config.taxonomy_file.name}"))
    else:
        gen = config.taxonomy_generation
        nodes = {"taxonomy_fields": [()],
                 "taxonomy_subfields": [(f"Field {f}",) for f in range(gen.num_fields)],
                 "taxonomy_disciplines": [(f"Field {f}", f"Sub-field {s}") for f in range(gen.num_fields)
                                          for s in range(gen.subfields_per_field)]}
        for stage, parents in nodes.items():
            estimates.append(StageEstimate(stage, len(parents), [taxonomy_request(config, model, stage, p, 0)
                                                                 for p in parents[:8]], attempts=config.attempts))
        disciplines = [Discipline(f, s, f"Discipline {d}") for f, s in nodes["taxonomy_disciplines"]
                       for d in range(gen.disciplines_per_subfield)]
        estimates.append(StageEstimate("taxonomy", len(disciplines), note="if every list is full"))
    lists = [(_discipline_of(d), level, sample) for d in disciplines for level in config.levels
             for sample in range(config.subject_samples)]
    estimates.append(StageEstimate("subjects", len(lists), [subjects_request(config, model, x, 0) for x in lists[:64]],
                                   attempts=config.attempts))
    most = len(config.levels) * config.subject_samples * config.subjects_per_level
    kept = min(most, config.subjects_per_discipline or most)
    subjects = [{**_discipline_of(d), "subject": f"{d.name}: subject {k}", "level": config.levels[0],
                 "subtopics": [f"{d.name} subtopic {t}" for t in range(4)], "subjects_key": "0" * 32}
                for d in disciplines[:64] for k in range(min(kept, 1))]
    estimates.append(StageEstimate("syllabus", len(disciplines) * kept,
                                   [syllabus_request(config, model, x, 0) for x in subjects],
                                   note=f"{kept} subject{'s' * (kept != 1)} per discipline"
                                        + ("" if config.subjects_per_discipline else " if every list is full "
                                           "and no name repeats"), attempts=config.attempts))
    first_round = math.ceil(config.num_rows * config.overprovision)
    budget = config.syllabus_sampling.max_tokens // PLAN_SESSION_TOKENS
    sessions = max(2, min(PLAN_SESSIONS, config.max_sessions, budget))
    syllabi = [{**x, "syllabus_key": "0" * 32, "sessions": [
        {"title": f"Session {n}: {x['subject']}", "description": f"What students learn in session {n} of "
         f"{x['subject']}, with its methods and examples.", "key_concepts": [f"concept {n}.{c}" for c in range(4)]}
        for n in range(1, sessions + 1)]} for x in subjects]
    questions = [question_request(config, ctx, (q, syllabi[q % len(syllabi)]), 0) for q in range(64)]
    estimates.append(StageEstimate("questions", first_round, questions,
                                   note=f"round 1 (num_rows x overprovision); later rounds ask the shortfall; "
                                        f"prompts assume {sessions}-session syllabi"))
    question = " ".join(["Explain, with a worked example, how this key concept applies to the case below."] * 3)
    answers = [answer_request(config, model, {"question": question, "key": "0", "question_index": 0}, 0)]
    estimates.append(StageEstimate("answers", first_round, answers, note="one per accepted question"))
    estimates.append(StageEstimate("rows", config.num_rows, note="published"))
    return estimates


def answering_model(config: Config, ctx: Context) -> tuple[str, Path | None]:
    """(the answers' model name, the folder of a second model to load, or None: the run's engine answers)."""
    if config.answer_model is None:
        return ctx.model_name, None
    from engine import models
    model_dir = models.prepare(config.answer_model)  # a bad path fails now (ModelError), before any stage
    fingerprint = models.identity(model_dir)["fingerprint"]
    return (ctx.model_name, None) if fingerprint == ctx.model_name else (fingerprint, model_dir)


def _no_engine(model_dir: Path) -> Callable[[], Any]:
    def start() -> Any:
        raise RuntimeError(f"no engine starter for answer_model {model_dir} (Context.start_engine is None)")
    return start


# ------------------------------------------------------------------------------------------ 1. taxonomy

EDIT_HEADER = ("GLAN taxonomy of this run: field -> sub-field -> [disciplines]. Later stages read THIS file.\n"
               "Edit it (after --stop-after taxonomy), then rerun the same command: edited or added disciplines\n"
               "get new subjects, unchanged ones are not asked again, removed ones are no longer used.")


def taxonomy_rows(config: Config, ctx: Context, reader) -> Iterator[dict]:
    """Stage `taxonomy`: OUT/taxonomy.yaml, written once from `taxonomy_file` or the model's lists, then read
    back: one row per discipline of THAT file, keyed by the hash of its path."""
    path = reader.out / TAXONOMY_FILE
    if not path.exists():
        if config.taxonomy_file is not None:
            source = load_taxonomy(config.taxonomy_file)
            header = f"{EDIT_HEADER}\nCopied from {config.taxonomy_file}."
        else:
            source = model_taxonomy(reader)
            header = f"{EDIT_HEADER}\nWritten by the model {ctx.model_name} (seed {ctx.seed})."
        if not source:
            raise TaxonomyError("the model wrote no usable taxonomy (every list was rejected, see the manifest); "
                                "give params.taxonomy_file, or raise taxonomy_generation.sampling.max_tokens")
        _write_once(path, dump_taxonomy(source, header))
    disciplines, _ = read_taxonomy(reader.out)
    if ctx.progress and ctx.stop_after == "taxonomy":
        print(f"taxonomy: {path} ({len(disciplines)} discipline{'s' * (len(disciplines) != 1)}), read by every "
              "later stage; to check or edit it, stop with --stop-after taxonomy, edit, rerun the same command",
              file=sys.stderr)
    for d in disciplines:
        yield {"key": stable_hash(["glan-discipline", d.path]), **_discipline_of(d)}


def read_taxonomy(out: Path) -> tuple[list[Discipline], str]:
    """The run's taxonomy file: its disciplines and the sha256 of its text (row provenance)."""
    path = out / TAXONOMY_FILE
    disciplines = load_taxonomy(path)
    return disciplines, hashlib.sha256(path.read_bytes()).hexdigest()


def model_taxonomy(reader) -> list[Discipline]:
    """The model's accepted lists as disciplines: fields in the model's order, then each field's sub-fields,
    then each sub-field's disciplines."""
    lists: dict[tuple[str, ...], list[str]] = {}
    for stage in ("taxonomy_fields", "taxonomy_subfields", "taxonomy_disciplines"):
        for row in reader.rows(stage):  # one accepted row per node (sorted by key: the first wins if ever two)
            lists.setdefault(tuple(row["parents"]), row["items"])
    return [Discipline(f, s, d) for f in lists.get((), []) for s in lists.get((f,), [])
            for d in lists.get((f, s), [])]


# ------------------------------------------------------------------------------------------ 3. subjects kept

def subjects_of(config: Config, reader) -> list[dict]:
    """The subjects of every discipline of the taxonomy file, in its order: the discipline's lists (level by
    level, `subject_samples` each) merged and deduplicated by (casefolded) name in that order, then the first
    `subjects_per_discipline` (None: all)."""
    disciplines, _ = read_taxonomy(reader.out)
    samples: dict[tuple, dict] = {}
    for row in reader.rows("subjects"):
        samples.setdefault((row["field"], row["subfield"], row["discipline"], row["level"], row["sample"]), row)
    cap = config.subjects_per_discipline
    out: list[dict] = []
    for d in disciplines:
        merged: dict[str, dict] = {}
        for level in config.levels:
            for sample in range(config.subject_samples):
                row = samples.get((d.field, d.subfield, d.name, level, sample))
                for s in (row or {}).get("subjects") or []:
                    if s["name"].casefold() not in merged and (cap is None or len(merged) < cap):
                        merged[s["name"].casefold()] = {**_discipline_of(d), "subject": s["name"], "level": level,
                                                        "subtopics": s["subtopics"], "subjects_key": row["key"]}
        out.extend(merged.values())
    return out


def subject_id(s: dict) -> str:
    """A subject's identity (its syllabus's seed and owner): field / sub-field / discipline / subject."""
    return f"{s['field']} / {s['subfield']} / {s['discipline']} / {s['subject']}"


def syllabus_pool(config: Config, reader) -> list[dict]:
    """The accepted syllabi of the kept subjects, round-robin over disciplines (consecutive questions come from
    different disciplines)."""
    syllabi: dict[tuple[str, str], dict] = {}
    for row in reader.rows("syllabus"):
        syllabi.setdefault((row["subjects_key"], row["subject"]), row)
    found = [{**s, "sessions": r["sessions"], "syllabus_key": r["key"]} for s in subjects_of(config, reader)
             if (r := syllabi.get((s["subjects_key"], s["subject"]))) is not None]
    return _interleave(found, key=lambda s: (s["field"], s["subfield"], s["discipline"]))


# ------------------------------------------------------------------------------------------ 4-6. rounds, rows

class QuestionRounds:
    """Questions and answers in rounds until `num_rows` publishable pairs exist.

    Round 1 asks questions 0 .. ceil(num_rows x overprovision)-1; round r the next (rows still missing after
    rounds 1..r-1) x overprovision, none once enough pairs survive the publishing filters (Reader.survivors).
    Every round is computed from what the rounds before it committed, so any launch (a resume, any replica)
    asks the same questions. Question q uses syllabus pool[q % len(pool)]."""

    def __init__(self, config: Config, run_id: str = "") -> None:
        self.config, self.run_id = config, run_id
        self._kept: dict[tuple, list[dict]] = {}  # survivors below a round's end (those rows never change)

    def questions(self, reader, round_: int) -> list[tuple[int, dict]]:
        """Stage `questions`, round `round_`: (question number, syllabus) items."""
        pool, asked, _ = self._plan(reader, round_)
        return [(q, pool[q % len(pool)]) for q in asked]

    def rows(self, reader, _round: int) -> list[dict]:
        """Stage `rows`: the first `num_rows` publishable pairs, in question order."""
        _, _, kept = self._plan(reader, self.config.max_rounds + 1)
        if len(kept) < self.config.num_rows:
            print(f"warning: GLAN reached {len(kept)} of {self.config.num_rows} rows in {self.config.max_rounds} "
                  "rounds; raise max_rounds or overprovision, or rerun with a larger model", file=sys.stderr)
        return kept[: self.config.num_rows]

    def _plan(self, reader, round_: int) -> tuple[list[dict], range, list[dict]]:
        """(the syllabus pool, round `round_`'s question numbers, the publishable pairs of the rounds before)."""
        config = self.config
        pool = syllabus_pool(config, reader)
        if not pool:
            raise ConfigError("no syllabus was accepted, so no question can be drawn (see the rejects of stages "
                              "subjects and syllabus in the manifest); raise `attempts` or the max_tokens of "
                              "subject_sampling / syllabus_sampling")
        _, taxonomy_sha256 = read_taxonomy(reader.out)
        questions: dict[tuple[int, str], dict] = {}
        for row in reader.rows("questions"):
            questions.setdefault((row["question_index"], row["syllabus_key"]), row)
        answers: dict[str, dict] = {}
        for row in reader.rows("answers"):
            answers.setdefault(row["question_key"], row)

        def pair(q: int) -> dict | None:
            question = questions.get((q, pool[q % len(pool)]["syllabus_key"]))
            answer = answers.get(question["key"]) if question is not None else None
            return final_row(question, answer, taxonomy_sha256, self.run_id) if answer is not None else None

        start = stop = 0
        kept: list[dict] = []
        for _ in range(round_):
            memo = (stop, pool[0]["syllabus_key"], len(pool), taxonomy_sha256)
            if memo not in self._kept:
                pairs = [p for p in map(pair, range(stop)) if p is not None]
                self._kept[memo] = reader.survivors(pairs, TEXT_FIELDS)
            kept = self._kept[memo]
            if len(kept) >= config.num_rows:
                return pool, range(stop, stop), kept
            start, stop = stop, stop + max(1, math.ceil((config.num_rows - len(kept)) * config.overprovision))
        return pool, range(start, stop), kept


def final_row(q: dict, a: dict, taxonomy_sha256: str, run_id: str = "") -> dict:
    """A published row: the pair, what it was drawn from, and where every part came from."""
    return {
        "key": stable_hash(["glan-row", a["key"]]),
        "question": q["question"], "answer": a["answer"],
        "field": q["field"], "subfield": q["subfield"], "discipline": q["discipline"],
        "subject": q["subject"], "level": q["level"], "subtopics": q["subtopics"],
        "strategy": q["strategy"], "sessions": q["sessions"], "session_titles": q["session_titles"],
        "key_concepts": q["key_concepts"],
        "provenance": {
            "run": run_id, "stage": "rows", "question_index": q["question_index"],
            "question_key": q["key"], "answer_key": a["key"], "syllabus_key": q["syllabus_key"],
            "subjects_key": q["subjects_key"], "question_model": q["model"], "answer_model": a["model"],
            "question_seed": q["seed"], "answer_seed": a["seed"], "question_template": "glan/question.jinja",
            "answer_template": "glan/answer.jinja", "taxonomy_sha256": taxonomy_sha256,
        },
    }


# ================================================================================================ parsers

def _base_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """The request's meta, its seed and the raw output; the reject reason of an invalid output."""
    row = {**request.meta, "key": result.key, "seed": request.seed, "output": result.text,
           "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "output_tokens": result.output_tokens}
    return row, (None if result.valid else result.reason or "invalid")


def taxonomy_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """A taxonomy node's children: distinct usable names, at most the number asked for."""
    row, reason = _base_row(request, result)
    items = _unique(result.parsed["items"])[: request.meta["n"]] if reason is None else []
    return {**row, "items": items}, reason


def subjects_row(request: Request, result: Result) -> tuple[dict, str | None]:
    row, reason = _base_row(request, result)
    if reason is not None:
        return {**row, "subjects": None}, reason
    subjects = clean_subjects(result.parsed["subjects"])
    return {**row, "subjects": subjects}, (None if subjects else "no_usable_subject")


def syllabus_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """Key concepts are deduplicated across the whole syllabus (first occurrence kept), so a sampled concept set
    never names one concept twice; a syllabus left with fewer than two sessions that have key concepts is
    rejected ('repeated_concepts': a small model copies the same concepts into every session), since no
    two-session draw could come from it."""
    row, reason = _base_row(request, result)
    if reason is not None:
        return {**row, "sessions": None}, reason
    sessions = clean_sessions(result.parsed["sessions"])
    if sum(1 for s in sessions if s["key_concepts"]) < 2:  # no strategy-B draw would exist
        return {**row, "sessions": sessions}, "repeated_concepts"
    return {**row, "sessions": sessions}, None


QUESTION_GATES = ("too_short", "no_content_words", "echoes_prompt", "not_a_question")
ANSWER_GATES = ("declined", "repeats_question")


def question_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """A question passes the gates QUESTION_GATES (engine.quality.gates.question_problem): at least 20
    characters and 3 content words beyond the course's names (field ... level), does not copy its prompt, and
    reads as a question or a task ("A: 3: Physics: Science & Engineering" is `no_content_words`)."""
    row, reason = _base_row(request, result)
    question = " ".join(result.parsed["question"].split()) if reason is None else None
    if reason is None and len(question) < 20:
        reason = "too_short"
    if reason is None:
        labels = [str(request.meta.get(k) or "") for k in ("field", "subfield", "discipline", "subject", "level")]
        reason = gates.question_problem(question, request.messages[-1]["content"], labels)
    return {**row, "question": question}, reason


def answer_row(request: Request, result: Result) -> tuple[dict, str | None]:
    row = {**request.meta, "key": result.key, "answer": result.text.strip(), "seed": request.seed,
           "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "output_tokens": result.output_tokens}
    if result.finish_reason == "length":
        return row, "truncated"
    if not result.valid:
        return row, result.reason or "invalid"
    if not row["answer"]:
        return row, "empty"
    if declines(row["answer"]):
        return row, "declined"
    return row, gates.answer_repeats(row["answer"], request.messages[-1]["content"])  # the question, as asked


# An answer that opens by declining instead of answering ("I don't know", "I'm sorry, but I can't", "As an AI
# language model ..."). Only the opening is read: a worked answer may quote such words later.
_DECLINE = re.compile(
    r"""^\W*(?:
        i\s*(?:'m|am)\s+(?:sorry|afraid|not\s+(?:sure|able|certain)|unable)
      | i\s+(?:don'?t|do\s+not|cannot|can'?t|can\s+not)\s+
            (?:know|answer|help|provide|say|determine|have\s+(?:enough|the|any))
      | (?:unfortunately|sorry)\b
      | as\s+an?\s+(?:ai|language\s+model|assistant)\b
      | (?:there\s+is\s+)?not\s+enough\s+information
    )""", re.IGNORECASE | re.VERBOSE)


def declines(answer: str) -> bool:
    """Whether an answer declines rather than answers.

    >>> declines("I don't know the answer to that."), declines("As an AI, I cannot ..."), declines("Sorry, no.")
    (True, True, True)
    >>> declines("The net force is 12 N. (I don't know of a simpler way.)"), declines("Iron is a metal.")
    (False, False)
    """
    return _DECLINE.match(answer[:300]) is not None


def clean_subjects(subjects: list[dict]) -> list[dict]:
    """Whitespace-normalized subjects with usable names and subtopics; a subject with neither is dropped.

    >>> clean_subjects([{"name": " Optics ", "subtopics": ["Lenses", "..."]},
    ...                 {"name": "...", "subtopics": ["Waves"]}])
    [{'name': 'Optics', 'subtopics': ['Lenses']}]
    """
    out = []
    for s in subjects:
        name, subtopics = " ".join(s["name"].split()), _unique(s["subtopics"])
        if _is_name(name) and subtopics:
            out.append({"name": name, "subtopics": subtopics})
    return out


def clean_sessions(sessions: list[dict]) -> list[dict]:
    """Whitespace-normalized sessions; a key concept already named (casefolded) in this or an earlier session
    is dropped, so a session may end with none (it is then never sampled, but still taught).

    >>> clean_sessions([{"title": "A", "description": "d", "key_concepts": ["Force", "Mass "]},
    ...                 {"title": "B", "description": "e", "key_concepts": ["force", "...", "Work"]}])[1]["key_concepts"]
    ['Work']
    """
    seen: set[str] = set()
    out = []
    for s in sessions:
        concepts = []
        for c in s["key_concepts"]:
            c = " ".join(c.split())
            if _is_name(c) and c.casefold() not in seen:
                seen.add(c.casefold())
                concepts.append(c)
        out.append({"title": " ".join(s["title"].split()), "description": " ".join(s["description"].split()),
                    "key_concepts": concepts})
    return out


# ================================================================================================ the taxonomy file

class TaxonomyError(ConfigError):
    """A taxonomy file that cannot be used; the message names the file and the place in it."""


@dataclass(frozen=True)
class Discipline:
    field: str
    subfield: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.field} / {self.subfield} / {self.name}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TaxonomyError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_taxonomy(data: object, where: str) -> list[Discipline]:
    """Disciplines of a loaded taxonomy, in file order. The shape is
    {field: {sub-field: [discipline, ...]}}, every name a non-empty string, every list non-empty:

    >>> parse_taxonomy({"Sciences": {"Physics": ["Optics"]}}, "x")
    [Discipline(field='Sciences', subfield='Physics', name='Optics')]
    """
    def name(v: object, what: str) -> str:
        if not isinstance(v, str) or not v.strip() or len(v) > 200:
            raise TaxonomyError(f"{where}: {what} must be a non-empty name of at most 200 characters, got {v!r}")
        return " ".join(v.split())

    if not isinstance(data, dict) or not data:
        raise TaxonomyError(f"{where}: a taxonomy is a mapping field -> sub-field -> list of disciplines, "
                            f"got {type(data).__name__}")
    out: list[Discipline] = []
    seen: set[tuple[str, str, str]] = set()
    for f, subs in data.items():
        f = name(f, "a field")
        if not isinstance(subs, dict) or not subs:
            raise TaxonomyError(f"{where}: field {f!r} must map sub-fields to lists of disciplines, got {subs!r}")
        for s, ds in subs.items():
            s = name(s, f"a sub-field of {f!r}")
            if not isinstance(ds, list) or not ds:
                raise TaxonomyError(f"{where}: {f} / {s}: disciplines must be a non-empty list, got {ds!r}")
            for d in ds:
                d = Discipline(f, s, name(d, f"a discipline of {f} / {s}"))
                ident = (d.field.casefold(), d.subfield.casefold(), d.name.casefold())
                if ident in seen:
                    raise TaxonomyError(f"{where}: discipline {d.path!r} is listed twice")
                seen.add(ident)
                out.append(d)
    return out


def load_taxonomy(path: Path) -> list[Discipline]:
    """The disciplines of taxonomy file `path`; TaxonomyError (one line) when it is missing or malformed."""
    if not path.is_file():
        raise TaxonomyError(f"taxonomy file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except TaxonomyError as e:
        raise TaxonomyError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise TaxonomyError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    return parse_taxonomy(data, str(path))


def dump_taxonomy(disciplines: Sequence[Discipline], header: str) -> str:
    """The YAML text of `disciplines` (the shape parse_taxonomy reads), after `header` comment lines."""
    tree: dict = {}
    for d in disciplines:
        tree.setdefault(d.field, {}).setdefault(d.subfield, []).append(d.name)
    body = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def _write_once(path: Path, text: str) -> None:
    """Write `path` atomically unless it exists (then it holds a person's edits, or a replica's identical copy)."""
    if path.exists():
        return
    tmp = path.with_name(f".tmp-taxonomy-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ======================================================================================== concept sampling (questions)

# A draw: (session indices, concepts as (session index, concept index) pairs), all 0-based.
Draw = tuple[tuple[int, ...], tuple[tuple[int, int], ...]]


def sample_a(sizes: Sequence[int], rng: random.Random, k_range: tuple[int, int] = A_SIZES) -> Draw:
    """Strategy A, as the paper: one class session (uniform over the sessions that have key concepts), then the
    number of key concepts (uniform over k_range, capped at the session's count), then which ones (uniform).

    >>> sample_a([0, 3], random.Random(0))[0]
    (1,)
    """
    taught = [i for i, n in enumerate(sizes) if n > 0]
    if not taught:
        raise ValueError(f"no strategy-A draw: no session has a key concept (sizes {list(sizes)})")
    i = rng.choice(taught)
    k = rng.randint(k_range[0], min(k_range[1], sizes[i]))
    return (i,), tuple((i, c) for c in sorted(rng.sample(range(sizes[i]), k)))


def sample_b(sizes: Sequence[int], rng: random.Random, k_range: tuple[int, int] = B_SIZES) -> Draw:
    """Strategy B, as the paper: two class sessions (uniform over pairs of sessions that have key concepts), then
    the number of key concepts (uniform over k_range, capped at the pair's count), then which ones: uniform over
    the sets of that size that take at least one concept from each session (a question joins the two)."""
    taught = [i for i, n in enumerate(sizes) if n > 0]
    if len(taught) < 2:
        raise ValueError(f"no strategy-B draw: fewer than two sessions have key concepts (sizes {list(sizes)})")
    i, j = sorted(rng.sample(taught, 2))
    union = [(i, c) for c in range(sizes[i])] + [(j, c) for c in range(sizes[j])]
    k = rng.randint(k_range[0], min(k_range[1], len(union)))
    while True:  # rejection keeps the draw uniform over the valid sets; most draws are valid at once
        picked = tuple(sorted(rng.sample(union, k)))
        if {s for s, _ in picked} == {i, j}:
            return (i, j), picked


def sample_concepts(sizes: Sequence[int], rng: random.Random, two_session_ratio: float) -> tuple[str, Draw]:
    """(strategy, draw): B with probability `two_session_ratio` when two sessions have key concepts, else A."""
    if rng.random() < two_session_ratio and sum(1 for n in sizes if n > 0) >= 2:
        return MULTI, sample_b(sizes, rng)
    return SINGLE, sample_a(sizes, rng)


# ================================================================================================ helpers

def _is_name(text: str) -> bool:
    """A usable name has at least two letters ("..." and "1." copied from a prompt's format are not names)."""
    return sum(c.isalpha() for c in text) >= 2


def _unique(names: Iterable[str]) -> list[str]:
    """Whitespace-normalized names, first occurrence of each (casefolded) name kept, non-names dropped.

    >>> _unique(["Optics", " optics ", "...", "Wave  theory"])
    ['Optics', 'Wave theory']
    """
    seen: set[str] = set()
    out = []
    for n in names:
        n = " ".join(n.split())
        if _is_name(n) and n.casefold() not in seen:
            seen.add(n.casefold())
            out.append(n)
    return out


def _interleave(items: list[dict], key: Callable[[dict], object]) -> list[dict]:
    """Round-robin over groups of equal `key` (in first-appearance order), so consecutive questions come
    from different disciplines: [a1, a2, b1] -> [a1, b1, a2]."""
    groups: dict[object, list[dict]] = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    out = []
    for depth in range(max((len(g) for g in groups.values()), default=0)):
        out.extend(g[depth] for g in groups.values() if depth < len(g))
    return out


def _discipline_of(d: Discipline | dict) -> dict:
    """A discipline's names as row fields (from a Discipline or a row holding them)."""
    if isinstance(d, Discipline):
        return {"field": d.field, "subfield": d.subfield, "discipline": d.name}
    return {k: d[k] for k in ("field", "subfield", "discipline")}
