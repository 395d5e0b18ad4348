"""`sdg`: the command line.

    sdg model prepare|path [--model PATH]
    sdg generate --prompts FILE.jsonl --out DIR [--schema FILE] [--backend vllm|transformers] [--model PATH] ...
                 [--replicas N [--ray [ADDRESS]]]    (a one-stage pipeline: engine.methods.generate)
    sdg run CONFIG.yaml --out DIR [--new] [--stop-after STAGE] [--replicas N [--ray [ADDRESS]] [--engines-per-gpu K]]
    sdg export DIR --format jsonl|parquet|templategsm|superglue --to PATH
    sdg tdg verify TEMPLATES.jsonl  |  sdg tdg instantiate TEMPLATES.jsonl -n N --out DIR
    sdg bench throughput|instantiate|replicas ...

Bad input (config, schema, prompts file, model path) is one line on stderr starting with `error:` and exit
status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from engine.backends.base import GRAMMAR_BACKENDS, DEFAULT_GRAMMAR_BACKEND
from engine.errors import user_errors

if os.environ.get("SDG_QUIET"):
    # vLLM's engine-core and worker processes are spawned: each imports this module first (as __mp_main__),
    # then vLLM, which logs warnings at import time, before its own logging is configured from the environment.
    logging.getLogger("vllm").setLevel(logging.ERROR)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--backend", default=None, choices=["vllm", "transformers"], help="generation backend (default vllm)")
    p.add_argument("--grammar-backend", default=None, choices=GRAMMAR_BACKENDS,
                   help=f"structured-output backend (default {DEFAULT_GRAMMAR_BACKEND})")


def _add_replica_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="N replicas share the run (processes, or Ray actors with --ray); docs/scale-out.md")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="replicas as Ray actors: 'auto' (default: this machine's cluster, else a local one), "
                        "'local' (a private cluster on 127.0.0.1), or HOST:PORT")
    p.add_argument("--engines-per-gpu", type=int, default=None, metavar="K",
                   help="replicas sharing one GPU (default: chosen from model size, GPU memory and cores)")
    p.add_argument("--replica", default=None, help="INDEX/COUNT: run only this replica (launched by hand, "
                   "one per machine or process; needs --session)")
    p.add_argument("--session", default=None, help="with --replica: a name shared by the replicas of one "
                   "launch, new for each launch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdg", description="Offline synthetic-data engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's own logs")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="prepare or locate the model")
    model.add_argument("action", choices=["prepare", "path"])
    model.add_argument("--model", default=None)

    gen = sub.add_parser("generate", help="generate one output per line of a prompts file")
    gen.add_argument("--prompts", required=True, type=Path)
    gen.add_argument("--out", required=True, type=Path)
    gen.add_argument("--schema", default=None, help="default JSON Schema (file) for lines without a constraint")
    _add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--new", action="store_true", help="start a separate run dir instead of resuming OUT")
    gen.add_argument("--commit-rows", type=int, default=1000)
    gen.add_argument("--commit-seconds", type=float, default=30.0)
    gen.add_argument("--on-bad-line", choices=["error", "reject"], default="error",
                     help="a prompts file with bad lines: 'error' (default) refuses it, listing every bad line; "
                          "'reject' runs the good lines and keeps each bad one as a reject with its reason")
    gen.add_argument("--compile-timeout", type=float, default=None, metavar="S",
                     help="seconds one distinct schema/regex may take to compile before the engine starts "
                          "(run config compile_timeout_s, default 30); past it the line is bad")
    _add_replica_args(gen)

    run = sub.add_parser("run", help="run a method (TDG, TarGEN, GLAN) from a YAML config")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="the run directory (required unless --plan or --dry-run)")
    run.add_argument("--new", action="store_true", help="start a separate run dir instead of resuming OUT")
    run.add_argument("--stop-after", default=None, help="stop after this stage (e.g. GLAN's taxonomy, to edit it)")
    run.add_argument("--dry-run", action="store_true", help="validate the config and show what it implies "
                     "(as `sdg validate`); generate nothing")
    run.add_argument("--plan", action="store_true", help="print, per stage, the requests and about how many prompt "
                     "and output tokens the config implies; loads no model, generates nothing")
    _add_replica_args(run)
    _add_engine_args(run)

    export = sub.add_parser("export", help="export a run's dataset")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", required=True, choices=["jsonl", "parquet", "templategsm", "superglue"],
                        help="jsonl or parquet: one file; templategsm (TDG runs): a folder with "
                        "templategsm.jsonl and its card; superglue (TarGEN runs): a folder with the task's "
                        "official SuperGLUE JSON Lines layout")
    export.add_argument("--to", required=True, type=Path)

    tdg = sub.add_parser("tdg", help="TDG templates: verify a templates file, or instantiate it into a run")
    tdg_sub = tdg.add_subparsers(dest="tdg_command", required=True)
    verify = tdg_sub.add_parser("verify", help="verify each template of a JSONL file (ours or TemplateMath's "
                                "legacy Python): one line each; exit 1 if any is rejected")
    verify.add_argument("templates", type=Path)
    verify.add_argument("-k", type=int, default=8, help="instances checked per template (default 8)")
    verify.add_argument("--seed", type=int, default=0)
    inst = tdg_sub.add_parser("instantiate", help="N verified problems per template into a run directory "
                              "(resumable; every row checked twice)")
    inst.add_argument("templates", type=Path)
    inst.add_argument("-n", type=int, required=True, help="problems per template")
    inst.add_argument("--out", required=True, type=Path)
    inst.add_argument("--new", action="store_true", help="start a separate run dir instead of resuming OUT")
    inst.add_argument("--seed", type=int, default=0)
    inst.add_argument("-k", type=int, default=8, help="instances checked per template before instantiating")
    inst.add_argument("--commit-rows", type=int, default=20_000,
                      help="rows per commit (default 20,000: rows without a model are cheap to redo, and fewer, "
                      "larger commits keep the run's bookkeeping small at a million rows; at most 30 s of work "
                      "is at risk either way)")

    report = sub.add_parser("report", help="one self-contained HTML page about a run (finished or in progress)")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="the HTML file (default: RUN_DIR.report.html "
                        "beside the run directory)")

    validate = sub.add_parser("validate", help="check a run config without generating: config, input files, "
                              "every constraint compiled, requests and tokens per stage")
    validate.add_argument("config", type=Path)
    validate.add_argument("--timeout", type=float, default=None, metavar="S",
                          help="seconds allowed to compile one constraint (default 20)")
    _add_engine_args(validate)

    bench = sub.add_parser("bench", help="benchmarks (see bench/)")
    bench.add_argument("what", choices=["throughput", "instantiate", "replicas", "pipeline", "all"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    from engine.bundle import add_arguments as add_bundle_arguments
    bundle = sub.add_parser("bundle", help="wheels, project, model and an offline installer for a server with "
                            "no network, in checksummed pieces (docs/gpu.md)")
    add_bundle_arguments(bundle)
    return parser


def cmd_model(args) -> int:
    from engine import models
    path = models.prepare(args.model)
    print(path)
    return 0


def cmd_generate(args) -> int:
    """A one-stage pipeline (engine.methods.generate) over the prompts file, launched like `sdg run`. Every line
    is checked first, streaming, before anything is written or any engine starts (_check_grammar_support)."""
    from engine import models
    from engine.config import RunConfig
    from engine.constraints import Constraint
    from engine.prompts_file import refusal
    from engine.request import Sampling

    backend_name = args.backend or "vllm"
    grammar = args.grammar_backend or DEFAULT_GRAMMAR_BACKEND
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    model_id = models.identity(models.prepare(args.model))
    default_schema = Constraint.json_schema(args.schema) if args.schema else None
    # Every line's output is published, as asked: no dedup (a prompts file may repeat a prompt on purpose).
    config = RunConfig(method="generate", model=args.model, backend=backend_name, grammar_backend=grammar,
                       seed=args.seed, store={"commit_rows": args.commit_rows, "commit_seconds": args.commit_seconds},
                       quality={"exact_dedup": False, "near_dedup": False},
                       params={"prompts": str(args.prompts.resolve()), "sampling": sampling.model_dump(),
                               "schema": default_schema.spec if default_schema else None,
                               "meta": {"model": model_id["name"], "backend": backend_name, "grammar_backend": grammar},
                               "on_bad_line": args.on_bad_line},
                       **({"compile_timeout_s": args.compile_timeout} if args.compile_timeout is not None else {}))
    bad = _check_grammar_support(args.prompts, config, default_schema, sampling)
    if bad and args.on_bad_line == "error":
        raise refusal(args.prompts, bad)
    # the lines only the model's tokenizer and the grammar backend find bad; the others are found again as read
    config.params["bad_lines"] = {b.number: b.reason for b in bad if b.code in (
        "unsupported_schema", "refused_schema", "compile_timeout", "prompt_too_long")}
    return _launch(config, args, stop_after=None)


def _check_grammar_support(prompts: Path, config, default_schema, sampling) -> list:
    """Every bad line of the prompts file (engine.prompts_file.check_lines, streaming), before an engine start
    of 70 s. On vLLM also: JSON Schema keywords the grammar backend cannot enforce; each distinct constraint
    validated as vLLM validates a request and compiled under `config.compile_timeout_s` in a worker process
    (engine.compiling.ConstraintChecker); each prompt counted with the model's tokenizer against the engine's
    context (max_model_len)."""
    from engine import models
    from engine.prompts_file import check_lines
    if config.backend != "vllm":
        return list(check_lines(prompts, default_schema=default_schema, defaults=sampling))
    from engine.compiling import ConstraintChecker
    model_dir = models.prepare(config.model)
    checker = ConstraintChecker(model_dir, config.grammar_backend, compact=bool(config.engine.get("compact_json")),
                                timeout=config.compile_timeout_s)
    try:
        return list(check_lines(prompts, default_schema=default_schema, defaults=sampling,
                                grammar_backend=config.grammar_backend,
                                compile=lambda c: checker.check(c.kind, c.spec),
                                too_long=_context_check(model_dir, config)))
    finally:
        checker.close()


def _context_check(model_dir: Path, config):
    """line -> None, or why its prompt does not fit the engine's context (as engine.backends.vllm counts it:
    chat template applied, plus one token of output). The tokenizer is loaded and used only for prompts that
    might not fit: a token is at least one byte, so a prompt of fewer bytes than the context less a margin for
    the chat template fits."""
    import inspect

    from engine.backends.vllm import VllmBackend
    limit = int(config.engine.get("max_model_len")
                or inspect.signature(VllmBackend.__init__).parameters["max_model_len"].default)
    tokenizer = None

    def too_long(line) -> str | None:
        nonlocal tokenizer
        texts = [line.prompt] if line.prompt is not None else [m["content"] for m in line.messages]
        if sum(len(t.encode()) for t in texts) + 64 * len(texts) + 1024 < limit:
            return None
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if line.messages is not None:
            text = tokenizer.apply_chat_template(list(line.messages), tokenize=False, add_generation_prompt=True)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            n = len(tokenizer(line.prompt)["input_ids"])
        if n + 1 > limit:
            return f"{n:,} prompt tokens do not fit the engine's context of {limit:,} (max_model_len)"
        return None
    return too_long


def cmd_run(args) -> int:
    from engine.config import ConfigError
    from engine.pipeline.run import check_stop_after
    if args.plan:
        from engine.plan import plan, render
        print(render(plan(args.config, model=args.model)))
        return 0
    if args.dry_run:
        return cmd_validate(args)
    if args.out is None:
        raise ConfigError("sdg run needs --out DIR (the run directory), unless --plan or --dry-run")
    config = _checked_run_config(args.config)
    for flag in ("model", "backend", "grammar_backend"):
        if getattr(args, flag):
            setattr(config, flag, getattr(args, flag))
    check_stop_after(config, args.stop_after)  # for every method, before any model loads or replica starts
    return _launch(config, args, stop_after=args.stop_after)


def _checked_run_config(path: Path):
    """The run config at `path` with its method's params checked; on bad input one error naming every problem
    found (the checks of `sdg validate`, without compiling or loading a model), not only the first."""
    from engine.config import ConfigError
    from engine.pipeline.run import load_run_config, method_config
    try:
        config = load_run_config(path)
        method_config(config)
        return config
    except user_errors() as first:
        from engine.validate import check
        problems = check(path, compile=False).problems
        if len(problems) <= 1:
            raise
        raise ConfigError(f"{path}: {len(problems)} problems: " + "; ".join(p.replace(f"{path}: ", "")
                                                                         for p in problems)) from first


def _launch(config, args, stop_after: str | None) -> int:
    """Run `config` here, as one replica (--replica I/N), or as N replicas (--replicas N, --ray)."""
    from engine.config import ConfigError, ParallelSettings
    from engine.parallel.placement import ReplicaError
    from engine.pipeline.run import run_method
    parallel = config.parallel.model_dump()
    for flag, field in (("replicas", "replicas"), ("ray", "ray_address"), ("engines_per_gpu", "engines_per_gpu")):
        if getattr(args, flag) is not None:
            parallel[field] = getattr(args, flag)
    config.parallel = ParallelSettings.model_validate(parallel)
    replica = (0, 1)
    if args.replica:
        m = re.fullmatch(r"(\d+)/(\d+)", args.replica)
        if not m or not int(m[1]) < int(m[2]):
            raise ConfigError(f"--replica must be INDEX/COUNT with 0 <= INDEX < COUNT, got {args.replica!r}")
        replica = (int(m[1]), int(m[2]))
        if replica[1] > 1 and (not args.session or args.new):
            raise ConfigError("--replica INDEX/COUNT needs --session NAME (the same for every replica of this "
                              "launch) and no --new; or let `--replicas N` start them all")
    try:
        if args.replica is None and (config.parallel.replicas > 1 or config.parallel.ray_address):
            from engine.parallel.launch import run_parallel
            out, manifest = run_parallel(config, args.out, new=args.new, stop_after=stop_after)
            stats = None
        else:
            out, manifest, stats = run_method(config, args.out, new=args.new, stop_after=stop_after,
                                              replica=replica, session=args.session)
    except ReplicaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if replica[0] != 0:
        print(f"replica {replica[0]}/{replica[1]} done; replica 0 publishes {out}/data")
        return 0
    _summary(out, manifest, stats)
    return 0


def cmd_report(args) -> int:
    from engine.report import write_report
    path = write_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0


def cmd_validate(args) -> int:
    """`sdg validate CONFIG` and `sdg run CONFIG --dry-run`: every problem listed, exit status 2 if any."""
    from engine.validate import DEFAULT_TIMEOUT, validate
    overrides = {flag: getattr(args, flag, None) for flag in ("model", "backend", "grammar_backend")}
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT
    return 0 if validate(args.config, overrides=overrides, timeout=timeout) else 2


def cmd_export(args) -> int:
    if args.format in ("jsonl", "parquet"):
        from engine.store import export
        n = export(args.run_dir, args.format, args.to)
    else:  # a method's own format: the method of the run exports it
        n = _method_export(args.run_dir, args.format, args.to)
    print(f"exported {n} rows to {args.to}")
    return 0


def _method_export(run_dir: Path, fmt: str, to: Path) -> int:
    import json
    from engine import methods
    from engine.store import StoreError
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        raise StoreError(f"{run_dir} is not a run directory (no manifest.json)")
    method = json.loads(manifest.read_text())["config"]["method"]
    exports = getattr(methods.load(method), "EXPORTS", {})
    if fmt not in exports:
        owners = [name for name in methods.REGISTRY if fmt in getattr(methods.load(name), "EXPORTS", {})]
        raise StoreError(f"format {fmt} is for runs of {', '.join(owners) or 'no method'}; {run_dir} is a "
                         f"{method} run")
    if not list((run_dir / "data").glob("*.parquet")):
        raise StoreError(f"{run_dir} has no published dataset (data/*.parquet); finish the run first")
    return exports[fmt](run_dir, to)


def cmd_tdg(args) -> int:
    """`sdg tdg verify FILE` and `sdg tdg instantiate FILE -n N --out OUT` (a TDG run with no model stage)."""
    from engine.methods.tdg import read_templates, verify_file_templates
    if args.tdg_command == "verify":
        verified = verify_file_templates(read_templates(args.templates), k=args.k, seed=args.seed)
        for number, _raw, fmt, v in verified:
            verdict = "accepted" if v.accepted else f"rejected {v.reason}: {' '.join(str(v.details).split())}"
            print(f"line {number}\t{v.template_id}\t{fmt}\t{verdict}")
        rejected = sum(not v.accepted for *_, v in verified)
        print(f"{len(verified) - rejected} accepted, {rejected} rejected", file=sys.stderr)
        return 1 if rejected else 0
    from engine.config import RunConfig
    from engine.pipeline.run import run_method
    config = RunConfig(method="tdg", seed=args.seed,
                       params={"templates_file": str(args.templates.resolve()), "problems_per_template": args.n,
                               "verify_instances": args.k, "seed": args.seed, "topics": [],
                               "templates_per_topic": 0, "use_seed_templates": False},
                       store={"commit_rows": args.commit_rows})
    out, manifest, stats = run_method(config, args.out, new=args.new)
    _summary(out, manifest, stats)
    return 0


def cmd_bench(args) -> int:
    import runpy
    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.what}.py"
    if not script.is_file():
        raise SystemExit(f"error: benchmark script not found: {script}")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_bundle(args) -> int:
    from engine.bundle import build
    build(args)
    return 0


def _summary(out: Path, manifest: dict | None, stats) -> None:
    if manifest is None:  # stopped on purpose before publishing (--stop-after)
        print(f"stopped early; committed stages are in {out}; rerun without --stop-after to continue")
        return
    rows = ((manifest or {}).get("dataset") or {}).get("num_rows")
    print(f"dataset: {out}/data  ({rows if rows is not None else '?'} rows; card {out}/README.md)")
    for name, stage in (manifest.get("stages") or {}).items():  # acceptance of every stage that rejected some
        if stage.get("rejects"):
            reasons = sorted(stage.get("rejects_by_reason", {}).items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{reason} {n}" for reason, n in reasons[:4]) + (", ..." if len(reasons) > 4 else "")
            print(f"  {name}: {stage.get('rows', 0)} accepted, {stage['rejects']} rejected ({shown})")
    if stats is not None and getattr(stats, "generated", 0):
        print(f"generated {stats.generated} outputs, {stats.output_tokens} output tokens in {stats.seconds:.1f}s: "
              f"{stats.output_tokens_per_s:,.0f} output tok/s")


def _quiet() -> None:
    """Without -v: only our own lines. vLLM's logs (its engine-core and worker processes read the same
    environment), torch's C++ warnings, Python warnings and vLLM's weight-loading bar are off; errors still show."""
    import warnings
    for name, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TORCH_CPP_LOG_LEVEL", "ERROR"),
                        ("PYTHONWARNINGS", "ignore"), ("SDG_QUIET", "1")):
        os.environ[name] = value
    warnings.simplefilter("ignore")
    logging.getLogger("vllm").setLevel(logging.ERROR)


def _one_line(e: Exception) -> str:
    from pydantic import ValidationError
    if isinstance(e, ValidationError):  # e.g. Sampling(max_tokens=0): name the field and the rule
        err = e.errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet()
    handlers = {"model": cmd_model, "generate": cmd_generate, "run": cmd_run, "export": cmd_export,
                "bench": cmd_bench, "bundle": cmd_bundle, "tdg": cmd_tdg,
                "report": cmd_report, "validate": cmd_validate}
    try:
        return handlers[args.command](args)
    except user_errors() as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed rows are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
