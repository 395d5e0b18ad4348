"""TDG: template-based data generation (TemplateMath / TemplateGSM, arXiv 2411.18104), verified and fast.

Read top to bottom, like the paper:

  1. Prompts.  For each topic (skill) and each example problem, ask the model for a meta-template, constrained
     by grammars/tdg/meta_template.schema.json, with seed templates as few-shot examples (prompts/tdg/*.jinja).
  2. Stages "seed_templates" and "templates".  The shipped seed library (source="seed", so instantiation works
     even when a small model's templates are all rejected) and the model's outputs are parsed and verified
     (verify.py: whitelist parse, exact sympy answers of K instances, text/answer agreement, sandboxed
     solution_code). Accepted templates become rows, rejected ones rejects with their reason.
  3. Stage "problems".  Each accepted template, as soon as it is committed, is compiled once and instantiated
     `problems_per_template` times, deterministically by (seed, template_id, problem_id), no model; every row
     is checked twice (its exact answer, and its own solution_code run in the sandbox).

The template language (template.py, expr.py, compile.py), the sandbox and the instantiator live beside this
module: they are this method's, not the engine's.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import ConfigError
from engine.constraints import Constraint
from engine.jsonl import read_objects
from engine.methods import Context
from engine.methods.tdg.instantiate import TemplateSpec, instantiate
from engine.methods.tdg.sandbox import run_solutions, same_answer
from engine.methods.tdg.template import DATA_DIR, SCHEMA_PATH, word_lists
from engine.methods.tdg.verify import verify_template, verify_templates
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish, Rows, Whole
from engine.prompting import render
from engine.request import Request, Result, Sampling, stable_hash


class Config(BaseModel):
    """The `params:` of a TDG run config."""

    model_config = ConfigDict(extra="forbid")

    topics: list[str] = Field(default_factory=lambda: ["percentages", "rates and speed", "fractions"])
    """Skills / topics to write templates for; `templates_per_topic` requests each."""
    examples_file: Path | None = None
    """A GSM8K-style jsonl ('question' per line) whose problems seed template writing; relative paths are
    resolved against the config file's folder. None: topics only."""
    examples_limit: int | None = Field(None, ge=1)
    """Use at most this many example problems (the first ones)."""
    templates_per_topic: int = Field(2, ge=0, le=1000)
    """Template-writing requests per topic and per example problem (distinct seeds)."""
    problems_per_template: int = Field(1000, ge=1, le=10_000_000)
    """Problems published from each accepted template (the paper's 1,000): instances with no valid draw or
    whose code disagrees are replaced by further problem ids, so only exact duplicates (removed and counted
    when publishing) can leave a template short."""
    templates_file: Path | None = None
    """A JSONL of templates to verify and instantiate like the model's: ours (the meta-template JSON) or
    TemplateMath's legacy Python templates (a `template` field defining generate_problem_and_solution_code(),
    run only in the sandbox). Relative paths are resolved against the config file's folder."""
    verify_instances: int = Field(8, ge=1, le=1000)
    """K: instances each template is verified on (exact answer, type, sandboxed solution_code)."""
    seed: int = 0
    """Seeds the instantiation of (template_id, problem_id) and the choice of few-shot examples (request seeds
    come from the run's seed, as for every method)."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=768, temperature=0.8))
    """Sampling of template writing; a template cut off by max_tokens is rejected as 'truncated'."""
    writing: Literal["two_phase", "one_request"] = "two_phase"
    """How the model writes a template: two constrained requests (variables, then text whose schema names
    them: writing.py), or the whole template in one request under grammars/tdg/meta_template.schema.json."""
    attempts: int = Field(3, ge=1, le=10)
    """With two_phase: tries (distinct seeds) of a variables or text request whose output is unusable
    (truncated, a name declared twice); a text that does not verify is not retried: it goes to the revision."""
    revise: bool = True
    """With two_phase: the critique-and-revise round (the model judges a draft shown with one of its problems
    and the computed answer, or with the verifier's reason, and writes it again; verified again)."""
    use_seed_templates: bool = True
    """Also instantiate the shipped seed library (source='seed')."""
    few_shot: int = Field(2, ge=0, le=5)
    """Seed templates shown as examples in each prompt."""
    sandbox: bool = True
    """Run each verified instance's solution_code in the sandbox (the second check)."""
    verify_rows: bool = True
    """Check every published row twice: its answer is computed exactly by the compiled template, and its own
    solution_code is run in the sandbox (batched) and must give the same answer; a row that disagrees is a
    reject ('row_code_mismatch')."""

    @field_validator("templates_file")
    @classmethod
    def _templates_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_templates(v)  # every bad line named now, before anything runs
        return v

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or len(t) > 200]
        if bad:
            raise ValueError(f"topics must be non-empty strings of at most 200 characters, got {bad[:3]}")
        return v


