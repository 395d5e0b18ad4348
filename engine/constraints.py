"""Output constraints: what shape a model's output must take.

Outlines output types are the API: a pydantic model, a `Literal[...]`, an `Enum`, a JSON Schema dict,
`outlines.types.Regex`, `outlines.types.JsonSchema`, `outlines.types.CFG`, or a list of choices all turn into
one `Constraint` (`Constraint.of(...)`). A Constraint has exactly one kind, checked on construction:

    json     a JSON Schema (dict), validated against its meta-schema when it is loaded
    regex    a regular expression the whole output must match
    choice   a list of strings the output must equal one of
    grammar  a Lark grammar the output must parse with

Backends translate a Constraint for their decoder (vLLM: StructuredOutputsParams). Every output is checked
again after decoding with `Constraint.check`, so a backend bug or a cut-off output is never taken as valid.
"""
from __future__ import annotations

import enum
import json
import re
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema

KINDS = ("json", "regex", "choice", "grammar")


class ConstraintError(ValueError):
    """A constraint that cannot be used: malformed, or asking for a feature the decoder cannot enforce."""


@dataclass(frozen=True, eq=False)
class Constraint:
    kind: str
    spec: Any  # json: dict schema; regex: str; choice: tuple[str, ...]; grammar: str (Lark)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "json":
            if not isinstance(self.spec, dict):
                raise ConstraintError(f"a JSON Schema must be an object, got {type(self.spec).__name__}")
            try:
                jsonschema.validators.validator_for(self.spec).check_schema(self.spec)
            except jsonschema.SchemaError as e:
                raise ConstraintError(f"malformed JSON Schema: {e.message} (at {'/'.join(map(str, e.path)) or 'root'})") from None
        elif self.kind == "regex":
            try:
                re.compile(self.spec)
            except (re.error, TypeError) as e:
                raise ConstraintError(f"malformed regex {self.spec!r}: {e}") from None
        elif self.kind == "choice":
            if not self.spec or not all(isinstance(c, str) for c in self.spec):
                raise ConstraintError("choices must be a non-empty list of strings")
            object.__setattr__(self, "spec", tuple(self.spec))
        elif self.kind == "grammar":
            self._lark  # parse now: a bad grammar fails on construction, not mid-run

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: dict | str | Path) -> "Constraint":
        """A JSON Schema given as a dict, a JSON string, or a path to a .json file."""
        return cls("json", load_schema(schema))

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> "Constraint":
        return cls("choice", tuple(choices))

    @classmethod
    def grammar(cls, lark_grammar: str) -> "Constraint":
        return cls("grammar", lark_grammar)

    @classmethod
    def of(cls, output_type: Any) -> "Constraint":
        """Turn an Outlines output type (or a plain schema dict / list of choices) into a Constraint."""
        if isinstance(output_type, Constraint):
            return output_type
        if isinstance(output_type, dict):
            return cls.json_schema(output_type)
        if isinstance(output_type, (list, tuple)):
            return cls.choice([str(c) for c in output_type])
        if typing.get_origin(output_type) is typing.Literal:
            return cls.choice([str(a) for a in typing.get_args(output_type)])
        if isinstance(output_type, type) and issubclass(output_type, enum.Enum):
            return cls.choice([str(m.value) for m in output_type])
        if isinstance(output_type, type) and hasattr(output_type, "model_json_schema"):  # pydantic model
            return cls.json_schema(output_type.model_json_schema())
        from outlines import types as ot  # Outlines' own terms: JsonSchema, Regex, CFG
        if isinstance(output_type, ot.JsonSchema):
            return cls.json_schema(json.loads(output_type.schema) if isinstance(output_type.schema, str)
                                   else output_type.schema)
        if isinstance(output_type, ot.CFG):
            return cls.grammar(output_type.definition)
        if isinstance(output_type, ot.Regex):
            return cls.regex(output_type.pattern)
        raise ConstraintError(f"cannot use {output_type!r} as an output type: expected a pydantic model, Literal, "
                              "Enum, JSON Schema dict, list of choices, or outlines JsonSchema/Regex/CFG")

    def identity(self) -> dict:
        """What goes into a request key: the kind and a canonical form of the spec."""
        return {"kind": self.kind, "spec": list(self.spec) if self.kind == "choice" else self.spec}

    # -- checking outputs -----------------------------------------------------------------------
    @cached_property
    def _validator(self):
        return jsonschema.validators.validator_for(self.spec)(self.spec)

    @cached_property
    def _compiled(self):
        return re.compile(self.spec)

    @cached_property
    def _lark(self):
        import lark
        try:
            return lark.Lark(self.spec, start="start")
        except Exception as e:  # lark raises several grammar error types
            raise ConstraintError(f"malformed Lark grammar: {str(e).splitlines()[0]}") from None

    def check(self, text: str, finish_reason: str) -> tuple[bool, Any, str | None]:
        """(valid, parsed value, reason). A constrained output cut off by max_tokens is never valid."""
        if finish_reason == "length":
            return False, None, "truncated"
        if self.kind == "json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                return False, None, f"invalid_json: {e.msg}"
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
            if error is not None:
                return False, value, f"schema: {error.message[:200]}"
            return True, value, None
        if self.kind == "regex":
            return (True, text, None) if self._compiled.fullmatch(text) else (False, None, "regex_mismatch")
        if self.kind == "choice":
            return (True, text, None) if text in self.spec else (False, None, "not_a_choice")
        try:
            self._lark.parse(text)
        except Exception as e:
            return False, None, f"grammar: {str(e).splitlines()[0][:200]}"
        return True, text, None


def load_schema(schema: dict | str | Path) -> dict:
    """A JSON Schema from a dict, a JSON string, or a file path; one clear error when it is none of them."""
    if isinstance(schema, dict):
        return schema
    text = str(schema)
    if isinstance(schema, Path) or not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ConstraintError(f"schema file not found: {path}")
        text = path.read_text()
        where = str(path)
    else:
        where = "inline schema"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConstraintError(f"malformed JSON in {where}: {e.msg} (line {e.lineno})") from None
    if not isinstance(value, dict):
        raise ConstraintError(f"{where} is not a JSON object")
    return value
