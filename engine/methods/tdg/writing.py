"""Template writing in two constrained requests, then a critique-and-revise round (TDG's `writing: two_phase`).

One request per template, as the paper asks GPT-4, fails a small model at the grammar of the template: names
it never declared, expressions that do not parse, ranges whose step does not divide them. Here the constraint
does that work, so those rejects cannot happen:

  1. Variables.  grammars/tdg/variables.schema.json: names, and integer ranges written as (min, count, step), so
     max = min + step x (count - 1) is consistent by construction; word variables name one of our word lists.
  2. Text.  A schema built from THOSE names (`text_schema`): the problem text may hold only `{name}` placeholders
     of the declared variables and must hold each of them (in their declared order) and end with a question
     mark; the steps are step1, step2, ... (prefixItems), each an expression over the variables and the earlier
     steps, in a regular language of numbers, names, + - * / % and one level of parentheses; its explanation may
     name the variables and the steps up to itself; the answer is the last step (its type and places are
     written, not its name: a named answer could be a step that was never written, an unknown name).
  3. Critique and revise (the paper's revision round).  The model sees the draft with one instance of it (a
     problem and the answer our verifier computed) or, when the draft was rejected, the verifier's reason; it
     judges the draft (correct / wrong) and writes the text again under the same schema. The revision is
     verified again; the final template is the revision when it verifies, else the draft when it did.

The verifier (verify.py) is the same as for one-request templates: its rules do not change with the writing.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable

from engine.methods.tdg.template import DATA_DIR, RESERVED as VERIFIER_RESERVED, word_lists

GRAMMARS = Path(__file__).resolve().parents[3] / "grammars" / "tdg"
VARIABLES_SCHEMA = GRAMMARS / "variables.schema.json"
MAX_STEPS = 4
SEGMENT = 70  # most characters between two placeholders of a problem text: 5 variables stay under the
# verifier's 1,000 characters (a GSM8K problem is ~200 in all)
RESERVED = VERIFIER_RESERVED | {"true", "false", "none"}
"""The names the verifier refuses for a variable (its own set: keywords, the expression functions, Python's
builtins, the names solution_code defines), so a name passed here is never its schema reject; and, as the
writing always reserved them, true/false/none, which read as constants. A variable the model names so
(`range`, `sum`, `max`) is renamed, not rejected (`rename_reserved`)."""
NUMBER = r"[1-9][0-9]{0,3}"  # no zero literal: no division or modulo by a literal zero


# -------------------------------------------------------------------------------------------- the languages
def _alternatives(names: Iterable[str]) -> str:
    """A regex group matching exactly one of `names` (longest first, so 'price2' is not read as 'price')."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(set(names), key=lambda n: (-len(n), n))) + ")"


def expr_pattern(names: Iterable[str]) -> str:
    """Arithmetic over `names` and whole numbers that names at least one of `names` (an expression of numbers
    alone computes nothing from the variables): + - * / % between operands, one level of parentheses.

    >>> p = expr_pattern(["a", "b"])
    >>> bool(re.fullmatch(p, "(a + 3) * b / 2")), bool(re.fullmatch(p, "c")), bool(re.fullmatch(p, "2 * 3"))
    (True, False, False)
    """
    name = _alternatives(names)
    term = f"(?:{name}|{NUMBER})"
    group = f"\\({term}(?: [-+*/] {term}){{1,3}}\\)"
    named_group = f"\\((?:{term} [-+*/] ){{0,2}}{name}(?: [-+*/] {term}){{0,2}}\\)"
    atom, named = f"(?:{term}|{group})", f"(?:{name}|{named_group})"
    return f"(?:{atom} [-+*/%] ){{0,3}}{named}(?: [-+*/%] {atom}){{0,3}}"


def covering_pattern(names: Iterable[str], required: list[str]) -> str:
    """A flat expression (no parentheses) over `names` and whole numbers that uses every one of `required`, in
    that order, with up to two other operands around each: the first step of a template, so that every number
    the problem gives goes into the answer (a variable shown but unused is the commonest reject otherwise).

    >>> p = covering_pattern(["price", "off", "step1"], ["price", "off"])
    >>> bool(re.fullmatch(p, "price * off / 100")), bool(re.fullmatch(p, "off * price")), bool(re.fullmatch(p, "price"))
    (True, False, False)
    """
    term, op = f"(?:{_alternatives(names)}|{NUMBER})", " [-+*/%] "
    pattern = f"(?:{term}{op}){{0,2}}"
    for i, name in enumerate(required):
        if i:
            pattern += f"(?:{op}{term}){{0,2}}{op}"
        pattern += re.escape(name)
    return pattern + f"(?:{op}{term}){{0,2}}"


