"""The pipeline core against raw vLLM, and its own ceiling, measured side by side in one invocation.

    sdg bench pipeline --backend vllm [--prompts N] [--max-tokens T] [--repeat R]
    sdg bench pipeline --backend noop [--sizes 50000,500000]

--backend vllm: echo's two stages (each stage-2 request quotes its parent's output, so it can only be issued
  once that row is committed), end to end through the run store, against ONE raw `LLM.generate` call over the
  same prompts of both stages with the same lengths (ignore_eos): the upper bound, since raw knows every
  prompt up front. The same ratio with streaming off (a barrier after every stage) shows what streaming gains.
  One process, one engine; the order alternates between repetitions and the medians are printed.
--backend noop: a backend that does no work, REGISTERED FOR THIS BENCHMARK ONLY (it lives in this file and is
  labelled "noop (benchmark only)" in every output): requests per second that one process pushes through the
  pipeline and the store, and the peak RSS of two-stage runs of each size, each in a fresh process.

Writes bench/results/pipeline-<device>-vllm.json or bench/results/pipeline-noop.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOOP_LABEL = "noop (benchmark only: no model, no work)"


class NoopBackend:
    """Benchmark only: takes up to `in_flight` requests as an engine would, then 'finishes' them all at once
    with `tokens` output tokens each and no text work. What is measured is everything around the model."""

    name = "noop"

    def __init__(self, in_flight: int = 256, tokens: int = 16) -> None:
        self.in_flight, self.tokens = in_flight, tokens

    def preflight(self, requests) -> None:
        pass

    def identity(self) -> dict:
        return {"backend": NOOP_LABEL}

    def generate(self, requests):
        from engine.request import Result
        batch, source, done = [], iter(requests), False
        while not done:
            while len(batch) < self.in_flight:
                request = next(source, StopIteration)
                if request is StopIteration:
                    done = True
                    break
                if request is None:  # the feed waits for results
                    break
                batch.append(request)
            for r in batch:
                yield Result(key=r.key, text="x", parsed="x", prompt_tokens=8, output_tokens=self.tokens,
                             finish_reason="length", valid=True, meta=r.meta)
            batch = []


def echo_config(prompts: int, max_tokens: int, ignore_eos: bool, commit_rows: int = 1000):
    from engine.config import RunConfig
    return RunConfig(method="echo", seed=0, store={"commit_rows": commit_rows},
                     quality={"exact_dedup": False, "near_dedup": False},
                     params={"prompts": prompts, "follow_ups": 1,
                             "sampling": {"max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": ignore_eos}})


# ------------------------------------------------------------------------------------------------ vllm
class Recording:
    """The real backend, recording every request it is given (so raw can run the very same prompts)."""

    def __init__(self, backend) -> None:
        self.backend, self.requests = backend, []

    def preflight(self, requests) -> None:
        self.backend.preflight(requests)

    def generate(self, requests):
        def record():
            for r in requests:
                if r is not None:
                    self.requests.append(r)
                yield r
        yield from self.backend.generate(record())


def pipeline_run(backend, prompts: int, max_tokens: int, streaming: bool) -> tuple[dict, list]:
    from engine.pipeline.run import run_method
    recording = Recording(backend)
    with tempfile.TemporaryDirectory(prefix="sdg-bench-") as tmp:
        started = time.perf_counter()
        _, _, stats = run_method(echo_config(prompts, max_tokens, ignore_eos=True), Path(tmp) / "run",
                                 progress=False, streaming=streaming, engines={"main": lambda: recording})
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "requests": stats.generated, "output_tokens": stats.output_tokens,
            "output_tok_per_s": round(stats.output_tokens / seconds, 1)}, recording.requests


def raw_run(backend, requests: list) -> dict:
    """One `LLM.generate` over every prompt, same sampling and seeds, ignore_eos: the upper bound."""
    prompts = [{"prompt_token_ids": backend._prompt_ids(r)} for r in requests]
    params = [backend._sampling_params(r) for r in requests]
    started = time.perf_counter()
    outputs = backend.llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": round(seconds, 3), "requests": len(outputs), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / seconds, 1)}


def bench_vllm(args) -> dict:
    from engine.backends.loader import load_backend
    backend = load_backend("vllm", args.model, max_num_seqs=args.max_num_seqs) if args.max_num_seqs else \
        load_backend("vllm", args.model)
    _, warm = pipeline_run(backend, 8, 4, True)  # first-call costs are not throughput
    raw_run(backend, warm)
    runs: dict[str, list[dict]] = {"raw": [], "pipeline_streaming": [], "pipeline_barriers": []}
    for rep in range(args.repeat):
        streamed, requests = pipeline_run(backend, args.prompts, args.max_tokens, True)
        barrier, _ = pipeline_run(backend, args.prompts, args.max_tokens, False)
        for name, figures in ([("raw", raw_run(backend, requests)), ("pipeline_streaming", streamed),
                               ("pipeline_barriers", barrier)] if rep % 2 else
                              [("pipeline_streaming", streamed), ("pipeline_barriers", barrier),
                               ("raw", raw_run(backend, requests))]):
            runs[name].append(figures)
    median = {k: statistics.median(r["output_tok_per_s"] for r in v) for k, v in runs.items()}
    device = "cpu" if backend.on_cpu else "cuda"
    return {"benchmark": "pipeline", "backend": "vllm", "device": device, "machine": platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "vllm": backend.vllm_version, "method": "echo (2 stages)",
            "prompts_per_stage": args.prompts, "max_tokens": args.max_tokens, "repeat": args.repeat,
            "in_flight": backend.in_flight, "median_output_tok_per_s": median,
            "ratio_streaming_to_raw": round(median["pipeline_streaming"] / median["raw"], 3),
            "ratio_barriers_to_raw": round(median["pipeline_barriers"] / median["raw"], 3), "runs": runs}


# ------------------------------------------------------------------------------------------------ noop
def noop_child(requests: int) -> dict:
    """One two-stage run of `requests` requests in all on the no-op backend, in this (fresh) process: the
    pipeline's rate and peak RSS while generating, then the peak again after publishing (which reads the final
    stage whole)."""
    from engine import models
    from engine.methods import Context, echo
    from engine.pipeline.core import Executor
    from engine.pipeline.run import run_payload
    from engine.store import RunStore
    config = echo_config(requests // 2, 16, ignore_eos=True)
    params = echo.Config.model_validate(config.params)
    model = models.identity(models.prepare(None))
    with tempfile.TemporaryDirectory(prefix="sdg-bench-") as tmp:
        store = RunStore.open(Path(tmp) / "run", run_payload(config, params, model), commit_rows=1000)
        pipeline = echo.pipeline(params, Context(out=store.out, model_name=model["fingerprint"]))
        executor = Executor(pipeline, store, {"main": NoopBackend}, progress=False)
        started = time.perf_counter()
        executor.run()
        seconds = time.perf_counter() - started
        generating_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        manifest = store.finalize("second", text_fields=["output"])
        store.close()
    n = executor.generated().generated
    return {"requests": n, "seconds": round(seconds, 2), "req_per_s": round(n / seconds),
            "rows_published": manifest["dataset"]["num_rows"],
            "peak_rss_generating_mib": round(generating_kib / 1024, 1),
            "peak_rss_with_publish_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_noop(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--child-noop", str(n)], capture_output=True, text=True,
                              cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"error: the noop run of {n} requests failed:\n{proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, large = runs[0], runs[-1]
    return {"benchmark": "pipeline", "backend": NOOP_LABEL, "machine": platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "method": "echo (2 stages), commit_rows 1000", "runs": runs,
            "req_per_s_min": min(r["req_per_s"] for r in runs),
            "peak_rss_growth_generating": round(large["peak_rss_generating_mib"] / small["peak_rss_generating_mib"] - 1, 4),
            "peak_rss_growth_with_publish": round(large["peak_rss_with_publish_mib"] /
                                                  small["peak_rss_with_publish_mib"] - 1, 4)}


def report(result: dict) -> None:
    if result["backend"] == "vllm":
        print(f"pipeline vs raw vLLM ({result['device']}, echo 2 stages x {result['prompts_per_stage']} prompts x "
              f"{result['max_tokens']} tokens, medians of {result['repeat']}):")
        for name, v in result["median_output_tok_per_s"].items():
            print(f"  {name:20s} {v:10,.1f} output tok/s")
        print(f"  streaming / raw = {result['ratio_streaming_to_raw']:.3f}    "
              f"barriers / raw = {result['ratio_barriers_to_raw']:.3f}")
        return
    print(f"pipeline core ceiling, backend {result['backend']}:")
    for r in result["runs"]:
        print(f"  {r['requests']:>9,} requests  {r['req_per_s']:>8,} req/s  peak RSS generating "
              f"{r['peak_rss_generating_mib']:,.1f} MiB, with publishing {r['peak_rss_with_publish_mib']:,.1f} MiB")
    print(f"  peak RSS growth {result['runs'][0]['requests']:,} -> {result['runs'][-1]['requests']:,} requests: "
          f"generating {result['peak_rss_growth_generating'] * 100:+.1f}%, "
          f"with publishing {result['peak_rss_growth_with_publish'] * 100:+.1f}%")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdg bench pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["vllm", "noop"], default="vllm")
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=128, help="vllm: requests of stage 1 (and of stage 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="50000,500000", help="noop: requests in all, per run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child-noop", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_noop:
        print(json.dumps(noop_child(args.child_noop)))
        return {}
    result = bench_vllm(args) if args.backend == "vllm" else bench_noop(args)
    name = f"pipeline-{result['device']}-vllm.json" if args.backend == "vllm" else "pipeline-noop.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {args.out_dir / name}")
    return result


if __name__ == "__main__":
    main()