# Hashed into the run's identity by content, not path (engine.config.file_identity).
FILE_PARAMS = ("examples_file", "templates_file")

# TDG's instances of one template share most of their words: near-dedup would cut templates below their count.
# Exact duplicates are still removed (and counted in the manifest).
QUALITY_DEFAULTS = {"near_dedup": False}


def resolve_paths(params: dict, base: Path) -> dict:
    """examples_file and templates_file relative to the config file's folder."""
    p = dict(params)
    for name in FILE_PARAMS:
        if p.get(name) and not Path(p[name]).is_absolute():
            p[name] = str(base / p[name])
    return p


def _seed_raws() -> list[dict]:
    return [json.loads(l) for l in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines() if l.strip()]


def _examples(path: Path | None, limit: int | None) -> list[dict]:
    if path is None:
        return []
    if not path.is_file():
        raise FileNotFoundError(f"examples_file not found: {path}")
    out = []
    for i, d in read_objects(path, ValueError):
        if not isinstance(d.get("question"), str):
            raise ValueError(f"{path}:{i}: each example needs a 'question' string")
        out.append({"id": str(d.get("id", f"line-{i}")), "question": d["question"]})
    return out[:limit] if limit else out


# -- 1. template-writing requests -------------------------------------------------------------------------------
def template_tasks(config: Config) -> list[dict]:
    """One task per (topic or example problem, repeat)."""
    tasks = [{"topic": t, "problem": None, "example_id": None} for t in config.topics]
    tasks += [{"topic": None, "problem": e["question"], "example_id": e["id"]}
              for e in _examples(config.examples_file, config.examples_limit)]
    return [{**task, "task": i, "repeat": rep} for i, task in enumerate(tasks)
            for rep in range(config.templates_per_topic)]


def template_request(config: Config, model: str):
    """task -> the request writing one template: system rules + few-shot seeds + the task."""
    seeds = _seed_raws()
    constraint = Constraint.json_schema(SCHEMA_PATH)
    system = render("tdg/system.jinja", word_lists=sorted(word_lists()))

    def request(task: dict, seed: int) -> Request:
        rng = random.Random(stable_hash(["tdg-shots", config.seed, task["task"], task["repeat"]]))
        shots = rng.sample(seeds, min(config.few_shot, len(seeds)))
        user = render("tdg/write_template.jinja", topic=task["topic"], problem=task["problem"],
                      examples=[{"skill": s["skill"], "json": json.dumps(s, ensure_ascii=False)} for s in shots])
        return Request.build(stage="templates", model=model, constraint=constraint, sampling=config.sampling,
                             messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                             seed=seed, meta={"topic": task["topic"], "example_id": task["example_id"],
                                              "repeat": task["repeat"]})
    return request


