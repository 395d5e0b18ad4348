"""The TDG template language: a pydantic model, its loader, and the checked form the compiler uses.

A template is JSON (schema: grammars/tdg/meta_template.schema.json), for example

    {"skill": "percent",
     "variables": [{"name": "name", "type": "choice", "list": "names"},
                   {"name": "price", "type": "integer", "min": 20, "max": 200, "step": 10},
                   {"name": "off", "type": "integer", "min": 10, "max": 50, "step": 5}],
     "constraints": ["price * off % 100 == 0"],
     "problem": "{name} buys a coat that costs ${price}. It is {off}% off. How much does {name} pay?",
     "steps": [{"name": "saving", "expr": "price * off / 100", "text": "The discount is {saving} dollars."},
               {"name": "paid", "expr": "price - saving", "text": "{name} pays {price} - {saving} = {paid}."}],
     "answer": {"expr": "paid", "type": "integer", "places": 0}}

Variables are integer or decimal ranges (min..max by step) or a word from a named list shipped in
data/tdg/words/<list>.txt. `{...}` in the problem and step texts is a placeholder: a word variable's name, or a
numeric expression (engine.methods.tdg.expr) over the variables (and, in step texts, the steps computed so far).

`check_template(raw)` turns raw JSON into a `CheckedTemplate` or raises `TemplateError(code, message)`; codes:
schema, parse_error, unsafe_expression, unknown_name, type_error.
"""
from __future__ import annotations

import json
import keyword
import re
import builtins
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.request import stable_hash
import engine.methods.tdg.expr as X

DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "tdg"
"""Shipped TDG data: words/*.txt, seed_templates.jsonl, examples.jsonl."""
SCHEMA_PATH = Path(__file__).resolve().parents[3] / "grammars" / "tdg" / "meta_template.schema.json"
"""The meta-template JSON Schema the model is constrained by."""

MAX_VALUES_PER_VARIABLE = 10**6
"""Most distinct values one numeric variable may take."""
MAX_DECIMAL_PLACES = 4
"""Finest decimal step: 0.0001."""
RESERVED = (frozenset(X.FUNCTIONS) | frozenset(dir(builtins)) | frozenset(keyword.kwlist)
            | {"math", "result", "solution", "fraction", "round_half_up"})
