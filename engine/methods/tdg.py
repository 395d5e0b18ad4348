"""TDG: template-based data generation (TemplateMath / TemplateGSM, arXiv 2411.18104), verified and fast.

Read top to bottom, like the paper:

  1. Prompts.  For each topic (skill) and each example problem, ask the model for a meta-template, constrained
     by grammars/tdg/meta_template.schema.json, with seed templates as few-shot examples (prompts/tdg/*.jinja).
  2. Stage "templates".  Each output is parsed and verified (engine.tdg.verify: whitelist parse, exact sympy
     answers of K instances, text/answer agreement, sandboxed solution_code). Accepted templates become rows,
     rejected ones keep their reason. The seed library is always added too (source="seed"), so instantiation
     works even when a small model's templates are all rejected.
  3. Stage "problems".  Every accepted template is compiled once and instantiated `problems_per_template`
     times over all cores, deterministically by (seed, template_id, problem_id). No model.

Acceptance counts per reason go to the manifest through store.record("templates", ...).
"""
from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.constraints import Constraint
from engine.jsonl import read_objects
from engine.methods import Context, Output
from engine.prompting import render
from engine.request import Request, Result, Sampling, stable_hash
from engine.runner import owns, run_stage
from engine.tdg.instantiate import TemplateSpec, instantiate
from engine.tdg.template import DATA_DIR, SCHEMA_PATH, word_lists
from engine.tdg.sandbox import run_solutions, same_answer
from engine.tdg.verify import verify_template, verify_templates

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
    """Seeds template-request seeds and the instantiation of (template_id, problem_id)."""
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
    workers: int | None = Field(None, ge=1)
    """Processes for instantiation; None: all cores."""

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
def template_requests(config: Config, model: str) -> list[Request]:
    """One request per (topic or example problem, repeat): system rules + few-shot seeds + the task."""
    seeds = _seed_raws()
    constraint = Constraint.json_schema(SCHEMA_PATH)
    system = render("tdg/system.jinja", word_lists=sorted(word_lists()))
    tasks = [{"topic": t, "problem": None, "example_id": None} for t in config.topics]
    tasks += [{"topic": None, "problem": e["question"], "example_id": e["id"]}
              for e in _examples(config.examples_file, config.examples_limit)]
    requests = []
    for t_index, task in enumerate(tasks):
        for rep in range(config.templates_per_topic):
            rng = random.Random(stable_hash(["tdg-shots", config.seed, t_index, rep]))
            shots = rng.sample(seeds, min(config.few_shot, len(seeds)))
            user = render("tdg/write_template.jinja", topic=task["topic"], problem=task["problem"],
                          examples=[{"skill": s["skill"], "json": json.dumps(s, ensure_ascii=False)} for s in shots])
            requests.append(Request.build(
                stage="templates", model=model, constraint=constraint, sampling=config.sampling,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                seed=config.seed * 1_000_003 + t_index * 1000 + rep,
                meta={"topic": task["topic"], "example_id": task["example_id"], "repeat": rep}))
    return requests


# -- 2. parse -> verify -> template row or reject ---------------------------------------------------------------
def _template_row(config: Config, counts: dict):
    def to_row(request: Request, result: Result) -> tuple[dict, str | None]:
        base = {**request.meta, "key": result.key, "output": result.text, "output_tokens": result.output_tokens}
        if not result.valid:
            reason = (result.reason or "invalid").split(":")[0]
            counts[reason] = counts.get(reason, 0) + 1
            return {**base, "details": result.reason}, reason
        v = verify_template(result.parsed, k=config.verify_instances, seed=config.seed, sandbox=config.sandbox)
        row = {**base, **v.to_row(), "key": result.key}
        if not v.accepted:
            counts[v.reason] = counts.get(v.reason, 0) + 1
            return row, v.reason
        counts["accepted_model"] = counts.get("accepted_model", 0) + 1
        return row, None
    return to_row