# -- 1'. two-phase writing and the revision round (writing.py) ------------------------------------------------
def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def variables_request(config: Config, model: str):
    """task -> the first request: the skill and variables of one template."""
    from engine.methods.tdg import writing
    constraint = Constraint.json_schema(writing.variables_schema())
    system = render("tdg/two_phase_system.jinja")

    def request(task: dict, seed: int) -> Request:
        examples = writing.two_phase_examples()  # when a request is made: a run with no model stage never reads them
        rng = random.Random(stable_hash(["tdg-shots", config.seed, task["task"], task["repeat"]]))
        shots = rng.sample(examples, min(max(config.few_shot, 1), len(examples)))
        user = render("tdg/write_variables.jinja", topic=task["topic"], problem=task["problem"],
                      examples=[{"skill": x["skill"], "json": writing.shown({"skill": x["skill"],
                                                                              "variables": x["variables"]})}
                                for x in shots])
        return Request.build(stage="template_variables", model=model, constraint=constraint, seed=seed,
                             sampling=config.sampling, messages=_chat(system, user),
                             meta={"topic": task["topic"], "example_id": task["example_id"],
                                   "problem": task["problem"], "repeat": task["repeat"], "task": task["task"]})
    return request


def variables_row(request: Request, result: Result) -> tuple[dict, str | None]:
    from engine.methods.tdg.writing import check_variables
    base = {**request.meta, "key": result.key, "output": result.text, "output_tokens": result.output_tokens}
    if not result.valid:
        return {**base, "details": result.reason}, (result.reason or "invalid").split(":")[0]
    variables, reason = check_variables(result.parsed)
    return {**base, "skill": result.parsed["skill"], "variables": variables}, reason


def draft_request(config: Config, model: str):
    """variables row -> the second request: the text, under a schema that names those variables."""
    from engine.methods.tdg import writing
    system = render("tdg/two_phase_system.jinja")

    def request(row: dict, seed: int) -> Request:
        examples = writing.two_phase_examples()
        rng = random.Random(stable_hash(["tdg-text-shots", config.seed, row["key"]]))
        shots = rng.sample(examples, min(max(config.few_shot, 1), len(examples)))
        user = render("tdg/write_text.jinja", skill=row["skill"], problem=row["problem"],
                      variables=writing.describe(row["variables"]),
                      examples=[{"variables": writing.describe(writing.as_ranges(x["variables"])),
                                 "json": writing.shown(x["text"])} for x in shots])
        return Request.build(stage="drafts", model=model, seed=seed, sampling=config.sampling,
                             constraint=Constraint.json_schema(writing.text_schema(row["variables"])),
                             messages=_chat(system, user),
                             meta={k: row[k] for k in ("topic", "example_id", "repeat", "skill", "variables")}
                             | {"variables_key": row["key"]})
    return request


def _verified(config: Config, meta: dict, text: dict) -> dict:
    """The template of `text` verified: its row fields (verify.Verdict.to_row) and, when accepted, one instance
    (problem and answer) for the revision prompt."""
    from engine.methods.tdg.instantiate import make_row
    from engine.methods.tdg.writing import assemble
    template = assemble(meta["skill"], meta["variables"], text)
    v = verify_template(template, k=config.verify_instances, seed=config.seed, sandbox=config.sandbox)
    # the skill is the variables request's: a rejected template's verdict row has none, and a revision assembled
    # from it would be rejected again for a null skill (measured: the only 'schema' rejects of two-phase writing)
    out = {**v.to_row(), "text": text, "skill": meta["skill"]}
    if v.accepted and v.compiled is not None:
        instance = make_row(v.compiled, config.seed, 0)
        out["instance"] = {"problem": instance["problem"], "result": instance["result"]} if instance else None
    return out


def draft_row(config: Config):
    """A draft is kept whatever its verdict (the revision round reads it); only an unusable output (truncated,
    not the schema) is a reject."""
    def parse(request: Request, result: Result) -> tuple[dict, str | None]:
        base = {**request.meta, "key": result.key, "output": result.text, "output_tokens": result.output_tokens}
        if not result.valid:
            return {**base, "details": result.reason}, (result.reason or "invalid").split(":")[0]
        return {**base, **_verified(config, request.meta, result.parsed), "key": result.key}, None
    return parse


