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

import json
import random
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.constraints import Constraint
from engine.jsonl import read_objects
from engine.methods import Context
from engine.methods.tdg.instantiate import TemplateSpec, instantiate
from engine.methods.tdg.sandbox import run_solutions, same_answer
from engine.methods.tdg.template import DATA_DIR, SCHEMA_PATH, word_lists
from engine.methods.tdg.verify import verify_template, verify_templates
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish
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
    problems_per_template: int = Field(100, ge=1, le=10_000_000)
    """Problems instantiated from each accepted template."""
    verify_instances: int = Field(8, ge=1, le=1000)
    """K: instances each template is verified on (exact answer, type, sandboxed solution_code)."""
    seed: int = 0
    """Seeds the instantiation of (template_id, problem_id) and the choice of few-shot examples (request seeds
    come from the run's seed, as for every method)."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=768, temperature=0.8))
    """Sampling of template writing; a template cut off by max_tokens is rejected as 'truncated'."""
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

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or len(t) > 200]
        if bad:
            raise ValueError(f"topics must be non-empty strings of at most 200 characters, got {bad[:3]}")
        return v


# Hashed into the run's identity by content, not path (engine.config.file_identity).
FILE_PARAMS = ("examples_file",)


def resolve_paths(params: dict, base: Path) -> dict:
    """examples_file relative to the config file's folder."""
    p = dict(params)
    if p.get("examples_file") and not Path(p["examples_file"]).is_absolute():
        p["examples_file"] = str(base / p["examples_file"])
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
ROW_BATCH = 2000  # rows per sandbox child: amortizes its start-up (~30 ms) over many solutions


def template_spec(row: dict) -> TemplateSpec:
    """A committed template row as the instantiator takes it."""
    return TemplateSpec(json.loads(row["template"]), row.get("source") or "model",
                        {"verified": True, "sandbox": bool(row.get("stat_sandbox"))})


def problem_rows(config: Config):
    """template row -> its `problems_per_template` problem rows, each checked twice: the exact answer of the
    compiled template, and its own solution_code run in the sandbox (batched), which must agree; a row that
    disagrees is a reject ('row_code_mismatch')."""
    def rows(template: dict):
        batch: list[dict] = []
        for row in instantiate([template_spec(template)], n_per_template=config.problems_per_template,
                               seed=config.seed, workers=1):
            key = stable_hash(["tdg-problem", config.seed, row["template_id"], row["problem_id"]])
            batch.append({"key": key, **row})
            if len(batch) >= ROW_BATCH:
                yield from checked_rows(config, batch)
                batch = []
        yield from checked_rows(config, batch)
    return rows


def checked_rows(config: Config, rows: list[dict]):
    """(row, None) for each row whose solution_code, run in the sandbox, agrees with its exact result;
    (row with what the code returned, 'row_code_mismatch') for the others."""
    if not rows:
        return
    checks = run_solutions([r["solution_code"] for r in rows]) if config.verify_rows else [None] * len(rows)
    for row, check in zip(rows, checks):
        if check is not None and not (check.ok and same_answer(check.value, Fraction(row["result"]))):
            yield {**row, "code_answer": str(check.value) if check.ok else check.error}, "row_code_mismatch"
        else:
            yield {**row, "row_code_verified": check is not None}, None


# -- the method ---------------------------------------------------------------------------------------------------
def pipeline(config: Config, ctx: Context) -> Pipeline:
    """Seed templates and model-written templates -> verified templates -> instantiated problems."""
    return Pipeline(
        stages=[
            Compute("seed_templates", rows=lambda: seed_template_rows(config) if config.use_seed_templates else ()),
            Generate("templates", items=lambda: template_tasks(config), request=template_request(config, ctx.model_name),
                     parse=template_row(config)),
            Compute("problems", reads=Each("seed_templates", "templates"), rows=problem_rows(config)),
        ],
        publish=Publish("problems", text_fields=["problem", "solution_wocode"]))
