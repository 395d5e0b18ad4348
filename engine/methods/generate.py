"""`sdg generate`: one output per line of a prompts file (engine.prompts_file), as a one-stage pipeline, so it
resumes, scales out (`--replicas N`, `--ray`) and publishes like every method.

  Stage "generate".  Line i of the file is one request: its prompt or messages, its own constraint, sampling
  overrides and seed if it has them (else the run's seed scheme), and its other fields carried into the row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.constraints import Constraint
from engine.methods import Context
from engine.pipeline.core import result_row
from engine.pipeline.stages import Generate, Pipeline, Publish
from engine.prompts_file import line_request, read_lines
from engine.request import Request, Sampling


class Config(BaseModel):
    """The `params:` of a generate run (built by `sdg generate` from its flags)."""

    model_config = ConfigDict(extra="forbid")

    prompts: Path
    """The prompts file (JSON Lines): checked whole before anything runs."""
    schema_: dict | None = Field(None, alias="schema")
    """A JSON Schema for lines without a constraint of their own."""
    sampling: Sampling = Field(default_factory=Sampling)
    """Sampling of lines that do not set their own."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Fields added to every row (the model's name, backend, grammar backend)."""

    @model_validator(mode="after")
    def _lines(self) -> "Config":
        read_lines(self.prompts)  # every line checked now: a bad file fails before any model loads
        return self


FILE_PARAMS = ("prompts",)  # hashed into the run's identity by content (engine.pipeline.run.file_identity)


def pipeline(config: Config, ctx: Context) -> Pipeline:
    default_schema = Constraint.json_schema(config.schema_) if config.schema_ else None

    def request(item: tuple[int, Any], seed: int) -> Request:
        index, line = item
        return line_request(line, index, config.prompts, model_name=ctx.model_name, defaults=config.sampling,
                            seed=seed, default_schema=default_schema, meta=config.meta)

    return Pipeline(
        stages=[Generate("generate", items=lambda: enumerate(read_lines(config.prompts)), request=request,
                         parse=result_row, ident=lambda item: item[0])],
        publish=Publish("generate", text_fields=["output"]))