def revision_request(config: Config, model: str):
    """draft row -> the critique-and-revise request."""
    from engine.methods.tdg import writing
    system = render("tdg/two_phase_system.jinja")

    def request(draft: dict, seed: int) -> Request:
        user = render("tdg/revise.jinja", skill=draft["skill"], variables=writing.describe(draft["variables"]),
                      draft=writing.shown(draft["text"]), instance=draft.get("instance"),
                      reason=draft["reason"], details=draft["details"])
        return Request.build(stage="revisions", model=model, seed=seed, sampling=config.sampling,
                             constraint=Constraint.json_schema(writing.revision_schema(draft["variables"])),
                             messages=_chat(system, user),
                             meta={k: draft[k] for k in ("topic", "example_id", "repeat", "skill", "variables")}
                             | {"draft_key": draft["key"], "draft": _template_fields(draft)})
    return request


def _template_fields(row: dict) -> dict:
    """What a final template row needs of a draft or revision (verify.Verdict.to_row's fields)."""
    return {k: v for k, v in row.items() if k in ("template_id", "template", "accepted", "reason", "details",
                                                  "source", "skill") or k.startswith("stat_")}


def revision_row(config: Config):
    """A revision is kept whatever its verdict; an unusable output is recorded as a rejected revision (the
    draft may still be the final template)."""
    def parse(request: Request, result: Result) -> tuple[dict, str | None]:
        base = {**request.meta, "key": result.key, "output": result.text, "output_tokens": result.output_tokens}
        if not result.valid:
            reason = (result.reason or "invalid").split(":")[0]
            return {**base, "accepted": False, "reason": reason, "details": result.reason, "verdict": None}, None
        text = {k: v for k, v in result.parsed.items() if k != "verdict"}
        return {**base, **_verified(config, request.meta, text), "verdict": result.parsed["verdict"],
                "key": result.key}, None
    return parse


def final_template_rows(config: Config):
    """(reader, round) -> per draft, the template row or a reject with the final reason: its revision when that
    verifies, else the draft when it did. Read once every revision is done (a revision the quality gates
    rejected, or none, leaves the draft)."""
    def rows(reader, _round: int):
        revisions = {r["draft_key"]: r for r in reader.rows("revisions")} if config.revise else {}
        for draft in reader.rows("drafts"):
            revision = revisions.get(draft["key"])
            chosen = (revision if revision is not None and revision.get("accepted")
                      else draft if draft.get("accepted") else None)
            final = chosen or revision or draft
            meta = {"topic": draft.get("topic"), "example_id": draft.get("example_id"), "writing": "two_phase",
                    "from": None if chosen is None else "revision" if chosen is revision else "draft"}
            row = {**_template_fields(final), **meta, "key": stable_hash(["tdg-template", draft["key"]])}
            yield row, (None if chosen is not None else final.get("reason") or "rejected")
    return rows


def writing_figures(config: Config):
    """reader -> acceptance of the model's templates before and after the revision round, and by reason."""
    def figures(reader) -> dict:
        drafts, revisions = reader.rows("drafts"), reader.rows("revisions") if config.revise else []
        asked = len(template_tasks(config))
        final = reader.rows("templates")
        out = {"templates_asked": asked,
               "drafts": len(drafts), "drafts_accepted": sum(bool(d.get("accepted")) for d in drafts),
               "revisions": len(revisions), "revisions_accepted": sum(bool(r.get("accepted")) for r in revisions),
               "judged_wrong": sum(r.get("verdict") == "wrong" for r in revisions),
               "templates_accepted": len(final),
               "acceptance_before_revision": round(sum(bool(d.get("accepted")) for d in drafts) / asked, 4)
               if asked else 0.0,
               "acceptance_after_revision": round(len(final) / asked, 4) if asked else 0.0}
        for d in drafts:
            if not d.get("accepted"):
                out[f"draft_reason:{d.get('reason')}"] = out.get(f"draft_reason:{d.get('reason')}", 0) + 1
        return out
    return figures