def constraint_pattern(numeric: list[str]) -> str:
    """The two kinds of condition a template needs, and no others: divisibility, so that an answer is whole
    ("price * off % 100 == 0"), and an order between two different variables ("bill > cost"). A condition that
    pins a variable ("speed == 10") is what a small model writes otherwise, and no draw satisfies it.

    >>> p = constraint_pattern(["a", "b"])
    >>> [bool(re.fullmatch(p, c)) for c in ("a * b % 100 == 0", "b > a", "a == 10", "a > a")]
    [True, True, False, False]
    """
    term = f"(?:{_alternatives(numeric)}|{NUMBER})"
    divisible = f"{_alternatives(numeric)}(?: [-+*] {term})? % {term} == 0"
    pairs = [f"{re.escape(a)} [<>] {re.escape(b)}" for a in numeric for b in numeric if a != b]
    return f"(?:{divisible}|{'|'.join(pairs)})" if pairs else divisible


def problem_pattern(variables: list[str]) -> str:
    """Text whose only placeholders are `{variable}`, holding every variable (first uses in declared order),
    ending with a question mark.

    >>> p = problem_pattern(["name", "n"])
    >>> bool(re.fullmatch(p, "{name} has {n} pens. {name} gives one away. How many are left?"))
    True
    >>> bool(re.fullmatch(p, "{n} pens for {name}?")), bool(re.fullmatch(p, "{name} has {k} pens?"))
    (False, False)
    """
    # Bounded repetitions, not maxLength: llguidance cannot intersect a maxLength with a pattern this size
    # ("unable to determine if regex is empty"). A small model's run-on text stops at the bound.
    text = f"[^{{}}\\n]{{1,{SEGMENT}}}"
    again = r"(?:\{" + _alternatives(variables) + r"\}" + text + ")?"  # a variable named again, then text
    pattern = f"[^{{}}\\n]{{0,{SEGMENT}}}"
    for v in variables:
        pattern += r"\{" + re.escape(v) + r"\}" + f"(?:{text}{again})?"
    return pattern + r"\?"


def explanation_pattern(names: list[str]) -> str:
    """A sentence whose placeholders are `{name}` of `names`."""
    placeholder = r"\{" + _alternatives(names) + r"\}"
    tail = f"(?:{placeholder}[^{{}}\\n]{{0,60}})"  # the whole is bounded by the schema's maxLength (160)
    return f"(?:[^{{}}\\n]{{1,80}}{tail}{{0,4}}|{tail}{{1,5}})"  # not empty; starts with text or a placeholder


def step_names(n: int = MAX_STEPS) -> list[str]:
    return [f"step{i}" for i in range(1, n + 1)]


def text_schema(variables: list[dict]) -> dict:
    """The JSON Schema of the second request for these variables (see the module docstring)."""
    names = [v["name"] for v in variables]
    numeric = [v["name"] for v in variables if v["type"] != "choice"]
    steps = step_names()
    first = covering_pattern(numeric, numeric)
    prefix = [{"type": "object",
               "properties": {"name": {"const": step},
                              "expr": {"type": "string", "maxLength": 100,
                                       "pattern": f"^{first if i == 0 else expr_pattern(numeric + steps[:i])}$"},
                              "text": {"type": "string", "maxLength": 160,
                                       "pattern": f"^{explanation_pattern(names + steps[:i + 1])}$"}},
               "required": ["name", "expr", "text"], "additionalProperties": False}
              for i, step in enumerate(steps)]
    comparison = f"^{constraint_pattern(numeric)}$"
    return {
        "type": "object",
        "properties": {
            "problem": {"type": "string", "pattern": f"^{problem_pattern(names)}$"},
            "constraints": {"type": "array", "maxItems": 2, "items": {"type": "string", "pattern": comparison}},
            "steps": {"type": "array", "minItems": 1, "maxItems": MAX_STEPS, "prefixItems": prefix,
                      "items": False},
            "answer": {"type": "object",
                       "properties": {"type": {"enum": ["integer", "decimal", "fraction"]},
                                      "places": {"type": "integer", "minimum": 0, "maximum": 2}},
                       "required": ["type", "places"], "additionalProperties": False},
        },
        "required": ["problem", "constraints", "steps", "answer"],
        "additionalProperties": False,
    }


def revision_schema(variables: list[dict]) -> dict:
    """The critique-and-revise answer: a verdict on the draft, then the text written again."""
    schema = text_schema(variables)
    return {**schema, "properties": {"verdict": {"enum": ["correct", "wrong"]}, **schema["properties"]},
            "required": ["verdict", *schema["required"]]}