"""Names a variable or step may not take (keywords, or they would shadow something in solution_code)."""
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class TemplateError(ValueError):
    """A template that cannot be accepted; `code` is the verifier's reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntegerVar(_Strict):
    """An integer drawn uniformly from min, min+step, ..., <= max."""
    name: str
    type: Literal["integer"]
    min: int
    max: int
    step: int = 1


class DecimalVar(_Strict):
    """A decimal drawn uniformly from min, min+step, ..., <= max; shown with as many places as `step` has."""
    name: str
    type: Literal["decimal"]
    min: float
    max: float
    step: float


class ChoiceVar(_Strict):
    """A word drawn uniformly from data/tdg/words/<list>.txt."""
    name: str
    type: Literal["choice"]
    list: str


Variable = Annotated[Union[IntegerVar, DecimalVar, ChoiceVar], Field(discriminator="type")]


class Step(_Strict):
    """One solution step: `name = expr`, explained by `text` (placeholders allowed)."""
    name: str
    expr: str
    text: str


class Answer(_Strict):
    """The final answer: an expression and its type; `places` is the most decimal places of a decimal answer."""
    expr: str
    type: Literal["integer", "decimal", "fraction"]
    places: int = Field(0, ge=0, le=MAX_DECIMAL_PLACES)


class Template(_Strict):
    """A meta-template, as written by a model or by us (seed library)."""
    skill: str = Field("", max_length=60)
    variables: list[Variable] = Field(min_length=1, max_length=10)
    constraints: list[str] = Field(default_factory=list, max_length=8)
    problem: str = Field(min_length=10, max_length=1000)  # GSM8K-length problems (the longest are ~900)
    steps: list[Step] = Field(default_factory=list, max_length=10)
    answer: Answer

    @field_validator("variables")
    @classmethod
    def _unique(cls, v):
        names = [x.name for x in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate variable names: {sorted(dup)}")
        return v


@lru_cache(maxsize=None)
def word_lists() -> dict[str, tuple[str, ...]]:
    """{list name: words} from data/tdg/words/*.txt (one word or phrase a line, '#' comments); `names` also
    holds Faker's en_US first names (about 700: with our 40 alone, 1,000 instances of a one-name template
    repeat names constantly). Faker's lists are static data in the package, so the draws stay reproducible."""
    out = {}
    for path in sorted((DATA_DIR / "words").glob("*.txt")):
        words = tuple(w.strip() for w in path.read_text().splitlines() if w.strip() and not w.startswith("#"))
        out[path.stem] = words
    from faker.providers.person.en_US import Provider as Person
    out["names"] = tuple(dict.fromkeys(out.get("names", ()) + tuple(Person.first_names)))
    return out


# -- the checked form ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NumVar:
    """A numeric variable's value set: value(i) = lo + step * i for i in range(count); `places` for display."""
    name: str
    lo: int | Fraction
    step: int | Fraction
    count: int
    places: int  # 0 for integers

    def value(self, i: int) -> int | Fraction:
        v = self.lo + self.step * i
        return v.numerator if isinstance(v, Fraction) and v.denominator == 1 and self.places == 0 else v


@dataclass(frozen=True)
class WordVar:
    name: str
    list: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Word:
    """A placeholder naming a word variable."""
    name: str


Part = Union[str, X.Expr, Word]  # a text segment, a numeric placeholder, or a word placeholder


@dataclass(frozen=True)
class CheckedStep:
    name: str
    expr: X.Expr
    text: tuple[Part, ...]


@dataclass(frozen=True)
class CheckedTemplate:
    """A template whose every expression passed the whitelist, with its text split into parts."""
    template: Template
    template_id: str
    source: str
    numeric: tuple[NumVar, ...]
    words: tuple[WordVar, ...]
    constraints: tuple[X.Expr, ...]
    problem: tuple[Part, ...]
    steps: tuple[CheckedStep, ...]
    answer: X.Expr
    raw: dict = field(compare=False, default_factory=dict)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.numeric)

    def problem_names(self) -> set[str]:
        """Variables the problem text shows (numeric through placeholders, words by name)."""
        out = set()
        for p in self.problem:
            out |= {p.name} if isinstance(p, Word) else set(p.names) if isinstance(p, X.Expr) else set()
        return out


def template_id_of(raw: dict) -> str:
    """Stable id: 'tdg-' + hash of the canonical JSON (sorted keys), the same on every machine."""
    return "tdg-" + stable_hash(raw, length=12)


def _exact(x: float) -> Fraction:
    return Fraction(Decimal(repr(x)))


def _places(x: Fraction) -> int:
    for p in range(MAX_DECIMAL_PLACES + 1):
        if (x * 10**p).denominator == 1:
            return p
    raise TemplateError("schema", f"decimal step {float(x)} has more than {MAX_DECIMAL_PLACES} places")


def split_text(text: str, *, numeric: set[str], words: set[str], where: str) -> tuple[Part, ...]:
    """'{name} has {a + b} pens' -> (Word('name'), ' has ', Expr('a + b'), ' pens'). Braces must pair."""
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        inner = m.group(1).strip()
        if inner in words:
            parts.append(Word(inner))
        else:
            try:
                parts.append(X.parse(inner, names=numeric, kind="num"))
            except X.ExprError as e:
                raise TemplateError(e.code, f"{where}: placeholder {{{inner}}}: {e.detail}") from None
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts if isinstance(p, str)):
        raise TemplateError("parse_error", f"{where}: unbalanced or nested braces")
    if rest:
        parts.append(rest)
    return tuple(parts)


def check_template(raw: dict | str | Template, *, source: str = "model") -> CheckedTemplate:
    """Validate a template and parse every expression; raises TemplateError with a reason code."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TemplateError("parse_error", f"not JSON: {e.msg}") from None
    if isinstance(raw, Template):
        tpl = raw
        raw = tpl.model_dump()
    else:
        if not isinstance(raw, dict):
            raise TemplateError("schema", f"a template is a JSON object, got {type(raw).__name__}")
        try:
            tpl = Template.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(map(str, err["loc"]))
            raise TemplateError("schema", f"{loc}: {err['msg']}") from None
    lists = word_lists()
    numeric: list[NumVar] = []
    wordvars: list[WordVar] = []
    for v in tpl.variables:
        if not X.NAME_RE.fullmatch(v.name) or v.name in RESERVED:
            raise TemplateError("schema", f"variable name {v.name!r} not allowed")
        if isinstance(v, ChoiceVar):
            if v.list not in lists:
                raise TemplateError("schema", f"variable {v.name}: unknown word list {v.list!r}; "
                                              f"known: {', '.join(sorted(lists))}")
            wordvars.append(WordVar(v.name, v.list, lists[v.list]))
            continue
        if isinstance(v, IntegerVar):
            lo, hi, step, places = v.min, v.max, v.step, 0
        else:
            lo, hi, step = _exact(v.min), _exact(v.max), _exact(v.step)
            places = max(_places(step), _places(lo))
        if step <= 0 or hi < lo:
            raise TemplateError("schema", f"variable {v.name}: need min <= max and step > 0, got "
                                          f"{v.min}..{v.max} step {v.step}")
        count = int((hi - lo) // step) + 1
        if count > MAX_VALUES_PER_VARIABLE:
            raise TemplateError("schema", f"variable {v.name}: {count} values, at most {MAX_VALUES_PER_VARIABLE}")
        numeric.append(NumVar(v.name, lo, step, count, places))
    num_names = {v.name for v in numeric}
    word_names = {v.name for v in wordvars}

    def parse(src: str, names: set[str], kind: str, where: str) -> X.Expr:
        try:
            return X.parse(src, names=names, kind=kind)
        except X.ExprError as e:
            raise TemplateError(e.code, f"{where}: {e.detail} in {src!r}") from None

    constraints = tuple(parse(c, num_names, "bool", f"constraint {i}") for i, c in enumerate(tpl.constraints))
    problem = split_text(tpl.problem, numeric=num_names, words=word_names, where="problem")
    known = set(num_names)
    steps = []
    for i, s in enumerate(tpl.steps):
        if not X.NAME_RE.fullmatch(s.name) or s.name in RESERVED:
            raise TemplateError("schema", f"step name {s.name!r} not allowed")
        if s.name in known or s.name in word_names:
            raise TemplateError("schema", f"step {i}: name {s.name!r} already used")
        e = parse(s.expr, known, "num", f"step {s.name}")
        known.add(s.name)
        steps.append(CheckedStep(s.name, e, split_text(s.text, numeric=known, words=word_names,
                                                       where=f"step {s.name} text")))
    answer = parse(tpl.answer.expr, known, "num", "answer")
    return CheckedTemplate(template=tpl, template_id=template_id_of(raw), source=source, numeric=tuple(numeric),
                           words=tuple(wordvars), constraints=constraints, problem=problem, steps=tuple(steps),
                           answer=answer, raw=raw)


def load_templates(path: str | Path, *, source: str = "seed") -> list[CheckedTemplate]:
    """Checked templates from a jsonl file (one template a line); an error names the line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(check_template(json.loads(line), source=source))
        except (TemplateError, json.JSONDecodeError) as e:
            raise TemplateError(getattr(e, "code", "parse_error"), f"{path}:{i}: {e}") from None
    return out


def seed_templates() -> list[CheckedTemplate]:
    """The seed library shipped in data/tdg/seed_templates.jsonl."""
    return load_templates(DATA_DIR / "seed_templates.jsonl", source="seed")