# -- 2. parse -> verify -> template row or reject ---------------------------------------------------------------
def template_row(config: Config):
    """(request, result) -> the verified template row, or the reject with its first failed check."""
    def parse(request: Request, result: Result) -> tuple[dict, str | None]:
        base = {**request.meta, "key": result.key, "output": result.text, "output_tokens": result.output_tokens}
        if not result.valid:
            return {**base, "details": result.reason}, (result.reason or "invalid").split(":")[0]
        v = verify_template(result.parsed, k=config.verify_instances, seed=config.seed, sandbox=config.sandbox)
        return {**base, **v.to_row(), "key": result.key}, (None if v.accepted else v.reason)
    return parse


def seed_template_rows(config: Config):
    """The seed library, verified (one sandbox batch) -> (row, reason) pairs; a seed that fails is our bug,
    kept visible as a reject rather than dropped."""
    raws = _seed_raws()
    verdicts = verify_templates(raws, k=config.verify_instances, seed=config.seed, sandbox=config.sandbox,
                                source="seed")
    for raw, v in zip(raws, verdicts):
        row = {**v.to_row(), "key": stable_hash(["tdg-seed-template", raw]), "topic": None, "example_id": None}
        yield row, (None if v.accepted else v.reason)


# -- 3. instantiate each accepted template ----------------------------------------------------------------------
ROW_BATCH = 10_000  # rows per sandbox child: amortizes its start-up (~10 ms CPU) over many solutions
# sandbox children at work at once while this process instantiates on a core of its own (one child per core
# made 3 busy processes on a 2-core machine)
SANDBOX_INFLIGHT = max(1, (os.cpu_count() or 1) - 1)
PHASE_SECONDS: dict[str, float] = {}  # this process's seconds instantiating and waiting on the sandbox (for bench/)
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads that each wait on one sandbox child (the children do the work, on their own cores)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(SANDBOX_INFLIGHT, thread_name_prefix="tdg-sandbox")
    return _POOL


def _add_time(phase: str, t: float) -> float:
    now = time.perf_counter()
    PHASE_SECONDS[phase] = PHASE_SECONDS.get(phase, 0.0) + now - t
    return now


def template_spec(row: dict) -> TemplateSpec:
    """A committed template row as the instantiator takes it."""
    return TemplateSpec(json.loads(row["template"]), row.get("source") or "model",
                        {"verified": True, "sandbox": bool(row.get("stat_sandbox"))})


def problem_rows(config: Config):
    """template row -> its `problems_per_template` problem rows, each checked twice: the exact answer of the
    compiled template, and its own solution_code run in the sandbox (batched), which must agree; a row that
    disagrees is a reject ('row_code_mismatch'). A draw whose variable values an earlier instance of its
    template already had is not a row: the next problem id is drawn instead (so a template reaches its count
    with distinct instances, and no sandbox run or commit is spent on a row that exact dedup would remove);
    each row counts, as `redrawn_before`, the repeated draws skipped just before it. Problem ids past the count
    replace repeats, instances with no valid draw and rejects; at most twice the count plus 100 ids are tried,
    and a template whose last draws were repeats when they ran out gets one reject ('repeats_exhausted') that
    counts them. Each row says where its template's idea came from (`origin`). Up to SANDBOX_INFLIGHT batches
    are in the sandbox at once while the next is instantiated; rows come out in problem id order all the same."""
    def rows(template: dict):
        if template.get("format") == "legacy":
            yield from legacy_problem_rows(config, template)
            return
        want, accepted, next_id = config.problems_per_template, 0, 0
        limit = 2 * want + 100
        draws = _Draws(origin_of(template))
        spec = template_spec(template)
        while accepted < want and next_id < limit:
            count = min(want - accepted, limit - next_id)  # ids next_id .. next_id + count - 1
            inflight: deque = deque()
            for batch in _instance_batches(config, spec, draws, next_id, count):
                inflight.append((batch, _check_async(config, batch)))
                while len(inflight) > SANDBOX_INFLIGHT:
                    checked = _checked(*inflight.popleft())
                    accepted += checked.reasons.count(None)
                    yield checked
            while inflight:
                checked = _checked(*inflight.popleft())
                accepted += checked.reasons.count(None)
                yield checked
            next_id += count
        if draws.redrawn:
            key = stable_hash(["tdg-repeats", config.seed, template["template_id"]])
            yield ({"key": key, "template_id": template["template_id"], "problem_id": next_id - 1,
                    "redrawn_before": draws.redrawn}, "repeats_exhausted")
    return rows


