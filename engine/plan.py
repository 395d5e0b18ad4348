"""`sdg run CONFIG --plan`: what a config implies, per stage, before a long run, without loading a model.

    print(render(plan(Path("configs/glan_full.yaml"))))

Per stage: how many requests the config implies, about how many prompt tokens (real prompts of the stage,
rendered by the method and counted with the model's tokenizer, times the request count), and the output budget
(max_tokens times the request count: an upper bound, since outputs stop at their end). A method that can size
its stages from its config alone exposes `plan(config, ctx) -> list[StageEstimate]` (GLAN does: the taxonomy
file fixes the disciplines, the config the fan-out); for other methods the plan is the dry run's stage lines
(root stages counted, per-parent fan-out shown).

Only the tokenizer is read (no weights, no engine). Nothing is written.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

EXAMPLES_AT_MOST = 64
"""Example requests tokenized per stage (their mean prompt length is multiplied by the request count)."""


@dataclass
class StageEstimate:
    """A method's estimate of one stage: `requests` first attempts, `examples` requests like the stage's (their
    prompts are tokenized), and a note saying what the count assumes."""

    stage: str
    requests: int
    examples: Sequence[Any] = ()
    note: str = ""
    attempts: int = 1
    """Most attempts per request (rejects are asked again): the worst case multiplies the counts by this."""


@dataclass
class StagePlanned:
    stage: str
    requests: int
    prompt_tokens: int | None
    prompt_tokens_each: float | None
    max_output_tokens: int | None
    attempts: int
    note: str


@dataclass
class Plan:
    config_path: Path
    method: str
    model: str | None
    stages: list[StagePlanned] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: str | None = None
    """The dry run's text, for a method with no plan of its own."""


def plan(config_path: Path, model: str | None = None) -> Plan:
    """The plan of the run config at `config_path` (a bad config raises the run's own one-line errors); `model`
    overrides the config's model (its tokenizer counts the prompts)."""
    from engine import methods
    from engine.pipeline.run import load_run_config, method_config
    config = load_run_config(Path(config_path))
    if model is not None:
        config.model = model
    module = methods.load(config.method)
    params = method_config(config)
    tokenizer, model, note = _tokenizer(config)
    result = Plan(Path(config_path), config.method, model, notes=[note] if note else [])
    if not hasattr(module, "plan"):
        from engine.validate import check, render as render_checks
        findings = check(Path(config_path), compile=False)
        result.dry_run = render_checks(findings)
        result.notes.append(f"method {config.method} has no plan of its own: the stages shown are the dry run's "
                            "(root stages counted; later stages depend on the model's output)")
        return result
    with tempfile.TemporaryDirectory(prefix="sdg-plan-") as tmp:
        ctx = methods.Context(out=Path(tmp), seed=config.seed, model_name="plan", progress=False,
                              start_engine=lambda model_dir: (lambda: None))
        result.stages = estimate_stages(module, params, ctx, tokenizer)
    return result


def estimate_stages(module, params, ctx, tokenizer) -> list[StagePlanned]:
    """The method's estimates with their prompts counted by `tokenizer`."""
    return [_planned(e, tokenizer) for e in module.plan(params, ctx)]


def _planned(e: StageEstimate, tokenizer) -> StagePlanned:
    from engine.validate import prompt_tokens
    examples = list(e.examples)[:EXAMPLES_AT_MOST]
    counts = [n for n in (prompt_tokens(r, tokenizer) for r in examples) if n is not None]
    each = sum(counts) / len(counts) if counts else None
    max_tokens = examples[0].sampling.max_tokens if examples else None
    return StagePlanned(e.stage, e.requests, round(each * e.requests) if each is not None else None, each,
                        max_tokens * e.requests if max_tokens is not None else None, e.attempts, e.note)


def _tokenizer(config) -> tuple[Any, str | None, str | None]:
    """(the model's tokenizer or None, the model's name, a note when prompt tokens cannot be counted)."""
    from engine import models
    try:
        model_dir = models.prepare(config.model)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(model_dir)), model_dir.name, None
    except Exception as e:  # noqa: BLE001 - a plan without token counts is still a plan
        return None, None, f"prompt tokens not counted: the model's tokenizer does not load ({e})"


def render(p: Plan) -> str:
    lines = [f"plan of {p.config_path}: method {p.method}, model {p.model or '?'} (no model loaded)"]
    if p.stages:
        width = max(len(s.stage) for s in p.stages)
        lines.append(f"  {'stage':<{width}}  {'requests':>12}  {'prompt tok':>15}  {'per req':>7}  "
                     f"{'output tok (at most)':>20}")
        for s in p.stages:
            unknown = "?" if s.max_output_tokens is not None else "-"  # "-": a stage with no model
            prompt = f"{s.prompt_tokens:,}" if s.prompt_tokens is not None else unknown
            each = f"{s.prompt_tokens_each:,.0f}" if s.prompt_tokens_each is not None else unknown
            output = f"{s.max_output_tokens:,}" if s.max_output_tokens is not None else "-"
            lines.append(f"  {s.stage:<{width}}  {s.requests:>12,}  {prompt:>15}  {each:>7}  {output:>20}"
                         + (f"  {s.note}" if s.note else ""))
        model_stages = [s for s in p.stages if s.max_output_tokens is not None]
        prompt_total = sum(s.prompt_tokens or 0 for s in model_stages)
        output_total = sum(s.max_output_tokens for s in model_stages)
        requests = sum(s.requests for s in model_stages)
        lines.append(f"  {'total':<{width}}  {requests:>12,}  {prompt_total:>15,}  {'':>7}  {output_total:>20,}")
        worst = max((s.attempts for s in model_stages), default=1)
        if worst > 1:
            lines.append(f"  rejects are asked again (up to {worst} attempts per request): the worst case "
                         f"multiplies a stage's figures by its attempts")
        lines.append("  output tokens are the budget (max_tokens x requests); a pilot run's manifest has the "
                     "measured tokens per stage")
    if p.dry_run:
        lines.append(p.dry_run)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
