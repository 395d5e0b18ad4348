"""`sdg generate`: one output per line of a prompts file (engine.prompts_file), as a one-stage pipeline, so it
resumes, scales out (`--replicas N`, `--ray`) and publishes like every method.

  Stage "generate".  Line i of the file is one request: its prompt or messages, its own constraint, sampling
  overrides and seed if it has them (else the run's seed scheme), and its other fields carried into the row.
  The file is streamed: items are read lazily, one line at a time, so memory does not grow with the file.
  With `on_bad_line: reject`, a bad line is a reject of this stage with its reason code (never sent).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.constraints import Constraint
from engine.methods import Context
from engine.pipeline.core import RejectItem, result_row
from engine.pipeline.stages import Generate, Pipeline, Publish
from engine.prompts_file import (BadLine, InputError, check_line, check_lines, iter_lines, iter_texts, line_request,
                                 parse_line, refusal)
from engine.request import Request, Sampling


class Config(BaseModel):
    """The `params:` of a generate run (built by `sdg generate` from its flags)."""

    model_config = ConfigDict(extra="forbid")

    prompts: Path
    """The prompts file (JSON Lines), read as a stream. With on_bad_line "error", every line is checked
    before anything runs."""
    schema_: dict | None = Field(None, alias="schema")
    """A JSON Schema for lines without a constraint of their own."""
    sampling: Sampling = Field(default_factory=Sampling)
    """Sampling of lines that do not set their own."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Fields added to every row (the model's name, backend, grammar backend)."""
    on_bad_line: Literal["error", "reject"] = Field("error", exclude=True)
    """"error": a file with bad lines is refused whole (one error listing every bad line); "reject": each bad
    line is a reject with its reason and the others run. Not part of the run's identity."""
    bad_lines: dict[int, str] = Field(default_factory=dict, exclude=True)
    """Line number -> reject reason, for lines found bad by `sdg generate`'s preflight with the model's tokenizer
    and the grammar backend (refused or pathological constraints, prompts longer than the context). Lines bad
    on their own (JSON, fields, schema) are found again as they are read. Not part of the run's identity."""

    @model_validator(mode="after")
    def _lines(self) -> "Config":
        default = Constraint.json_schema(self.schema_) if self.schema_ else None
        if self.on_bad_line == "error":  # every line checked now: a bad file fails before any model loads
            bad = list(check_lines(self.prompts, default_schema=default, defaults=self.sampling))
            if bad:
                raise refusal(self.prompts, bad)
        elif next(iter_lines(self.prompts), None) is None:
            raise InputError(f"prompts file is empty: {self.prompts}")
        return self


FILE_PARAMS = ("prompts",)  # hashed into the run's identity by content (engine.pipeline.run.file_identity)


def pipeline(config: Config, ctx: Context) -> Pipeline:
    default_schema = Constraint.json_schema(config.schema_) if config.schema_ else None

    def items():
        """(index among non-blank lines, line number, its text), read lazily; a line is parsed when its request
        is built, so counting the items (the progress bar's total) is cheap."""
        for index, (number, text) in enumerate(iter_texts(config.prompts)):
            yield index, number, text

    def request(item: tuple[int, int, str], seed: int) -> Request:
        index, number, text = item
        line = parse_line(number, text)
        if isinstance(line, BadLine):
            if config.on_bad_line == "reject":
                raise RejectItem(line.reason, line.row())
            raise refusal(config.prompts, [line])
        if number in config.bad_lines:
            extra = {k: v for k, v in (line.model_extra or {}).items() if k != "key"}
            field, _, error = config.bad_lines[number].partition(": ")[2].partition(": ")
            raise RejectItem(config.bad_lines[number], {**extra, "line": number, "field": field, "error": error})
        try:
            return line_request(line, index, config.prompts, model_name=ctx.model_name, defaults=config.sampling,
                                seed=seed, default_schema=default_schema, meta=config.meta)
        except InputError:
            if config.on_bad_line != "reject":
                raise
            bad = check_line(number, line, config.prompts, default_schema=default_schema, defaults=config.sampling)
            if bad is None:
                raise
            raise RejectItem(bad.reason, bad.row()) from None

    return Pipeline(
        stages=[Generate("generate", items=items, request=request, parse=result_row, ident=lambda item: item[0])],
        publish=Publish("generate", text_fields=["output"]))
