"""TarGEN: targeted synthetic data generation with LLMs (Gupta et al., arXiv 2310.17876), on the engine.

Read top to bottom, like the paper. A task spec (configs/targen/<task>.yaml, `TaskSpec`) gives the task
instruction, the label set with what each label means for the fields, the instance fields with their JSON
Schema, and few-shot examples we wrote; it is checked whole before anything is generated.

  1. Stage "contexts".  `context_requests` requests (by default in proportion to `rows`: one seed per published
     row, `context_requests_for`), each a constrained list of `contexts_per_request` domains/settings for the
     task (grammars/targen/contexts.schema.json).
  2. Stage "seeds".  Per distinct context (repeats across all lists dropped, so a whole read of "contexts"),
     one constrained list of `seeds_per_context` instance seeds; a seed that becomes a field holds that field's
     schema.
  3. Stage "instances".  Label-constrained generation: the engine fixes every request's label before generating
     (balanced by `label_distribution`) and pairs it with a seed (attempt j of label L uses seed j mod #seeds,
     so each seed meets every label). The seed becomes the spec's `seed_field` verbatim (the premise or
     passage; `seed_as_field: false` lets the model rewrite it), the spec's `drawn` fields are fixed by the
     engine too (COPA's question: cause/effect, balanced within each label), and the model writes the other
     fields and an `explanation` of the label, constrained by their JSON Schema. Span offsets (WiC, WSC,
     ReCoRD) are computed from the text (engine.methods.targen_tasks). Rejects with a reason: truncated or
     invalid outputs, breaks of the spec's `distinct`/`contains`/`among` checks or a copied few-shot text
     ("check: ..."), a span not in its text ("span: ...").
  4. Stage "corrections".  Recheck: the model sees the instance, its explanation and its current label, and
     answers a corrected explanation and a corrected label, constrained to the label set
     (`show_label_in_correction: false`: it re-labels blind). `label_changed` flags a flip.
  5. Stage "dataset" (no model).  `on_label_change` decides what a changed label means:
       relabel    publish the corrected label (the paper's choice, the default; counts towards that label)
       drop       publish only instances whose label the model confirmed (others: reject "label_changed")
       keep_both  publish the initial label
     Every row keeps `initial_label`, `corrected_label`, `label_changed`, the corrected `explanation` and the
     `initial_explanation`. Candidates the run's quality filters would remove (exact/near duplicates,
     contamination) are rejects here ("quality_filter"), so the published count is reached after them. Per
     label, the first `target` candidates by key are published; the rest are rejects "surplus". Its figures
     (rows, rounds, shortfall, distinct contexts and seeds, flip rate overall and per initial label, rows and
     target per label) go to the manifest once.

Steps 3-4 run in rounds until every label has its target count (rows x label_distribution, largest
remainder): round r asks ceil(deficit x overgenerate) new instances of each short label, at most `max_rounds`
rounds; a label still short then is reported (`shortfall` in the manifest) and published short. Round r's
requests are computed from rounds < r only, so a resumed run, and every replica, rebuilds exactly the same
ones. A round whose previous round has instances but no corrections at all (a launch stopped after
"instances") is not planned: later rounds need the corrections.

The pipeline core (engine.pipeline) runs these stages: resume, replicas, seeds (run seed, stage, item,
attempt), stats, `--stop-after` and the flow between stages are its own. Every row keeps its provenance:
context key and text -> seed key and text -> instance key -> correction key.
"""
from __future__ import annotations

import json
import logging
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

import jsonschema
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.config import ConfigError, load_yaml_mapping, validated
from engine.constraints import Constraint, ConstraintError
from engine.methods import Context, MethodError
from engine.methods.targen_tasks import DERIVE, Span
from engine.methods.targen_tasks import candidates as span_candidates
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish, Whole
from engine.prompting import render
from engine.quality import gates
from engine.request import Request, Result, Sampling, stable_hash

log = logging.getLogger(__name__)

GRAMMARS = Path(__file__).resolve().parents[2] / "grammars" / "targen"
POLICIES = ("relabel", "drop", "keep_both")
# Columns of a published row besides the task's fields: a field may not take one of these names.
RESERVED = frozenset({"key", "task", "label", "target_label", "initial_label", "corrected_label", "label_changed",
                      "explanation", "initial_explanation", "round", "attempt", "context", "context_key", "seed", "seed_key", "instance_key",
                      "correction_key", "model", "sampling_seed", "fields"})
