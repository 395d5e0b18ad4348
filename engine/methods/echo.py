"""Echo: a two-stage method with no paper behind it, for testing and measuring scale-out.

  1. Stage "first".  `prompts` short chat requests ("Say something about the number 3.").
  2. Stage "second".  For every committed row of "first", `follow_ups` requests that quote its output, so
     stage 2's requests exist only once stage 1's rows do (the shape of TDG, TarGEN and GLAN, without their
     grammars and verifiers). Published rows: stage "second".

Unconstrained and short (max_tokens 8 by default), it exercises the real engine, store, runner and replicas
in seconds: `sdg run configs/echo.yaml --out runs/echo --replicas 2`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.methods import Context, Output
from engine.request import Request, Sampling
from engine.runner import run_stage


class Config(BaseModel):
    """The `params:` of an echo run config."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(8, ge=1, le=10_000_000)
    """Requests of stage "first"."""
    follow_ups: int = Field(1, ge=1, le=1000)
    """Requests of stage "second" per committed row of stage "first" (distinct seeds)."""
    seed: int = 0
    """Seeds every request (request i of stage 1: seed*1_000_003 + i)."""
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=8, temperature=0.0))
    """Sampling of both stages."""


def first_requests(config: Config, model: str) -> list[Request]:
    return [Request.build(stage="first", model=model, sampling=config.sampling, seed=config.seed * 1_000_003 + i,
                          messages=[{"role": "user", "content": f"Say something about the number {i}."}],
                          meta={"index": i}) for i in range(config.prompts)]


def second_requests(config: Config, model: str, parents: list[dict]) -> list[Request]:
    """`follow_ups` requests per parent row, quoting the parent's output."""
    return [Request.build(stage="second", model=model, sampling=config.sampling,
                          seed=config.seed * 1_000_003 + p["index"] * 1000 + j,
                          messages=[{"role": "user", "content": f"Continue this text: {p['output']}"}],
                          meta={"index": p["index"], "follow_up": j, "parent": p["key"]})
            for p in parents for j in range(config.follow_ups)]


def run(config: Config, ctx: Context) -> Output:
    run_stage(ctx.backend, ctx.store, "first", first_requests(config, ctx.model_name), replica=ctx.replica,
              progress=ctx.progress)
    parents = ctx.store.rows("first")  # every replica's share: with several replicas, a barrier
    ctx.extras["last_stats"] = run_stage(ctx.backend, ctx.store, "second",
                                         second_requests(config, ctx.model_name, parents), replica=ctx.replica,
                                         progress=ctx.progress)
    return Output(final_stage="second", text_fields=["output"])