def variables_schema() -> dict:
    """grammars/tdg/variables.schema.json with our word lists as the `list` enum."""
    schema = json.loads(VARIABLES_SCHEMA.read_text())
    choice = schema["properties"]["variables"]["items"]["anyOf"][1]
    choice["properties"]["list"] = {"enum": sorted(word_lists())}
    return schema


# -------------------------------------------------------------------------------------------- parsing
def as_ranges(variables: list[dict]) -> list[dict]:
    """Variables of the first request's form, integer ranges as (min, count, step), in the template's form
    (min, max, step): max = min + step x (count - 1)."""
    return [{"name": v["name"], "type": "integer", "min": v["min"], "max": v["min"] + v["step"] * (v["count"] - 1),
             "step": v["step"]} if v["type"] == "integer" else v for v in variables]


def rename_reserved(name: str) -> str:
    """`name`, or `name_` when the verifier reserves it: the schema's names are lowercase letters only, so the
    underscore can clash with no other variable, and the second request's schema enumerates the new name."""
    return f"{name}_" if name in RESERVED else name


def check_variables(parsed: dict) -> tuple[list[dict], str | None]:
    """The first request's variables with integer ranges as (min, max, step) and reserved names renamed; a
    reason when unusable (two variables with one name, or no number)."""
    variables = [{**v, "name": rename_reserved(v["name"])} for v in as_ranges(parsed["variables"])]
    names = [v["name"] for v in variables]
    if len(set(names)) != len(names):
        return variables, "duplicate_name"
    if all(v["type"] == "choice" for v in variables):
        return variables, "no_number"
    return variables, None


def assemble(skill: str, variables: list[dict], text: dict) -> dict:
    """The meta-template of variables (request 1) and text (request 2): the form the verifier checks. The
    answer is the last step."""
    steps = [{"name": s["name"], "expr": s["expr"], "text": s["text"]} for s in text["steps"]]
    return {"skill": skill, "variables": variables, "constraints": list(text["constraints"]),
            "problem": text["problem"], "steps": steps,
            "answer": {"expr": steps[-1]["name"] if steps else "", "type": text["answer"]["type"],
                       "places": text["answer"]["places"]}}


# -------------------------------------------------------------------------------------------- few-shot
@functools.lru_cache(maxsize=1)
def two_phase_examples() -> tuple[dict, ...]:
    """Seed templates written in this form (integer and word variables, steps renamed step1..., expressions
    in the constrained language): (skill, variables as (min, count, step), text) for the prompts' examples.
    Made once per process (each is checked against its schema: ~0.5 s); callers only read them."""
    out = []
    for line in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        seed = json.loads(line)
        converted = _converted(seed)
        if converted is not None:
            out.append(converted)
    return tuple(out)


def _converted(seed: dict) -> dict | None:
    if any(v["type"] == "decimal" for v in seed["variables"]) or len(seed["steps"]) > MAX_STEPS \
            or seed["answer"]["expr"] != seed["steps"][-1]["name"]:  # the answer must be the last step
        return None
    renames = {s["name"]: f"step{i}" for i, s in enumerate(seed["steps"], 1)}
    rename = lambda text: re.sub(r"\b(" + "|".join(map(re.escape, renames)) + r")\b",  # noqa: E731
                                 lambda m: renames[m[1]], text)
    order = {v["name"]: seed["problem"].find("{" + v["name"] + "}") % 10_000 for v in seed["variables"]}
    ordered = sorted(seed["variables"], key=lambda v: order[v["name"]])  # declared as the text first names them
    variables = [v if v["type"] == "choice" else
                 {"name": v["name"], "type": "integer", "min": v["min"], "count": (v["max"] - v["min"]) // v["step"] + 1,
                  "step": v["step"]} for v in ordered]
    text = {"problem": seed["problem"], "constraints": seed["constraints"],
            "steps": [{"name": renames[s["name"]], "expr": rename(s["expr"]), "text": rename(s["text"])}
                      for s in seed["steps"]],
            "answer": {"type": seed["answer"]["type"], "places": seed["answer"]["places"]}}
    schema = text_schema(as_ranges(variables))
    if not _matches(schema, text):
        return None
    return {"skill": seed["skill"], "variables": variables, "text": text}


def _matches(schema: dict, text: dict) -> bool:
    """Whether `text` is in the language of `schema` (a seed outside it is not shown as an example)."""
    import jsonschema
    try:
        jsonschema.validate(text, schema)
    except jsonschema.ValidationError:
        return False
    return True


def describe(variables: list[dict]) -> list[str]:
    """The variables as the second prompt lists them."""
    out = []
    for v in variables:
        if v["type"] == "choice":
            out.append(f"{{{v['name']}}}: a word from the list {v['list']}")
        else:
            out.append(f"{{{v['name']}}}: a whole number from {v['min']} to {v['max']} in steps of {v['step']}")
    return out


def shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