# One sentence, ended by its first full stop: a 135M model otherwise runs on until maxLength cuts it (a reject).
EXPLANATION = {"type": "string", "pattern": r"^[^.\n]{10,160}[.]$"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MENTION = re.compile(r"`([^`]+)`")  # a field or label named in prose: `premise`


# ================================================================================== 0. the task spec

class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meaning: str = Field(min_length=1)
    """What the label says about the instance's fields, in words; fields are named in backticks (`premise`)."""


class Example(BaseModel):
    """A few-shot example, written by us: its label, its fields, and why the label holds."""

    model_config = ConfigDict(extra="forbid")
    label: str
    fields: dict[str, Any]
    explanation: str = Field(min_length=1, validation_alias=AliasChoices("explanation", "rationale"))
    """Why the label holds: step 3 writes one with each instance, step 4 corrects it (`rationale:` is read as
    the same, for specs written before step 3 wrote explanations)."""


class TaskSpec(BaseModel):
    """A task for TarGEN, read from configs/targen/<task>.yaml (see copa.yaml for a commented one)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    """Short task id (copa, boolq, ...); goes into every row as `task`."""
    instruction: str = Field(min_length=1)
    """The task in words; names fields in backticks."""
    labels: dict[str, Label] = Field(min_length=2)
    """The label set: label name -> its meaning for the fields. Quote YAML names like "true"/"false"."""
    fields: dict[str, dict] = Field(min_length=1)
    """Instance fields in generation order: field name -> its JSON Schema. All are required."""
    few_shot: list[Example] = Field(min_length=1)
    """Our examples; each must validate against `fields` and use a label of `labels`."""
    context_hint: str = "any domains where this task occurs"
    """Step 1: what kind of contexts (domains, settings) to list."""
    seed_hint: str = "short sentences"
    """Step 2: what an instance seed is for this task (plural, e.g. 'short sentences about one event')."""
    text_fields: list[str] | None = None
    """Fields that are the row's text for dedup, decontamination and diversity; default all string fields."""
    distinct: list[list[str]] = Field(default_factory=list)
    """Groups of fields whose values must all differ (COPA: premise, choice1, choice2)."""
    contains: list[tuple[str, str]] = Field(default_factory=list)
    """[a, b] pairs: the value of field a must occur in field b, ignoring case (WiC: the word in each sentence)."""
    seed_field: str | None = None
    """Step 3: the field the seed becomes verbatim (premise, passage); the model writes the others. None: the
    model writes every field around the seed (and `seed_as_field` has no effect)."""
    drawn: dict[str, list] = Field(default_factory=dict)
    """Fields whose value the engine draws per request, balanced within each label (COPA: question: [cause,
    effect]); the model writes the others. Each value must validate against the field's schema."""
    spans: list[Span] = Field(default_factory=list)
    """Fields that are spans of another field, with the offset columns computed from the text (WiC, WSC,
    ReCoRD); an instance whose span is not in its text is a reject ("span: ...")."""
    among: list[tuple[str, str]] = Field(default_factory=list)
    """[a, b] pairs: the value of field a must equal one item of the array field b, ignoring case (ReCoRD: the
    answer is one of the entities)."""
    derive: str | None = None
    """A named derivation (engine.methods.targen_tasks.DERIVE) adding columns from the published label
    (MultiRC: the answer list, each answer with its own label)."""
    source: str | None = None
    """The file the spec was read from (set when loaded)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _quoted_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for name in v:
                if not isinstance(name, str):
                    raise PydanticCustomError("label_name", f"label name {name!r} is not a string: write label "
                                                            f"names in quotes in YAML (\"true\", not true)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        """Everything the prompts and checks use must be defined: fields in the schema, labels in the set."""
        for f in self.fields:
            if not _NAME.match(f) or f in RESERVED:
                _fail(f"field name {f!r} must be an identifier and not one of {', '.join(sorted(RESERVED))}")
        try:
            self.constraint()
        except ConstraintError as e:
            _fail(f"fields: {e}")
        used = {"text_fields": self.text_fields or [],
                "distinct": [f for group in self.distinct for f in group],
                "contains": [f for pair in self.contains for f in pair],
                "among": [f for pair in self.among for f in pair],
                "seed_field": [self.seed_field] if self.seed_field else [], "drawn": list(self.drawn),
                "spans": [f for span in self.spans for f in (span.field, span.within)]}
        prose = [self.instruction, self.context_hint, self.seed_hint] + [lb.meaning for lb in self.labels.values()]
        used["prose (backticks)"] = [m for text in prose for m in _MENTION.findall(text) if m not in self.labels]
        for where, names in used.items():
            missing = [n for n in names if n not in self.fields]
            if missing:
                _fail(f"{where} uses field(s) {', '.join(map(repr, missing))} that `fields` does not define "
                      f"(defined: {', '.join(self.fields)})")
        if any(len(group) < 2 for group in self.distinct):
            _fail("each `distinct` group needs at least two fields")
        if self.derive is not None and self.derive not in DERIVE:
            _fail(f"derive: unknown derivation {self.derive!r} (known: {', '.join(DERIVE)})")
        if self.seed_field in self.drawn:
            _fail(f"{self.seed_field!r} is both the seed_field and drawn")
        columns = [c for span in self.spans for c in span.columns() if c != span.field]
        clash = [c for c in columns if c in self.fields or c in RESERVED or columns.count(c) > 1]
        if clash:
            _fail(f"span column(s) {', '.join(map(repr, clash))} repeat a field, a reserved or another span column")
        for name, values in self.drawn.items():
            bad = [v for v in values if not jsonschema.validators.validator_for(self.fields[name])(
                self.fields[name]).is_valid(v)]
            if not values or bad:
                _fail(f"drawn.{name}: needs values that hold the field's schema (bad: {bad})")
        validator = jsonschema.validators.validator_for(self.instance_schema())(self.instance_schema())
        for i, ex in enumerate(self.few_shot):
            if ex.label not in self.labels:
                _fail(f"few_shot[{i}] has label {ex.label!r}, which is not in the label set "
                      f"({', '.join(self.labels)})")
            error = jsonschema.exceptions.best_match(validator.iter_errors(ex.fields))
            if error is not None:
                at = "/".join(map(str, error.path))
                _fail(f"few_shot[{i}].fields{'.' + at if at else ''}: {error.message} (must match `fields`)")
            broken = self.check(ex.fields) or self.locate(ex.fields)[1]
            if broken and not broken.startswith("copied_example"):
                _fail(f"few_shot[{i}] breaks the spec's own check: {broken}")
        return self

    # -- what the method uses
    def instance_schema(self) -> dict:
        """The JSON Schema of one instance: every field, in order, required, nothing else."""
        return {"type": "object", "properties": self.fields, "required": list(self.fields),
                "additionalProperties": False}

    def constraint(self) -> Constraint:
        return _instance_constraint(json.dumps(self.instance_schema(), sort_keys=True))

    def text_field_names(self) -> list[str]:
        return self.text_fields or [f for f, s in self.fields.items() if s.get("type") == "string"] or list(self.fields)

    def check(self, fields: dict) -> str | None:
        """The first `distinct`/`contains` check that `fields` breaks, in words; None when all hold
        (WiC: {"word": "bank", "sentence1": "a loan", ...} -> "contains: sentence1 does not contain word")."""
        norm = {k: " ".join(str(v).casefold().split()) for k, v in fields.items()}
        for f in self.text_field_names():
            if isinstance(fields.get(f), str) and len(norm[f]) > 20 and norm[f] in self._example_texts():
                return f"copied_example: {f} repeats a few-shot example"
        for group in self.distinct:
            values = [norm[f] for f in group]
            if len(set(values)) < len(values):
                return f"distinct: {'/'.join(group)} repeat a value"
        for a, b in self.contains:
            if norm[a] not in norm[b]:
                return f"contains: {b} does not contain {a}"
        for a, b in self.among:
            if norm[a] not in {_norm(str(v)) for v in fields[b]}:
                return f"among: {a} is not one of {b}"
        return None

    def locate(self, fields: dict) -> tuple[dict, str | None]:
        """The span columns of an instance ({"start1": 4, "end1": 8, ...}), or ({}, reason) for a span not found."""
        columns: dict = {}
        for span in self.spans:
            found, reason = span.locate(fields)
            if reason:
                return {}, reason
            columns.update(found)
        return columns, None

    def given(self, seed_as_field: bool) -> list[str]:
        """Fields the engine fills before step 3 (the seed field, the drawn ones); the model writes the rest."""
        return ([self.seed_field] if self.seed_field and seed_as_field else []) + list(self.drawn)

    def generation_constraint(self, seed_as_field: bool, values: dict | None = None) -> Constraint:
        """Step 3's output: the fields the model writes, in order, then its `explanation` of the label. With the
        given `values` (the seed, drawn fields), a span with `choose` is an enum of runs of words of its text."""
        given = self.given(seed_as_field)
        props = {f: s for f, s in self.fields.items() if f not in given}
        for span in self.spans:
            if span.choose and values and span.within in values and span.field in props:
                props[span.field] = _choosing(props[span.field], values[span.within], span.choose, bool(span.index))
        for word, field in self.contains:  # WiC: each sentence the model writes holds the given word
            if values and isinstance(values.get(word), str) and field in props:
                props[field] = _containing(props[field], values[word])
        props["explanation"] = EXPLANATION
        schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
        return _instance_constraint(json.dumps(schema))  # not sorted: the model writes the fields in order


    def _example_texts(self) -> frozenset[str]:
        """Normalized string values of the few-shot examples: an instance repeating one copied it."""
        return frozenset(" ".join(v.casefold().split()) for ex in self.few_shot for v in ex.fields.values()
                         if isinstance(v, str))


def _choosing(schema: dict, text: str, most_words: int, as_written: bool) -> dict:
    """`schema` (a string, or an array of strings) with its strings restricted to runs of words of `text`;
    unchanged when no run holds it (the instance is then a reject "span: ...")."""
    item = schema.get("items", schema) if schema.get("type") == "array" else schema
    runs = span_candidates(text, most_words, item, as_written)
    if not runs or len(runs) < schema.get("minItems", 0):
        return schema
    choice = {"type": "string", "enum": runs}  # the runs already hold the item's other keywords
    return {**schema, "items": choice} if schema.get("type") == "array" else choice


def _containing(schema: dict, word: str) -> dict:
    """A string `schema` that only admits one sentence holding `word` at the start of a word, in any case, and
    ending at its first full stop (bank: "Banks close early." passes): the `contains` check then holds by
    construction and a copied few-shot sentence, which lacks the word, cannot be written (WiC with the 135M
    model: 43 of 48 instances copied an example before). That model still begins with an example's words and
    puts the word late, so most of its sentences reach maxLength (74 of 93 instances, with the full stop rule;
    103 of 117 without it). Unchanged when the schema has a pattern or enum of its own."""
    if schema.get("type") != "string" or "pattern" in schema or "enum" in schema or not word.strip():
        return schema
    letters = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word.strip())
    return {**schema, "pattern": f"^([^.\\n]*[^A-Za-z0-9_.\\n])?{letters}[^.\\n]*[.]$"}


def _fail(message: str):
    raise PydanticCustomError("task_spec", message)


@lru_cache(maxsize=64)
def _instance_constraint(schema_json: str) -> Constraint:
    return Constraint.json_schema(json.loads(schema_json))


class TaskSpecError(ConfigError):
    """A task spec that cannot be used; the message names the file and what is wrong. A ConfigError, so `sdg`
    prints it as one `error:` line and exits 2, before any model loads."""


def load_task(path: str | Path) -> TaskSpec:
    """Read and check a task spec file; raises TaskSpecError with one line naming the file."""
    path = Path(path)
    raw = load_yaml_mapping(path, "task spec", TaskSpecError)
    return validated(TaskSpec, {**raw, "source": str(path)}, str(path), TaskSpecError)


# ================================================================================== the run config

class Config(BaseModel):
    """The `params:` of a TarGEN run config (configs/targen_copa.yaml)."""

    model_config = ConfigDict(extra="forbid")

    task: TaskSpec
    """The task spec: a path to configs/targen/<task>.yaml (relative to the run config's folder), or inline."""
    rows: int = Field(ge=1, le=10_000_000)
    """Rows to publish, split over labels by `label_distribution`."""
    label_distribution: dict[str, float] | None = None
    """Target share per label (any positive weights; labels left out get 0). None: uniform."""
    context_requests: int | None = Field(None, ge=1, le=100_000)
    """Step 1: how many context lists to ask for. None: in proportion to `rows`, one seed per published row
    (`context_requests_for`: ceil(rows / (contexts_per_request x seeds_per_context)))."""
    contexts_per_request: int = Field(5, ge=1, le=50)
    """Step 1: contexts per list."""
    seeds_per_context: int = Field(4, ge=1, le=50)
    """Step 2: instance seeds per distinct context."""
    seed_as_field: bool = True
    """Step 3: the seed becomes the spec's `seed_field` verbatim (the paper). False: the model rewrites it, writing
    every field around the seed."""
    attempts: int = Field(3, ge=1, le=10)
    """Steps 1-2: tries (distinct seeds) of a context or seed list that is rejected (truncated, or an item cut
    at its maxLength by the quality gate)."""
    overgenerate: float = Field(1.5, ge=1.0, le=10.0)
    """Step 3: a round asks ceil(deficit x overgenerate) instances per short label, for rejects and changes."""
    max_rounds: int = Field(4, ge=1, le=50)
    """Steps 3-4 repeat until every label reaches its target or this many rounds have run."""
    on_label_change: Literal["relabel", "drop", "keep_both"] = "relabel"
    """What a label changed by self-correction means: publish the corrected label (the paper), drop the row,
    or publish the initial label (`corrected_label` and `label_changed` beside it, as always)."""
    show_label_in_correction: bool = True
    """Step 4: show the instance's current label and explanation and ask for a recheck (the paper), or
    (False) let the model re-label blind, seeing neither."""
    few_shot: int | None = Field(None, ge=0)
    """How many of the spec's few-shot examples each prompt shows; None: all."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=200, temperature=0.8, top_p=0.95))
    """Steps 1-3. An output cut off by max_tokens is a reject ('truncated')."""
    correction_sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=200, temperature=0.0))
    """Step 4 (greedy by default: the model's own best label)."""

    @field_validator("task", mode="before")
    @classmethod
    def _load_task(cls, v: Any) -> Any:
        if isinstance(v, (str, Path)):
            try:
                return load_task(v)
            except TaskSpecError as e:
                raise PydanticCustomError("task_spec", str(e)) from None
        return v

    @model_validator(mode="after")
    def _distribution(self) -> "Config":
        if self.label_distribution is not None:
            unknown = [k for k in self.label_distribution if k not in self.task.labels]
            if unknown:
                raise PydanticCustomError("label", f"label_distribution names label(s) {', '.join(map(repr, unknown))} "
                                                   f"not in the label set of task {self.task.name} "
                                                   f"({', '.join(self.task.labels)})")
            if any(w < 0 for w in self.label_distribution.values()) or sum(self.label_distribution.values()) <= 0:
                raise PydanticCustomError("label", "label_distribution weights must be >= 0 with a positive sum, "
                                                   f"got {self.label_distribution}")
        return self


def context_requests_for(config: Config) -> int:
    """Step 1's request count: `context_requests`, or one seed per published row when not set
    (rows 100_000, 5 contexts x 4 seeds -> 5_000 requests; rows 6 -> 1)."""
    if config.context_requests is not None:
        return config.context_requests
    return max(1, math.ceil(config.rows / (config.contexts_per_request * config.seeds_per_context)))


def resolve_paths(params: dict, base: Path) -> dict:
    """A relative `task:` path is relative to the run config's folder."""
    task = params.get("task")
    if isinstance(task, str) and not Path(task).is_absolute():
        params = {**params, "task": str(base / task)}
    return params


def label_targets(rows: int, labels: list[str], distribution: dict[str, float] | None = None) -> dict[str, int]:
    """Rows per label: shares of `rows` rounded by largest remainder (ties: label order), summing to `rows`.

    >>> label_targets(7, ["a", "b", "c"])
    {'a': 3, 'b': 2, 'c': 2}
    >>> label_targets(10, ["yes", "no"], {"yes": 3, "no": 1})
    {'yes': 8, 'no': 2}
    """
    weights = {lb: (distribution or {}).get(lb, 0.0) if distribution else 1.0 for lb in labels}
    total = sum(weights.values())
    exact = {lb: rows * w / total for lb, w in weights.items()}
    counts = {lb: math.floor(x) for lb, x in exact.items()}
    by_remainder = sorted(labels, key=lambda lb: (-(exact[lb] - counts[lb]), labels.index(lb)))
    for lb in by_remainder[: rows - sum(counts.values())]:
        counts[lb] += 1
    return counts


# ================================================================================== the stages

def pipeline(config: Config, ctx: Context) -> Pipeline:
    """Steps 1-5 as declared stages: the prompts of each model stage, then the stages themselves."""
    spec = config.task
    targets = label_targets(config.rows, list(spec.labels), config.label_distribution)
    rounds = Rounds(config, ctx, targets)
    # Built once: a request's constraint is the same object for the whole stage (the backend checks it once).
    contexts_schema = list_constraint("contexts.schema.json", "contexts", config.contexts_per_request)
    seed_item = spec.fields[spec.seed_field] if spec.seed_field and config.seed_as_field else None
    seeds_schema = list_constraint("seeds.schema.json", "seeds", config.seeds_per_context, seed_item)
    label_schema = correction_constraint(list(spec.labels))
    given = spec.given(config.seed_as_field)
    generation = spec.generation_constraint(config.seed_as_field)
    instance_examples = [{"label": ex.label, "given": _json({f: ex.fields[f] for f in given}),
                          "json": _json({**{f: v for f, v in ex.fields.items() if f not in given},
                                         "explanation": ex.explanation})} for ex in _examples(config)]
    correction_examples = [{"json": _json(ex.fields), "label": ex.label, "explanation": ex.explanation,
                            "answer": _json({"explanation": ex.explanation, "label": ex.label})}
                           for ex in _examples(config)]

    def request(stage: str, user: str, constraint: Constraint, sampling: Sampling, seed: int, salt: Any,
                meta: dict) -> Request:
        return Request.build(stage=stage, model=ctx.model_name, messages=_messages(spec, user),
                             constraint=constraint, sampling=sampling, seed=seed, salt=salt, meta=meta)

    # 1. contexts: item = its index
    def context_request(index: int, seed: int) -> Request:
        user = render("targen/contexts.jinja", task=spec, n=config.contexts_per_request)
        return request("contexts", user, contexts_schema, config.sampling, seed, index, {"index": index})

    # 2. seeds: item = (context row, index in its list, context), per distinct context
    def seed_request(item: tuple[dict, int, str], seed: int) -> Request:
        row, i, context = item
        user = render("targen/seeds.jinja", task=spec, context=context, n=config.seeds_per_context)
        return request("seeds", user, seeds_schema, config.sampling, seed, [row["key"], i],
                       {"context_key": row["key"], "context_index": i, "context": context})

    # 3. instances: item = {round, label, attempt j of that label over all rounds, seed j mod #seeds}
    def instance_items(reader, round_: int) -> list[dict]:
        seeds = distinct_items(reader.rows("seeds"), "seeds")
        if not seeds:
            raise MethodError(f"targen: no valid instance seeds in {reader.out} (see rejects/seeds/); "
                              "raise context_requests or seeds_per_context")
        *before, wanted = rounds.plans(reader, round_)
        items = []
        for label in spec.labels:
            issued = sum(plan.get(label, 0) for plan in before)
            items += [{"round": round_, "label": label, "attempt": j, "seed": seeds[j % len(seeds)]}
                      for j in range(issued, issued + wanted.get(label, 0))]
        return items

    def given_fields(seed_text: str, attempt: int) -> dict:
        """The seed as its field, and each drawn field's value: attempt j of a label takes value j mod n, so
        every label gets each value equally often (COPA: cause, effect, cause, ...)."""
        out = {spec.seed_field: seed_text} if spec.seed_field in given else {}
        return {**out, **{f: values[attempt % len(values)] for f, values in spec.drawn.items()}}

    def instance_request(item: dict, seed: int) -> Request:
        seed_row_, seed_index, seed_text = item["seed"]
        label, fixed = item["label"], given_fields(seed_text, item["attempt"])
        user = render("targen/instance.jinja", task=spec, examples=instance_examples, label=label,
                      meaning=spec.labels[label].meaning, context=seed_row_["context"], seed=seed_text,
                      given=_json(fixed) if fixed else None, fields=[f for f in spec.fields if f not in fixed])
        constraint = spec.generation_constraint(config.seed_as_field, fixed) if spec.spans else generation
        return request("instances", user, constraint, config.sampling, seed, [label, item["attempt"]],
                       {"round": item["round"], "target_label": label, "attempt": item["attempt"], "given": fixed,
                        "context_key": seed_row_["context_key"], "context": seed_row_["context"],
                        "seed_key": seed_row_["key"], "seed_index": seed_index, "seed": seed_text})

    # 4. corrections: item = an instance row
    def correction_request(instance: dict, seed: int) -> Request:
        shown = config.show_label_in_correction
        user = render("targen/correct.jinja", task=spec, examples=correction_examples, shown=shown,
                      instance=_json(instance["fields"]), explanation=instance["explanation"],
                      label=instance["target_label"])
        return request("corrections", user, label_schema, config.correction_sampling, seed, instance["key"],
                       {"instance_key": instance["key"], "round": instance["round"],
                        "initial_label": instance["target_label"]})

    # 5. the dataset: published rows, and (row, reason) rejects
    def dataset_rows(reader, round_: int) -> list:
        kept, rejects = rounds.dataset(reader)
        return [*kept, *rejects]

    return Pipeline(
        stages=[
            Generate("contexts", items=lambda: range(context_requests_for(config)), request=context_request,
                     parse=context_row, constraints=(contexts_schema,), attempts=config.attempts),
            Generate("seeds", reads=Whole("contexts"),
                     items=lambda reader, round_: distinct_items(reader.rows("contexts"), "contexts"),
                     ident=lambda item: [item[0]["key"], item[1]], request=seed_request, parse=seed_row,
                     constraints=(seeds_schema,), attempts=config.attempts),
            Generate("instances", reads=Whole("seeds", "instances", "corrections"), rounds=config.max_rounds,
                     items=instance_items, ident=lambda item: [item["label"], item["attempt"]],
                     request=instance_request, parse=instance_row(spec), constraints=(generation,),
                     gates=("choices_not_distinct",) if choice_groups(spec) else ()),
            Generate("corrections", reads=Each("instances"), items=lambda instance: [instance],
                     request=correction_request, parse=correction_row, constraints=(label_schema,)),
            Compute("dataset", reads=Whole("instances", "corrections"), rows=dataset_rows, figures=rounds.figures),
        ],
        publish=Publish("dataset", text_fields=spec.text_field_names()))


# ================================================================================== rounds and the dataset

class Rounds:
    """Steps 3-5 over the committed rows: what each round asks for, the dataset, and its figures.

    Round r's plan (requests per short label) depends on the rows of rounds < r only, so every launch and every
    replica computes the same one; a plan is cached by its inputs (the keys it was computed from)."""

    def __init__(self, config: Config, ctx: Context, targets: dict[str, int]) -> None:
        self.config, self.ctx, self.targets = config, ctx, targets
        self._plans: dict[tuple, dict[str, int]] = {}

    def plans(self, reader, upto: int) -> list[dict[str, int]]:
        """Requests per short label for rounds 1..upto; {} for a round with nothing to ask."""
        instances, corrections = reader.rows("instances"), reader.rows("corrections")
        survivors = self._survivors(reader)
        return [self._plan(instances, corrections, q, survivors) for q in range(1, upto + 1)]

    def _plan(self, instances: list[dict], corrections: list[dict], round_: int,
              survivors: Callable[[list[dict]], list[dict]]) -> dict[str, int]:
        before = [i for i in instances if i["round"] < round_]
        keys = {i["key"] for i in before}
        checked = [c for c in corrections if c["instance_key"] in keys]
        last = {i["key"] for i in before if i["round"] == round_ - 1}
        if last and not any(c["instance_key"] in last for c in checked):
            return {}  # round r-1 has no corrections at all: stopped after "instances"; later rounds need them
        inputs = (round_, stable_hash(sorted(keys)), stable_hash(sorted(c["key"] for c in checked)))
        if inputs not in self._plans:
            rows = candidates(self.config, self.ctx, before, checked, before_round=round_)
            kept, _ = select(self.config, rows, self.targets, survivors)
            have = {lb: sum(r["label"] == lb for r in kept) for lb in self.targets}
            self._plans[inputs] = {lb: math.ceil((n - have[lb]) * self.config.overgenerate)
                                   for lb, n in self.targets.items() if have[lb] < n}
        return self._plans[inputs]

    def dataset(self, reader) -> tuple[list[dict], list[tuple[dict, str]]]:
        """(published rows, [(row, reject reason)]) from every instance with a valid correction."""
        rows = candidates(self.config, self.ctx, reader.rows("instances"), reader.rows("corrections"))
        return select(self.config, rows, self.targets, self._survivors(reader))

    def figures(self, reader) -> dict:
        """The dataset's figures for the manifest (recorded once, when the stage is first written)."""
        labels = list(self.config.task.labels)
        kept, _ = self.dataset(reader)
        corrections = reader.rows("corrections")
        plans = self.plans(reader, self.config.max_rounds)
        rounds = next((q for q, plan in enumerate(plans) if not plan), len(plans))
        counts = {lb: sum(r["label"] == lb for r in kept) for lb in labels}
        for lb in labels:
            if counts[lb] < self.targets[lb]:
                log.warning("targen: label %r has %d of %d rows after %d rounds; raise max_rounds or overgenerate",
                            lb, counts[lb], self.targets[lb], rounds)
        n = max(len(kept), 1)
        flips = {lb: [c["label_changed"] for c in corrections if c["initial_label"] == lb] for lb in labels}
        return {"rows": len(kept), "rounds": rounds,
                "shortfall": sum(max(0, self.targets[lb] - counts[lb]) for lb in labels),
                "distinct_contexts": len(distinct_items(reader.rows("contexts"), "contexts")),
                "distinct_seeds": len(distinct_items(reader.rows("seeds"), "seeds")),
                "label_changed_rate": round(sum(r["label_changed"] for r in kept) / n, 4),
                "flip_rate": _rate([c["label_changed"] for c in corrections]),
                **{f"flip_rate_{lb}": _rate(flips[lb]) for lb in labels},
                "checked": len(corrections), "flipped": sum(c["label_changed"] for c in corrections),
                **{f"flipped_{lb}": sum(flips[lb]) for lb in labels},
                **{f"rows_{lb}": counts[lb] for lb in labels}, **{f"target_{lb}": self.targets[lb] for lb in labels}}

    def _survivors(self, reader) -> Callable[[list[dict]], list[dict]]:
        fields = self.config.task.text_field_names()
        return lambda rows: reader.survivors(rows, fields)


def candidates(config: Config, ctx: Context, instances: list[dict], corrections: list[dict],
               before_round: int | None = None) -> list[dict]:
    """Published-row candidates, one per instance that has a valid correction (rounds < before_round),
    with `label` set by `on_label_change`, sorted by key."""
    by_instance = {c["instance_key"]: c for c in corrections}
    out = []
    for inst in instances:
        c = by_instance.get(inst["key"])
        if c is None or (before_round is not None and inst["round"] >= before_round):
            continue
        label = c["corrected_label"] if config.on_label_change == "relabel" else inst["target_label"]
        derived = DERIVE[config.task.derive](inst["fields"], label, inst["target_label"]) if config.task.derive else {}
        out.append({"key": inst["key"], "task": config.task.name, **inst["fields"], **inst["spans"], **derived,
                    "label": label, "initial_label": inst["target_label"], "corrected_label": c["corrected_label"],
                    "label_changed": c["label_changed"], "explanation": c["explanation"],
                    "initial_explanation": inst["explanation"], "round": inst["round"],
                    "context_key": inst["context_key"], "context": inst["context"], "seed_key": inst["seed_key"],
                    "seed": inst["seed"], "instance_key": inst["key"], "correction_key": c["key"],
                    "model": ctx.model_name, "sampling_seed": inst["sampling_seed"]})
    return sorted(out, key=lambda r: r["key"])


def select(config: Config, rows: list[dict], targets: dict[str, int],
           survivors: Callable[[list[dict]], list[dict]] | None = None) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(published rows, [(row, reject reason)]): `drop` removes changed labels, `survivors` (the publish
    filters' preview: engine.pipeline.core.Reader.survivors) removes duplicates, then each label keeps its first
    `target` rows by key; the rest are 'surplus'."""
    rejects: list[tuple[dict, str]] = []
    if config.on_label_change == "drop":
        rejects += [(r, "label_changed") for r in rows if r["label_changed"]]
        rows = [r for r in rows if not r["label_changed"]]
    if survivors is not None:
        kept_keys = {r["key"] for r in survivors(rows)}
        rejects += [(r, "quality_filter") for r in rows if r["key"] not in kept_keys]
        rows = [r for r in rows if r["key"] in kept_keys]
    kept: list[dict] = []
    per_label: dict[str, int] = {}
    for r in rows:
        per_label[r["label"]] = per_label.get(r["label"], 0) + 1
        if per_label[r["label"]] <= targets.get(r["label"], 0):
            kept.append(r)
        else:
            rejects.append((r, "surplus"))
    return kept, rejects


# ================================================================================== parsers

def context_row(request: Request, result: Result) -> tuple[dict, str | None]:
    row = {"key": result.key, "index": request.meta["index"], "sampling_seed": request.seed,
           "contexts": (result.parsed or {}).get("contexts") if result.valid else None, "output": result.text}
    return row, _invalid(result)


def seed_row(request: Request, result: Result) -> tuple[dict, str | None]:
    row = {**request.meta, "key": result.key, "sampling_seed": request.seed,
           "seeds": (result.parsed or {}).get("seeds") if result.valid else None, "output": result.text}
    return row, _invalid(result)


_CHOICE = re.compile(r"^(?:choice|option|alternative|answer)_?(?:\d+|[a-e])$", re.IGNORECASE)


def choice_groups(spec: TaskSpec) -> list[list[str]]:
    """Fields that must differ for the `choices_not_distinct` gate: the spec's `distinct` groups (COPA: premise,
    choice1, choice2), and the multiple-choice fields by name (choice1, option_b, answer_c, ...) if no group
    already holds them all."""
    groups = [list(g) for g in spec.distinct]
    named = [f for f, schema in spec.fields.items() if _CHOICE.match(f) and schema.get("type") == "string"]
    if len(named) > 1 and not any(set(named) <= set(g) for g in groups):
        groups.append(named)
    return groups


def instance_row(spec: TaskSpec):
    """Parse an instance: a reject when invalid, when two choices (or a choice and the premise) are equal once
    normalized (gate `choices_not_distinct`, engine.quality.gates.not_distinct), or when it breaks the spec's
    other checks ("check: ...")."""
    groups = choice_groups(spec)

    def to_row(request: Request, result: Result) -> tuple[dict, str | None]:
        meta = {k: v for k, v in request.meta.items() if k != "given"}
        row = {**meta, "key": result.key, "sampling_seed": request.seed, "fields": None, "explanation": None,
               "spans": {}, "output": result.text}
        if not result.valid:
            return row, _invalid(result)
        written = {k: v for k, v in result.parsed.items() if k != "explanation"}
        fields = {f: {**request.meta["given"], **written}[f] for f in spec.fields}  # the spec's field order
        row.update(fields=fields, explanation=result.parsed["explanation"])
        same = gates.not_distinct(fields, groups)
        broken = spec.check(fields)
        row["spans"], missing = spec.locate(fields)
        return row, same or (f"check: {broken}" if broken else missing)
    return to_row


def correction_row(request: Request, result: Result) -> tuple[dict, str | None]:
    parsed = result.parsed if result.valid else {}
    row = {**request.meta, "key": result.key, "sampling_seed": request.seed,
           "corrected_label": parsed.get("label"), "explanation": parsed.get("explanation"),
           "label_changed": result.valid and parsed["label"] != request.meta["initial_label"],
           "output": result.text}
    return row, _invalid(result)


# ================================================================================== helpers

@lru_cache(maxsize=8)
def _grammar(name: str) -> str:
    """A grammars/targen/ schema file, checked against the meta-schema on first load (as JSON text)."""
    return json.dumps(Constraint.json_schema(GRAMMARS / name).spec)


def list_constraint(name: str, field: str, n: int, item: dict | None = None) -> Constraint:
    """grammars/targen/<name> with exactly `n` items in its list `field`, each of schema `item` if given (a seed
    that becomes a field holds that field's schema)."""
    schema = json.loads(_grammar(name))
    schema["properties"][field].update(minItems=n, maxItems=n)
    if item is not None:
        schema["properties"][field]["items"] = item
    return Constraint.json_schema(schema)


def correction_constraint(labels: list[str]) -> Constraint:
    schema = json.loads(_grammar("correction.schema.json"))
    schema["properties"]["label"]["enum"] = list(labels)
    return Constraint.json_schema(schema)


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def distinct_items(rows: list[dict], field: str) -> list[tuple[dict, int, str]]:
    """(row, index, text) for each item of each row's list `field`, first occurrence only (case and spacing
    ignored), rows in key order: `[{"xs": ["A", "b"]}, {"xs": ["a "]}] -> [(r0, 0, "A"), (r0, 1, "b")]`."""
    seen: set[str] = set()
    out = []
    for row in rows:
        for i, text in enumerate(row[field]):
            if _norm(text) and _norm(text) not in seen:
                seen.add(_norm(text))
                out.append((row, i, text))
    return out


def _messages(spec: TaskSpec, user: str) -> list[dict]:
    return [{"role": "system", "content": render("targen/system.jinja", task=spec)},
            {"role": "user", "content": user}]


def _examples(config: Config) -> list[Example]:
    return config.task.few_shot[: config.few_shot] if config.few_shot is not None else config.task.few_shot


def _rate(flags: list[bool]) -> float:
    """Share of True in `flags`, 4 decimals; 0.0 for none."""
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _invalid(result: Result) -> str | None:
    return None if result.valid else (result.reason or "invalid")


def _export_superglue(run_dir: Path, to: Path) -> int:
    """`sdg export RUN --format superglue`: the official SuperGLUE layout of the run's task."""
    from engine.methods.targen_superglue import export
    return export(run_dir, to)


EXPORTS = {"superglue": _export_superglue}
