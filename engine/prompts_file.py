"""`sdg generate`'s input: a JSONL file, one request per line.

Each line holds `prompt` (raw text) or `messages` (chat), and optionally its own constraint (`schema`: inline
object or path relative to the file; `regex`; `choices`), `max_tokens`, `temperature`, `top_p`, `seed`. Any
other field (such as `id`) is carried through to the output row. The file is read as a stream, never held
whole: `iter_lines` yields one line at a time, `check_lines` yields every bad line (line number, field, reason),
and `sdg generate` refuses a file with bad lines in one error listing all of them (`refusal`), or, with
`--on-bad-line reject`, keeps each as a reject with its reason code (`BadLine.reason`) and runs the others.

    {"id": "a1", "prompt": "Name a colour:", "choices": ["red", "green"]}
    {"messages": [{"role": "user", "content": "A person as JSON"}], "schema": "person.schema.json"}
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from engine.constraints import Constraint, ConstraintError
from engine.request import Request, Sampling


class InputError(ValueError):
    """A prompts file that cannot be used."""


class PromptLine(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    messages: list[dict] | None = None
    schema_: dict | str | None = None
    regex: str | None = None
    choices: list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _rename_schema(cls, data: Any) -> Any:
        # `schema` shadows a pydantic BaseModel attribute; accept it under its natural name.
        if isinstance(data, dict) and "schema" in data:
            data = dict(data)
            data["schema_"] = data.pop("schema")
        return data

    @model_validator(mode="after")
    def _one_input_one_constraint(self) -> "PromptLine":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("needs exactly one of 'prompt' or 'messages'")
        if sum(x is not None for x in (self.schema_, self.regex, self.choices)) > 1:
            raise ValueError("at most one of 'schema', 'regex', 'choices'")
        for m in self.messages or []:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs string 'role' and 'content'")
        return self


@dataclass(frozen=True)
class BadLine:
    """A line of the prompts file that cannot become a request, and why.

    >>> BadLine(3, "schema", "unsupported_schema", "the guidance grammar backend cannot enforce /not").reason
    'unsupported_schema: schema: the guidance grammar backend cannot enforce /not'
    """

    number: int
    """1-based line number in the file."""
    field: str
    """Where on the line: "line" (the line itself), or a field such as "schema", "max_tokens", "prompt"."""
    code: str
    """The reject reason code: malformed_json, bad_field, bad_constraint, unsupported_schema, refused_schema,
    compile_timeout, prompt_too_long."""
    detail: str
    extra: dict | None = None
    """The line's own extra fields (such as `id`), when it parsed: carried into its reject row."""

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.field}: {self.detail}"

    def row(self) -> dict:
        """What a reject of this line stores (beside its key)."""
        return {**(self.extra or {}), "line": self.number, "field": self.field, "error": self.detail}


def iter_lines(path: Path) -> Iterator[tuple[int, PromptLine | BadLine]]:
    """(line number, PromptLine or BadLine) for each non-blank line of `path`, read lazily: the file is never
    held whole. InputError if it does not exist."""
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    for number, text in iter_texts(path):
        yield number, parse_line(number, text)


def iter_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of `path`, read lazily and not parsed (counting is cheap)."""
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                yield number, text


def parse_line(number: int, text: str) -> PromptLine | BadLine:
    """One line's text -> its PromptLine, or the BadLine saying what is wrong (the first pydantic error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(number, "line", "malformed_json", f"malformed JSON ({e.msg})")
    if not isinstance(value, dict):
        return BadLine(number, "line", "malformed_json", "each line must be a JSON object")
    try:
        return PromptLine.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).replace("schema_", "schema") or "line"
        message = str(first["ctx"]["error"]) if "error" in first.get("ctx", {}) else first["msg"]
        extra = {k: v for k, v in value.items() if k not in PromptLine.model_fields and k not in ("schema", "key")}
        return BadLine(number, where, "bad_field", message, extra or None)


def read_lines(path: Path) -> list[PromptLine]:
    """Every line of a small prompts file (tests, tools); the first bad line is an InputError."""
    lines: list[PromptLine] = []
    for _, line in iter_lines(path):
        if isinstance(line, BadLine):
            raise refusal(path, [line])
        lines.append(line)
    if not lines:
        raise InputError(f"prompts file is empty: {path}")
    return lines


def refusal(path: Path, bad: list[BadLine]) -> InputError:
    """One error for a file with bad lines, listing every one of them (one line when there is one)."""
    if len(bad) == 1:
        b = bad[0]
        return InputError(f"{path}:{b.number}: {'' if b.field == 'line' else b.field + ': '}{b.detail}")
    listed = "\n".join(f"  line {b.number}: {'' if b.field == 'line' else b.field + ': '}{b.detail} [{b.code}]"
                       for b in bad)
    return InputError(f"{path}: {len(bad)} bad lines; nothing was run (fix them, or pass --on-bad-line reject to "
                      f"run the good lines and keep each bad one as a reject):\n{listed}")


def check_line(number: int, line: PromptLine | BadLine, path: Path, *, default_schema: Constraint | None = None,
               defaults: Sampling | None = None, grammar_backend: str | None = None) -> BadLine | None:
    """What is wrong with one line on its own (no model needed), or None: it parsed, its sampling overrides
    hold (against `defaults`), its constraint builds (a schema that loads and is a valid JSON Schema, a regex
    that compiles) and, with `grammar_backend`, uses no keyword that backend cannot enforce."""
    return _check(number, line, path, default_schema, defaults, grammar_backend)[0]


