"""Throughput of the engine against raw vLLM, and the cost of constraints, measured side by side in one run.

    sdg bench throughput [--model PATH] [--prompts N] [--max-tokens T] [--constraint none|json[-SHAPE]|regex|choice]
                         [--backend guidance|xgrammar|outlines] [--repeat R] [--tag NAME]

One process, one vLLM engine. Each repetition runs, back to back on the same prompts, sampling and seeds:
  raw     one `LLM.generate` call over all prompts (nothing persisted)
  engine  the pipeline core through the run store (rows committed as they finish, as in a real run)
With --constraint, two more runs measure what the constraint costs at EQUAL output length:
  constrained    raw `LLM.generate` with the constraint
  unconstrained  raw `LLM.generate` without it, each request forced (ignore_eos) to the length its
                 constrained twin produced
Unconstrained runs use ignore_eos so that raw and engine produce exactly the same number of tokens.
Order alternates between repetitions, and the figures printed are the medians of R repetitions, because this
machine is noisy. Writes bench/results/throughput-<tag>.json and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMAS = {
    # Several shapes, so the cost of a constraint is seen per feature: flat, nested, arrays, enums, all.
    "json-flat": {"type": "object", "properties": {"problem": {"type": "string", "maxLength": 300},
                                                   "answer": {"type": "number"}},
                  "required": ["problem", "answer"], "additionalProperties": False},
    "json-nested": {"type": "object", "properties": {
        "problem": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 300},
                                                     "topic": {"type": "string", "maxLength": 30}},
                    "required": ["text", "topic"], "additionalProperties": False},
        "answer": {"type": "object", "properties": {"value": {"type": "number"}, "unit": {"type": "string",
                                                                                         "maxLength": 15}},
                   "required": ["value", "unit"], "additionalProperties": False}},
        "required": ["problem", "answer"], "additionalProperties": False},
    "json-arrays": {"type": "object", "properties": {
        "problem": {"type": "string", "maxLength": 300},
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 1, "maxItems": 4},
        "numbers": {"type": "array", "items": {"type": "integer"}, "maxItems": 6}},
        "required": ["problem", "steps", "numbers"], "additionalProperties": False},
    "json-enums": {"type": "object", "properties": {
        "problem": {"type": "string", "maxLength": 300}, "difficulty": {"enum": ["easy", "medium", "hard"]},
        "grade": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6]}},
        "required": ["problem", "difficulty", "grade"], "additionalProperties": False},
}
SCHEMAS["json"] = {"type": "object", "properties": {
    **SCHEMAS["json-arrays"]["properties"], "difficulty": SCHEMAS["json-enums"]["properties"]["difficulty"],
    "answer": SCHEMAS["json-nested"]["properties"]["answer"]},
    "required": ["problem", "steps", "difficulty", "answer"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,12}( [a-z]{2,12}){3,12}\."
CHOICES = ["easy", "medium", "hard", "very hard"]
TOPICS = ["apples", "trains", "a bakery", "marbles", "a garden", "books", "a zoo", "coins", "kites", "robots",
          "tomatoes", "a parade", "socks", "bees", "eggs", "a picnic"]
ADJECTIVES = ["red", "tiny", "busy", "quiet", "old", "new", "happy", "lazy", "fast", "slow", "shiny", "sweet"]


def prompts(n: int) -> list[str]:
    return [f"Write a grade-school math word problem about {ADJECTIVES[i % len(ADJECTIVES)]} "
            f"{TOPICS[(i // len(ADJECTIVES)) % len(TOPICS)]} (#{i}) and solve it." for i in range(n)]


def constraint_for(kind: str):
    from engine.constraints import Constraint
    if kind in SCHEMAS:
        return lambda: Constraint.json_schema(SCHEMAS[kind])
    return {"none": None, "regex": lambda: Constraint.regex(REGEX), "choice": lambda: Constraint.choice(CHOICES)}[kind]


def build_requests(n: int, max_tokens: int, kind: str, ignore_eos: bool, stage: str):
    from engine.request import Request, Sampling
    make = constraint_for(kind)
    return [Request.build(stage=stage, model="bench", messages=[{"role": "user", "content": p}],
                          constraint=make() if make else None, seed=i,
                          sampling=Sampling(max_tokens=max_tokens, temperature=0.8, ignore_eos=ignore_eos))
            for i, p in enumerate(prompts(n))]


def raw_generate(backend, requests, lengths: list[int] | None = None) -> dict:
    """One LLM.generate call over every request: vLLM at its best, nothing persisted."""
    ids = [{"prompt_token_ids": backend._prompt_ids(r)} for r in requests]
    params = [backend._sampling_params(r) for r in requests]
    if lengths is not None:  # force each output to its constrained twin's length, without the constraint
        for p, n in zip(params, lengths):
            p.structured_outputs, p.ignore_eos, p.max_tokens, p.min_tokens = None, True, max(n, 1), max(n, 1)
    start = time.perf_counter()
    outputs = backend.llm.generate(ids, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    out_lengths = [len(o.outputs[0].token_ids) for o in outputs]
    valid = None
    if requests[0].constraint is not None and lengths is None:
        valid = sum(r.constraint.check(o.outputs[0].text, o.outputs[0].finish_reason)[0]
                    for r, o in zip(requests, outputs))
    return _figures(seconds, len(outputs), sum(len(o.prompt_token_ids) for o in outputs), out_lengths, valid)


def engine_generate(backend, requests) -> dict:
    """The engine's path: the pipeline core's add/step loop, each Result committed to a real run store as it
    finishes (a one-stage pipeline over these requests, as `sdg generate` runs)."""
    from engine.pipeline.core import Executor, result_row
    from engine.pipeline.stages import Generate, Pipeline, Publish
    from engine.store import RunStore
    pipeline = Pipeline([Generate("bench", items=lambda: requests, request=lambda r, seed: r, parse=result_row,
                                  ident=lambda r: r.key)], Publish("bench", ["output"]))
    with tempfile.TemporaryDirectory(prefix="sdg-bench-") as tmp:
        store = RunStore.open(Path(tmp) / "run", {"bench": requests[0].key}, commit_rows=256, commit_seconds=30)
        executor = Executor(pipeline, store, {"main": lambda: backend}, progress=False)
        executor.run()
        stats = executor.stats["bench"]
        store.close()
    lengths = []  # the core reports totals; per-request lengths are not needed here
    return {**_figures(stats.seconds, stats.generated, stats.prompt_tokens, lengths, stats.accepted),
            "output_tokens": stats.output_tokens,
            "output_tok_per_s": round(stats.output_tokens / stats.seconds, 1)}


def _figures(seconds: float, n: int, prompt_tokens: int, out_lengths: list[int], valid) -> dict:
    out = sum(out_lengths)
    return {"seconds": round(seconds, 3), "requests": n, "req_per_s": round(n / seconds, 2),
            "prompt_tok_per_s": round(prompt_tokens / seconds, 1), "output_tokens": out,
            "output_tok_per_s": round(out / seconds, 1), "valid": valid, "lengths": out_lengths}


def median_of(runs: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["median_output_tok_per_s"])
    values = [result["median_output_tok_per_s"][k] for k in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = {"unconstrained_same_length": "unconstrained\n(same length)", "raw": "raw vLLM",
              "engine": "engine\n(persisting)"}
    ax.bar([labels.get(n, n) for n in names], values, color=["#777", "#2a7", "#c63", "#36c"][:len(names)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{result['device']} · {result['prompts']} prompts × {result['max_tokens']} tokens · "
                 f"{result['constraint']} ({result['grammar_backend']}"
                 f"{', compact' if result.get('compact_json') else ''})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="sdg bench throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--constraint", default="none",
                        help="none, regex, choice, json (all features) or json-flat/-nested/-arrays/-enums; "
                             "several, comma-separated, are measured one after another on the same engine")
    parser.add_argument("--backend", default="guidance", choices=["guidance", "xgrammar", "outlines"],
                        help="grammar backend")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json-whitespace", choices=["compact", "any"], default=None,
                        help="compact: no free whitespace in JSON (vLLM's disable_any_whitespace; guidance/xgrammar); "
                             "any: free whitespace (the engine's default)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from engine.backends.loader import load_backend
    kwargs = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    if args.json_whitespace:
        kwargs["compact_json"] = args.json_whitespace == "compact"
    backend = load_backend("vllm", args.model, grammar_backend=args.backend, **kwargs)
    results = []
    for constraint in args.constraint.split(","):
        if constraint not in ("none", "regex", "choice", *SCHEMAS):
            raise SystemExit(f"error: unknown constraint {constraint!r}")
        result = measure(backend, prompts=args.prompts, max_tokens=args.max_tokens, constraint=constraint,
                         repeat=args.repeat)
        tag = (f"{args.tag}-{constraint}" if args.tag else
               f"{result['device'].replace(' ', '_')}-{constraint}-{args.backend}")
        path = write(result, args.out_dir, tag)
        report(result)
        print(f"wrote {path}")
        results.append(result)
    return results


def measure(backend, *, prompts: int, max_tokens: int, constraint: str, repeat: int) -> dict:
    """Every run of the benchmark on one loaded vLLM backend; medians over `repeat` repetitions."""
    import vllm
    same_length = build_requests(prompts, max_tokens, "none", True, "bench-none")
    constrained = build_requests(prompts, max_tokens, constraint, False, "bench-c") if constraint != "none" else None
    raw_generate(backend, same_length[: min(16, prompts)])  # warm-up: first-call costs are not throughput
    runs: dict[str, list[dict]] = {"raw": [], "engine": []}
    if constrained:
        runs.update({"constrained": [], "unconstrained_same_length": []})
    for rep in range(repeat):
        order = ["raw", "engine"] if rep % 2 == 0 else ["engine", "raw"]
        for name in order:
            runs[name].append(raw_generate(backend, same_length) if name == "raw"
                              else engine_generate(backend, same_length))
        if constrained:
            c = raw_generate(backend, constrained)
            u = raw_generate(backend, constrained, lengths=c["lengths"])
            runs["constrained"].append(c)
            runs["unconstrained_same_length"].append(u)
    medians = {k: median_of(v, "output_tok_per_s") for k, v in runs.items()}
    result = {
        "benchmark": "throughput", "device": "cpu" if backend.on_cpu else _gpu_name(),
        "machine": platform.machine(), "cores": os.cpu_count(), "vllm": vllm.__version__,
        "model": backend.identity()["model"]["name"], "prompts": prompts, "max_tokens": max_tokens,
        "constraint": constraint, "grammar_backend": backend.grammar_backend, "repeat": repeat,
        "compact_json": backend.compact_json,
        "max_num_seqs": backend.max_num_seqs,
        "median_output_tok_per_s": medians,
        "median_req_per_s": {k: median_of(v, "req_per_s") for k, v in runs.items()},
        "median_prompt_tok_per_s": {k: median_of(v, "prompt_tok_per_s") for k, v in runs.items()},
        "engine_over_raw": round(medians["engine"] / medians["raw"], 3),
        "runs": {k: [{f: x[f] for f in x if f != "lengths"} for x in v] for k, v in runs.items()},
    }
    if constrained:
        result["constrained_over_unconstrained"] = round(medians["constrained"] / medians["unconstrained_same_length"], 3)
        result["constrained_valid"] = runs["constrained"][-1]["valid"]
    return result


def write(result: dict, out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"throughput-{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / f"throughput-{tag}.png")
    return path


def report(result: dict) -> None:
    medians = result["median_output_tok_per_s"]
    print(f"{'run':<26}{'output tok/s':>14}{'prompt tok/s':>14}{'req/s':>9}")
    for k in medians:
        print(f"{k:<26}{medians[k]:>14,.0f}{result['median_prompt_tok_per_s'][k]:>14,.0f}"
              f"{result['median_req_per_s'][k]:>9.1f}")
    print(f"engine/raw output tok/s: {result['engine_over_raw']}")
    if "constrained_over_unconstrained" in result:
        print(f"constrained/unconstrained at equal length: {result['constrained_over_unconstrained']} "
              f"({result['grammar_backend']}; {result['constrained_valid']}/{result['prompts']} valid)")


def _gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
