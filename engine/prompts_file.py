"""`sdg generate`'s input: a JSONL file, one request per line.

Each line holds `prompt` (raw text) or `messages` (chat), and optionally its own constraint (`schema`: inline
object or path relative to the file; `regex`; `choices`), `max_tokens`, `temperature`, `top_p`, `seed`. Any
other field (such as `id`) is carried through to the output row. The whole file is checked before anything
runs: the first bad line is one clear error naming the file and line.

    {"id": "a1", "prompt": "Name a colour:", "choices": ["red", "green"]}
    {"messages": [{"role": "user", "content": "A person as JSON"}], "schema": "person.schema.json"}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from engine.constraints import Constraint, ConstraintError
from engine.jsonl import read_objects
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


def read_lines(path: Path) -> list[PromptLine]:
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    lines: list[PromptLine] = []
    for number, value in read_objects(path, InputError):
        try:
            lines.append(PromptLine.model_validate(value))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]).replace("schema_", "schema")
            raise InputError(f"{path}:{number}: {where + ': ' if where else ''}{first['msg']}") from None
    if not lines:
        raise InputError(f"prompts file is empty: {path}")
    return lines


def _constraint(line: PromptLine, base: Path, default_schema: Constraint | None) -> Constraint | None:
    if line.schema_ is not None:
        spec = line.schema_
        if isinstance(spec, str) and not spec.lstrip().startswith("{"):
            spec = base / spec  # a schema path is relative to the prompts file
        return Constraint.json_schema(spec)
    if line.regex is not None:
        return Constraint.regex(line.regex)
    if line.choices is not None:
        return Constraint.choice(line.choices)
    return default_schema


def line_request(line: PromptLine, index: int, path: Path, *, model_name: str, defaults: Sampling, seed: int,
                 default_schema: Constraint | None = None, meta: dict | None = None,
                 stage: str = "generate") -> Request:
    """The Request of line `index` (0-based) of the prompts file `path`: its own seed if it has one, else `seed`."""
    try:
        constraint = _constraint(line, path.parent, default_schema)
        overrides = {k: v for k in ("max_tokens", "temperature", "top_p") if (v := getattr(line, k)) is not None}
        sampling = Sampling(**{**defaults.model_dump(), **overrides})
    except (ConstraintError, ValidationError, ValueError) as e:
        message = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise InputError(f"{path}: request {index + 1}: {message}") from None
    extra = dict(line.model_extra or {})
    extra.pop("key", None)  # ours: the request key
    row_meta = {**extra, "prompt": line.prompt, "messages": line.messages,
                "constraint": constraint.kind if constraint else None, **(meta or {})}
    return Request.build(stage=stage, model=model_name, messages=line.messages, prompt=line.prompt,
                         constraint=constraint, sampling=sampling, seed=line.seed if line.seed is not None else seed,
                         meta=row_meta, salt=index)