def _check(number: int, line: PromptLine | BadLine, path: Path, default_schema: Constraint | None,
           defaults: Sampling | None, grammar_backend: str | None) -> tuple[BadLine | None, Constraint | None]:
    from engine.backends.vllm import unsupported_features
    if isinstance(line, BadLine):
        return line, None
    extra = {k: v for k, v in (line.model_extra or {}).items() if k != "key"} or None
    try:
        constraint, _ = _parts(line, path.parent, default_schema, defaults or Sampling())
    except _LineError as e:
        return BadLine(number, e.field, e.code, e.detail, extra), None
    if constraint is not None and constraint.kind == "json" and grammar_backend is not None:
        bad = unsupported_features(constraint.spec, grammar_backend)
        if bad:
            return BadLine(number, _constraint_field(line), "unsupported_schema",
                           f"the {grammar_backend} grammar backend cannot enforce {', '.join(bad)}", extra), None
    return None, constraint


def check_lines(path: Path, *, default_schema: Constraint | None = None, defaults: Sampling | None = None,
                grammar_backend: str | None = None,
                compile: Callable[[Constraint], tuple[str, str] | None] | None = None,
                too_long: Callable[[PromptLine], str | None] | None = None) -> Iterator[BadLine]:
    """Every bad line of the prompts file `path`, streaming (InputError if it is missing or has no line).

    Each line as `check_line` checks it; then, with `compile`, its constraint as the engine would take it
    (called once per distinct constraint; returns None or (reason code, detail)), and with `too_long`, its
    prompt against the model's context (returns None or a message)."""
    verdicts: dict[str, tuple[str, str] | None] = {}  # distinct constraint -> its compile verdict
    seen = 0
    for number, line in iter_lines(path):
        seen += 1
        bad, constraint = _check(number, line, path, default_schema, defaults, grammar_backend)
        if bad is not None:
            yield bad
            continue
        extra = {k: v for k, v in (line.model_extra or {}).items() if k != "key"} or None
        if constraint is not None and compile is not None:
            ident = json.dumps(constraint.identity())
            if ident not in verdicts:
                verdicts[ident] = compile(constraint)
            if verdicts[ident] is not None:
                code, detail = verdicts[ident]
                yield BadLine(number, _constraint_field(line), code, detail, extra)
                continue
        if too_long is not None:
            message = too_long(line)
            if message:
                yield BadLine(number, "prompt" if line.prompt is not None else "messages", "prompt_too_long",
                              message, extra)
    if not seen:
        raise InputError(f"prompts file is empty: {path}")


class _LineError(ValueError):
    def __init__(self, field: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.field, self.code, self.detail = field, code, detail


def _constraint_field(line: PromptLine) -> str:
    return "regex" if line.regex is not None else "choices" if line.choices is not None else "schema"


def _constraint(line: PromptLine, base: Path, default_schema: Constraint | None) -> Constraint | None:
    if line.schema_ is not None:
        spec = line.schema_
        if isinstance(spec, str) and not spec.lstrip().startswith("{"):
            return _built("path", str(base / spec))  # a schema path is relative to the prompts file
        return _built("json", json.dumps(spec) if isinstance(spec, dict) else spec)  # key order is output order
    if line.regex is not None:
        return _built("regex", line.regex)
    if line.choices is not None:
        return _built("choice", json.dumps(line.choices))
    return default_schema


@functools.lru_cache(maxsize=1024)
def _built(kind: str, text: str) -> Constraint:
    """A constraint built once per distinct spec (checking a JSON Schema against its meta-schema takes about
    2 ms: most of the time of a pass over a file whose lines repeat a few schemas). Constraints are immutable."""
    if kind == "path":
        return Constraint.json_schema(Path(text))
    if kind == "json":
        return Constraint.json_schema(text)
    return Constraint.regex(text) if kind == "regex" else Constraint.choice(json.loads(text))


def _parts(line: PromptLine, base: Path, default_schema: Constraint | None,
           defaults: Sampling) -> tuple[Constraint | None, Sampling]:
    """A line's constraint and sampling; _LineError(field, code, detail) when either cannot be built."""
    try:
        constraint = _constraint(line, base, default_schema)
    except ConstraintError as e:
        raise _LineError(_constraint_field(line), "bad_constraint", str(e)) from None
    overrides = {k: v for k in ("max_tokens", "temperature", "top_p") if (v := getattr(line, k)) is not None}
    try:
        sampling = Sampling(**{**defaults.model_dump(), **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        message = str(err["ctx"]["error"]) if "error" in err.get("ctx", {}) else err["msg"]
        raise _LineError(".".join(map(str, err["loc"])) or "line", "bad_field", message) from None
    return constraint, sampling


def line_request(line: PromptLine, index: int, path: Path, *, model_name: str, defaults: Sampling, seed: int,
                 default_schema: Constraint | None = None, meta: dict | None = None,
                 stage: str = "generate") -> Request:
    """The Request of line `index` (0-based, among non-blank lines) of the prompts file `path`: its own seed if
    it has one, else `seed`."""
    try:
        constraint, sampling = _parts(line, path.parent, default_schema, defaults)
    except _LineError as e:
        raise InputError(f"{path}: request {index + 1}: {e.detail}") from None
    extra = dict(line.model_extra or {})
    extra.pop("key", None)  # ours: the request key
    row_meta = {**extra, "prompt": line.prompt, "messages": line.messages,
                "constraint": constraint.kind if constraint else None, **(meta or {})}
    return Request.build(stage=stage, model=model_name, messages=line.messages, prompt=line.prompt,
                         constraint=constraint, sampling=sampling, seed=line.seed if line.seed is not None else seed,
                         meta=row_meta, salt=index)