class _Draws:
    """One template's draws so far: the variable values seen, and the repeats skipped since the last row."""

    def __init__(self, origin: str) -> None:
        self.origin, self.seen, self.redrawn = origin, set(), 0


def _instance_batches(config: Config, spec: TemplateSpec, draws: _Draws, first: int, count: int):
    """Problem ids first..first+count-1 as rows, ROW_BATCH at a time, repeats skipped (time counted as
    'instantiate')."""
    batch: list[dict] = []
    t = time.perf_counter()
    seen = draws.seen
    key_of = None
    for row in instantiate([spec], n_per_template=count, first=first, seed=config.seed, workers=1):
        if row["variables"] in seen:
            draws.redrawn += 1
            continue
        seen.add(row["variables"])
        key_of = key_of or problem_key(config.seed, row["template_id"])
        batch.append({"key": key_of(row["problem_id"]), **row, "origin": draws.origin,
                      "redrawn_before": draws.redrawn})
        draws.redrawn = 0
        if len(batch) >= ROW_BATCH:
            _add_time("instantiate", t)
            yield batch
            batch, t = [], time.perf_counter()
    _add_time("instantiate", t)
    if batch:
        yield batch


def problem_key(seed: int, template_id: str):
    """problem_id -> the key of that problem row, stable_hash(["tdg-problem", seed, template_id, problem_id]),
    with the JSON of all but the id made once per template (a million rows: ~2 us a row less)."""
    head = (json.dumps(["tdg-problem", seed, template_id], ensure_ascii=False, separators=(",", ":"))[:-1]
            + ",").encode()
    sha256 = hashlib.sha256

    def key(problem_id: int) -> str:
        return sha256(head + b"%d]" % problem_id).hexdigest()[:32]
    return key


def _check_async(config: Config, rows: list[dict]) -> Future | None:
    """The sandbox run of `rows`' solution_codes, started now (None: verify_rows is off)."""
    if not config.verify_rows:
        return None
    return _pool().submit(run_solutions, [r["solution_code"] for r in rows])


def _checked(rows: list[dict], future: Future | None) -> Rows:
    """One batch's rows with their verdicts, as one item for the core (a million rows: no pass per row)."""
    t = time.perf_counter()
    checks = future.result() if future is not None else [None] * len(rows)
    _add_time("sandbox_wait", t)
    return Rows(rows, _verdicts(rows, checks))


def origin_of(template: dict) -> str:
    """Where a template's idea came from: the example problem it was written from, its topic, our seed library,
    or the file (and line) it was read from."""
    if template.get("origin"):
        return template["origin"]
    if template.get("example_id"):
        return f"GSM8K {template['example_id']}"
    if template.get("topic"):
        return f"topic: {template['topic']}"
    return f"sdg seed library: {template.get('skill') or '?'}"


def legacy_problem_rows(config: Config, template: dict):
    """A TemplateMath legacy template's problems, generated and re-checked in the sandbox (legacy.py)."""
    from engine.methods.tdg.legacy import instantiate_legacy
    raw = json.loads(template["template"])
    for row in instantiate_legacy(raw, config.problems_per_template, seed=config.seed,
                                  template_id=template["template_id"]):
        key = stable_hash(["tdg-problem", config.seed, template["template_id"], row["problem_id"]])
        yield {"key": key, **row, "template_id": template["template_id"], "source": "file", "format": "legacy",
               "origin": origin_of(template)}, None


