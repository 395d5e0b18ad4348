"""What a method declares: its stages, what each reads, and the stage it publishes. The core
(engine.pipeline.core) runs them; a method never calls the backend or the store itself.

    STAGES = [
        Generate("first", items=lambda: range(8), request=first_request, parse=result_row),
        Generate("second", reads=Each("first"), items=lambda parent: [parent], request=second_request,
                 parse=result_row),
    ]
    Pipeline(STAGES, Publish("second", text_fields=["output"]))

A stage reads in one of three ways:
  - nothing (`reads=None`): a root stage; its `items()` come from the config;
  - `Each(*stages)`: per parent row: `items(parent_row)` may run as soon as that row is committed, so child
    requests enter the engine while the parent stage still runs (streaming);
  - `Whole(*stages)`: the only barrier: `items(reader, round)` runs once every replica has finished the stages
    before it, and may read whole stages (`reader.rows(stage)`). With `rounds > 1` it runs again after each
    round until it yields no items (top-up rounds until a target count is met).

Every item of a Generate stage gets up to `attempts` requests: attempt k+1 is made only when attempt k was
rejected, with its own seed. Seeds follow one scheme (engine.pipeline.core.seed_of): run seed, stage, item,
attempt. An item's identity is its position (root: [i]; Each: [parent key, i]; Whole: [round, i]) unless the
stage's `ident` says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from engine.constraints import Constraint
from engine.request import Request, Result

# (request, result) -> (row, reject reason or None)
Parse = Callable[[Request, Result], "tuple[dict, str | None]"]


@dataclass(frozen=True)
class Each:
    """Per parent row of `stages`: a child item may be issued as soon as its parent row is committed."""

    stages: tuple[str, ...]

    def __init__(self, *stages: str) -> None:
        if not stages:
            raise ValueError("Each() needs at least one parent stage")
        object.__setattr__(self, "stages", tuple(stages))


@dataclass(frozen=True)
class Whole:
    """Whole stages: the stage starts after every replica has finished all stages declared before it."""

    stages: tuple[str, ...]

    def __init__(self, *stages: str) -> None:
        object.__setattr__(self, "stages", tuple(stages))


Reads = Union[Each, Whole, None]


@dataclass
class Generate:
    """A model stage: items -> requests -> backend -> `parse` -> a row or a reject."""

    name: str
    items: Callable[..., Iterable[Any]]
    """root: items(); Each: items(parent_row); Whole: items(reader, round). Lazy iterables are welcome."""
    request: Callable[[Any, int], Request]
    """request(item, seed) -> the Request of one attempt; `seed` is the core's (seed_of)."""
    parse: Parse
    """(request, result) -> (row with the request's key as "key", reject reason or None)."""
    reads: Reads = None
    attempts: int = 1
    """Requests per item until one is accepted, each with its own seed."""
    engine: str = "main"
    """Which of the pipeline's engines serves this stage (started only when the stage has a request)."""
    ident: Callable[[Any], Any] | None = None
    """item -> a JSON-able identity that seeds and owns it; None: its position (see the module docstring)."""
    rounds: int = 1
    """Whole stages only: how many times `items` is asked (it yields nothing once the target is met)."""
    constraints: tuple[Constraint, ...] = ()
    """The output constraints of this stage's requests, where the config alone fixes them: `sdg validate`
    compiles them before a run (one built from a parent row's content can only be checked when it is met)."""
    gates: tuple[str, ...] = ()
    """Reason codes of the quality gates this stage's `parse` applies (engine.quality.gates: GLAN's
    "not_a_question", ...): the manifest counts each, zeros included, beside the generic gates the core applies
    to every Generate stage after `parse` accepts a row (cut_at_max_length, repetition)."""


@dataclass
class Compute:
    """A stage with no model: rows from a function (TDG's instantiation, GLAN's taxonomy file).

    `rows` is called like Generate's `items` and yields rows (dicts with a "key"), (row, reject reason) pairs,
    or `Rows` batches of them (one commit bookkeeping per batch: for stages of millions of rows).
    With `persist=False` the rows are not stored: they are computed again by every run (a file a person may
    edit, like GLAN's taxonomy), and only feed the stages reading them."""

    name: str
    rows: Callable[..., Iterable[Any]]
    reads: Reads = None
    persist: bool = True
    rounds: int = 1
    figures: Callable[[Any], dict] | None = None
    """reader -> figures recorded once in the manifest for this stage, after it first completes."""


@dataclass(frozen=True)
class Rows:
    """A batch of a Compute stage's rows, yielded as one item: `reasons[i]` is row i's reject reason, or None
    for an accepted row. The core looks its keys up, queues them and counts them a batch at a time, where a
    row yielded alone costs its own pass through the loop (TDG's problems: a million rows)."""

    rows: list[dict]
    reasons: list[str | None]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.reasons):
            raise ValueError(f"Rows: {len(self.rows)} rows but {len(self.reasons)} reasons")


Stage = Union[Generate, Compute]


@dataclass
class Publish:
    """The published stage and the fields that are its text (for dedup, decontamination, diversity)."""

    stage: str
    text_fields: list[str]


@dataclass
class Pipeline:
    """A method's declared stages, in order, and what it publishes; `engines` maps extra engine names (GLAN's
    "answer") to a function starting that engine (the run's own engine is "main")."""

    stages: list[Stage]
    publish: Publish
    engines: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        problems = [f"stage {n!r} is declared twice" for n in sorted({n for n in names if names.count(n) > 1})]
        for i, stage in enumerate(self.stages):
            before = names[:i]
            parents = stage.reads.stages if stage.reads is not None else ()
            if isinstance(stage.reads, Each):  # a parent must exist before its children
                problems += [f"stage {stage.name!r} reads each row of {p!r}, which is not declared before it"
                             for p in parents if p not in before]
            else:  # a whole read sees any stage as committed when the read starts
                problems += [f"stage {stage.name!r} reads {p!r}, which is not declared" for p in parents
                             if p not in names]
            if stage.rounds > 1 and not isinstance(stage.reads, Whole):
                problems.append(f"stage {stage.name!r}: rounds > 1 needs reads=Whole(...)")
            if isinstance(stage, Generate) and stage.attempts < 1:
                problems.append(f"stage {stage.name!r}: attempts must be >= 1, got {stage.attempts}")
        if self.publish.stage not in names:
            problems.append(f"the published stage {self.publish.stage!r} is not declared")
        if problems:
            raise ValueError("pipeline declaration: " + "; ".join(problems))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)