def add_seed_templates(config: Config, store, replica: tuple[int, int] = (0, 1)) -> int:
    """Verify and commit the seed library as template rows (source='seed'); returns how many were added.
    Each replica verifies only the seed templates whose keys it owns, so none is verified or counted twice."""
    raws = _seed_raws()
    done = store.done_keys("templates")
    keyed = [(stable_hash(["tdg-seed-template", r]), r) for r in raws]
    todo = [(k, r) for k, r in keyed if k not in done and owns(k, replica)]
    if not todo:
        return 0
    verdicts = verify_templates([r for _, r in todo], k=config.verify_instances, seed=config.seed,
                                sandbox=config.sandbox, source="seed")
    accepted = 0
    for (key, _), v in zip(todo, verdicts):
        row = {**v.to_row(), "key": key, "topic": None, "example_id": None}
        if v.accepted:
            store.add("templates", row)
            accepted += 1
        else:  # a seed that fails is our bug; keep it visible rather than silently dropped
            store.reject("templates", row, v.reason)
    store.commit()
    store.record("templates", accepted_seed=accepted, rejected_seed=len(todo) - accepted)
    return accepted


# -- 3. instantiate accepted templates --------------------------------------------------------------------------
def accepted_templates(store) -> list[TemplateSpec]:
    """Accepted templates from the store, one per template_id, in template_id order."""
    by_id: dict[str, TemplateSpec] = {}
    for row in store.rows("templates"):
        if row.get("accepted") and row["template_id"] not in by_id:
            by_id[row["template_id"]] = TemplateSpec(json.loads(row["template"]), row.get("source") or "model",
                                                     {"verified": True, "sandbox": bool(row.get("stat_sandbox"))})
    return [by_id[k] for k in sorted(by_id)]


def instantiate_problems(config: Config, store, specs: list[TemplateSpec], replica: tuple[int, int] = (0, 1)) -> dict:
    """Stage 'problems': every template x problems_per_template rows, skipping keys already committed and
    keys another replica owns. With verify_rows, rows go through the sandbox in batches before committing."""
    done = store.done_keys("problems")
    stats: dict = {}
    counts = {"added": 0, "rejected": 0}
    batch: list[dict] = []
    for row in instantiate(specs, n_per_template=config.problems_per_template, seed=config.seed,
                           workers=config.workers, stats=stats):
        key = stable_hash(["tdg-problem", config.seed, row["template_id"], row["problem_id"]])
        if key in done or not owns(key, replica):
            continue
        batch.append({"key": key, **row})
        if len(batch) >= ROW_BATCH:
            _commit_rows(config, store, batch, counts)
            batch = []
    _commit_rows(config, store, batch, counts)
    store.commit()
    store.record("problems", rows=counts["added"], row_code_mismatch=counts["rejected"],
                 skipped_instances=stats.get("skipped", 0), instantiate_seconds=stats.get("seconds", 0.0),
                 templates=len(specs))
    return {**counts, **stats}


ROW_BATCH = 2000  # rows per sandbox child: amortizes its start-up (~30 ms) over many solutions


def _commit_rows(config: Config, store, rows: list[dict], counts: dict) -> None:
    """Second check of each row's answer: its solution_code, run in the sandbox, must agree with the exact
    result. Agreeing rows are committed, the others rejected with what the code returned."""
    if not rows:
        return
    checks = run_solutions([r["solution_code"] for r in rows]) if config.verify_rows else [None] * len(rows)
    for row, check in zip(rows, checks):
        if check is not None and not (check.ok and same_answer(check.value, Fraction(row["result"]))):
            store.reject("problems", {**row, "code_answer": str(check.value) if check.ok else check.error},
                         "row_code_mismatch")
            counts["rejected"] += 1
        else:
            store.add("problems", {**row, "row_code_verified": check is not None})
            counts["added"] += 1
        store.maybe_commit()


def run(config: Config, ctx: Context) -> Output:
    """The whole method: template requests -> verified templates (+ seeds) -> instantiated problems."""
    store = ctx.store
    requests = template_requests(config, ctx.model_name)
    counts: dict[str, int] = {}
    if requests:
        stats = run_stage(ctx.backend, store, "templates", requests, _template_row(config, counts),
                          replica=ctx.replica, progress=ctx.progress)
        ctx.extras["last_stats"] = stats
    if counts:
        store.record("templates", **{f"reason_{k}" if not k.startswith("accepted") else k: v
                                     for k, v in counts.items()})
    if config.use_seed_templates:
        add_seed_templates(config, store, ctx.replica)
    store.commit()
    specs = accepted_templates(store)
    if ctx.extras.get("stop_after") == "templates":
        return None  # type: ignore[return-value]
    instantiate_problems(config, store, specs, ctx.replica)
    return Output(final_stage="problems", text_fields=["problem", "solution_wocode"])