_FIGURE_COLUMNS = pa.schema([("template_id", pa.string()), ("redrawn_before", pa.int64())])


def problem_figures(config: Config):
    """reader -> the problems stage's figures: rows, templates, templates short of their count, and the repeat
    rate (draws whose variable values an earlier instance of their template already had: redrawn, see
    problem_rows)."""
    def figures(reader) -> dict:
        per_template: Counter = Counter()
        repeats = 0
        t = time.perf_counter()
        # every row read back, two columns of it (timed for bench/: PHASE_SECONDS)
        for table in reader.iter_columns("problems", _FIGURE_COLUMNS):
            per_template.update(table.column("template_id").to_pylist())
            repeats += pc.sum(table.column("redrawn_before")).as_py() or 0
        repeats += sum(r["row"].get("redrawn_before", 0) for r in reader.rejects("problems")
                       if r["reason"] == "repeats_exhausted")
        _add_time("problem_figures", t)
        rows = sum(per_template.values())
        return {"instances": rows, "instance_templates": len(per_template),
                "templates_short": sum(n < config.problems_per_template for n in per_template.values()),
                "repeats_redrawn": repeats,
                "repeat_rate": round(repeats / (rows + repeats), 4) if rows + repeats else 0.0}
    return figures


# -- templates from a file (`templates_file`: ours or TemplateMath's legacy Python) ------------------------------
class TemplatesFileError(ConfigError):
    """A templates file that cannot be read; the message lists every bad line."""


def read_templates(path: Path) -> list[tuple[int, dict]]:
    """(line number, template) for each line of a JSONL templates file: our meta-template JSON or a legacy
    template (a `template` field of Python); TemplatesFileError listing every line that is neither."""
    from engine.methods.tdg.legacy import is_legacy
    if not path.is_file():
        raise TemplatesFileError(f"templates file not found: {path}")
    out, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {number}: not JSON ({e.msg})")
            continue
        if not isinstance(raw, dict) or not (is_legacy(raw) or {"variables", "problem", "answer"} <= set(raw)):
            bad.append(f"line {number}: neither a template (variables, problem, steps, answer) nor a legacy "
                       "template (a 'template' field defining generate_problem_and_solution_code)")
            continue
        out.append((number, raw))
    if bad:
        raise TemplatesFileError(f"{path}: {len(bad)} bad line{'s' * (len(bad) != 1)}: " + "; ".join(bad))
    if not out:
        raise TemplatesFileError(f"templates file is empty: {path}")
    return out


def verify_file_templates(entries: list[tuple[int, dict]], *, k: int, seed: int, sandbox: bool = True):
    """(line number, raw, format, Verdict) per template, in file order: ours verified as the model's are,
    legacy ones by legacy.verify_legacy (sandbox only)."""
    from engine.methods.tdg.legacy import is_legacy, verify_legacy
    legacy = [(n, raw) for n, raw in entries if is_legacy(raw)]
    native = [(n, raw) for n, raw in entries if not is_legacy(raw)]
    verdicts = dict(zip((n for n, _ in native), verify_templates([raw for _, raw in native], k=k, seed=seed,
                                                                   sandbox=sandbox, source="file")))
    verdicts.update(zip((n for n, _ in legacy), verify_legacy([raw for _, raw in legacy], k=k, seed=seed)))
    return [(n, raw, "legacy" if is_legacy(raw) else "native", verdicts[n]) for n, raw in entries]


