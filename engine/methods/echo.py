"""Echo: a two-stage method with no paper behind it, for testing and measuring the pipeline and scale-out.

  1. Stage "first".  `prompts` short chat requests ("Say something about the number 3.").
  2. Stage "second".  For every row of "first", `follow_ups` requests that quote its output: each child needs
     its parent's row, and is issued as soon as that row is committed (the shape of TDG, TarGEN and GLAN,
     without their grammars and verifiers). Published rows: stage "second".

Unconstrained and short (max_tokens 8 by default), it exercises the real engine, store, pipeline and replicas
in seconds: `sdg run configs/echo.yaml --out runs/echo --replicas 2`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.methods import Context
from engine.pipeline.core import result_row
from engine.pipeline.stages import Each, Generate, Pipeline, Publish
from engine.request import Request, Sampling


class Config(BaseModel):
    """The `params:` of an echo run config."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(8, ge=1, le=10_000_000)
    """Requests of stage "first"."""
    follow_ups: int = Field(1, ge=1, le=1000)
    """Requests of stage "second" per row of stage "first" (distinct seeds)."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=8, temperature=0.0))
    """Sampling of both stages."""


def pipeline(config: Config, ctx: Context) -> Pipeline:
    def first_request(index: int, seed: int) -> Request:
        return Request.build(stage="first", model=ctx.model_name, sampling=config.sampling, seed=seed,
                             messages=[{"role": "user", "content": f"Say something about the number {index}."}],
                             meta={"index": index})

    def second_request(item: tuple[dict, int], seed: int) -> Request:
        parent, follow_up = item
        return Request.build(stage="second", model=ctx.model_name, sampling=config.sampling, seed=seed,
                             messages=[{"role": "user", "content": f"Continue this text: {parent['output']}"}],
                             meta={"index": parent["index"], "follow_up": follow_up, "parent": parent["key"]})

    return Pipeline(
        stages=[
            Generate("first", items=lambda: range(config.prompts), request=first_request, parse=result_row),
            Generate("second", reads=Each("first"), items=lambda parent: ((parent, j) for j in range(config.follow_ups)),
                     request=second_request, parse=result_row),
        ],
        publish=Publish("second", text_fields=["output"]))