def file_template_rows(config: Config):
    """The templates file, verified -> (row, reason) pairs (rejects keep their reason)."""
    path = config.templates_file
    verified = verify_file_templates(read_templates(path), k=config.verify_instances, seed=config.seed,
                                     sandbox=config.sandbox)
    for number, raw, fmt, v in verified:
        origin = raw.get("source") if isinstance(raw.get("source"), str) else f"{path.name} line {number}"
        row = {**v.to_row(), "key": stable_hash(["tdg-file-template", raw]), "topic": None, "example_id": None,
               "format": fmt, "origin": origin, "line": number}
        yield row, (None if v.accepted else v.reason)


def checked_rows(config: Config, rows: list[dict]):
    """(row, None) for each row whose solution_code, run in the sandbox, agrees with its exact result;
    (row with what the code returned, 'row_code_mismatch') for the others."""
    if not rows:
        return
    checks = run_solutions([r["solution_code"] for r in rows]) if config.verify_rows else [None] * len(rows)
    yield from zip(rows, _verdicts(rows, checks))


def _verdicts(rows: list[dict], checks: list) -> list[str | None]:
    """Each row's reject reason (None: accepted), the row marked in place: `row_code_verified` on an accepted
    row, `code_answer` (what the code returned, or its error) on a reject."""
    reasons: list[str | None] = []
    for row, check in zip(rows, checks):
        if check is not None and not (check.ok and _agrees(check.value, row["result"])):
            row["code_answer"] = str(check.value) if check.ok else check.error
            reasons.append("row_code_mismatch")
        else:
            row["row_code_verified"] = check is not None
            reasons.append(None)
    return reasons


def _agrees(value, result: str) -> bool:
    """Does a sandbox value equal the row's exact result (its text)? An int that prints as the result does;
    anything else is compared exactly by same_answer (the shortcut spares a Fraction per row)."""
    if type(value) is int and str(value) == result:
        return True
    if type(value) is float and "/" not in result:  # a decimal result: float() of its text is float() of its
        return same_answer(value, float(result))      # Fraction (both round the same number), without the Fraction
    return same_answer(value, Fraction(result))


# -- the method ---------------------------------------------------------------------------------------------------
def pipeline(config: Config, ctx: Context) -> Pipeline:
    """Seed templates and model-written templates -> verified templates -> instantiated problems."""
    return Pipeline(
        stages=[
            Compute("seed_templates", rows=lambda: seed_template_rows(config) if config.use_seed_templates else ()),
            *model_template_stages(config, ctx.model_name),
            Compute("file_templates",
                    rows=lambda: file_template_rows(config) if config.templates_file is not None else ()),
            Compute("problems", reads=Each("seed_templates", "templates", "file_templates"),
                    rows=problem_rows(config), figures=problem_figures(config)),
        ],
        publish=Publish("problems", text_fields=["problem", "solution_wocode"]))


def model_template_stages(config: Config, model: str) -> list:
    """The stages that end in stage `templates`: the model's verified templates."""
    if config.writing == "one_request":
        return [Generate("templates", items=lambda: template_tasks(config), request=template_request(config, model),
                         parse=template_row(config))]
    stages = [
        Generate("template_variables", items=lambda: template_tasks(config), request=variables_request(config, model),
                 parse=variables_row, attempts=config.attempts),
        Generate("drafts", reads=Each("template_variables"), items=lambda row: [row],
                 request=draft_request(config, model), parse=draft_row(config), attempts=config.attempts),
    ]
    if config.revise:
        stages.append(Generate("revisions", reads=Each("drafts"), items=lambda row: [row],
                               request=revision_request(config, model), parse=revision_row(config)))
    reads = Whole("drafts", "revisions") if config.revise else Whole("drafts")
    stages.append(Compute("templates", reads=reads, rows=final_template_rows(config),
                          figures=writing_figures(config)))
    return stages


def export_templategsm(out: Path, to: Path) -> int:
    """`sdg export RUN --format templategsm`: see templategsm.py."""
    from engine.methods.tdg.templategsm import export
    return export(out, to)


EXPORTS = {"templategsm": export_templategsm}
"""Export formats of this method's runs (`sdg export RUN --format NAME --to DIR`)."""
