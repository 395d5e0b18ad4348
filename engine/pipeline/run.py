"""Running a method: a run config (engine.config) + its method's declared pipeline -> a run directory.

    config = load_run_config(Path("configs/echo.yaml"))     # every field checked, before any model loads
    out, manifest, stats = run_method(config, Path("runs/echo"))

`run_method` is the same for every method and every replica: it opens the store, builds the method's pipeline
(`module.pipeline(params, ctx)`), runs it with the core (engine.pipeline.core.Executor), and, on replica 0,
publishes the declared stage once every replica is done.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from engine.config import ConfigError, JudgeSettings, RunConfig, first_error, load_yaml_mapping, validated

# Part of every run's identity: runs written before the pipeline core (whose keys and seeds were each method's
# own) are refused on resume rather than mixed with rows keyed the new way.
PIPELINE_VERSION = 2


def load_run_config(path: Path) -> RunConfig:
    """A run config file, with its method's params validated (one ConfigError naming the problem)."""
    config = validated(RunConfig, load_yaml_mapping(path, "config file"), str(path))
    config._source = path
    method_config(config)  # fail now on bad params, before any model loads
    return config


def method_config(config: RunConfig):
    """The method's own Config from `config.params` (relative paths resolved against the config's folder)."""
    from engine import methods
    module = methods.load(config.method)
    params = dict(config.params)
    base = config._source
    try:
        if base is not None and hasattr(module, "resolve_paths"):
            params = module.resolve_paths(params, Path(base).parent)
        return module.Config.model_validate(params)
    except ValidationError as e:
        raise ConfigError(first_error(e, f"params of method {config.method}")) from None


def file_identity(path: str) -> dict | str:
    """An input file as the run's identity sees it: its name and the sha256 of its bytes, not where it lies, so
    a run resumes from another working folder or a moved checkout, and refuses to when the file's content
    changed. A path that is not a readable file stays as it is (the method reports it)."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return path
    return {"file": Path(path).name, "sha256": digest}


def run_payload(config: RunConfig, params=None, model_id: dict | None = None) -> dict:
    """What identifies a run (hashed by the store): the config with the method's validated params and the
    model's fingerprint, without the settings that do not change what is generated (store, parallel)."""
    from engine import methods, models
    params = params if params is not None else method_config(config)
    model_id = model_id or models.identity(models.prepare(config.model))
    payload = config.model_dump(mode="json")
    payload["params"] = params.model_dump(mode="json")
    for name in getattr(methods.load(config.method), "FILE_PARAMS", ()):
        if isinstance(payload["params"].get(name), str):
            payload["params"][name] = file_identity(payload["params"][name])
    for f in (payload.get("quality") or {}).get("decontam_files") or []:
        if isinstance(f, dict) and isinstance(f.get("path"), str):
            f["path"] = file_identity(f["path"])
    payload["model_fingerprint"] = model_id["fingerprint"]
    payload["pipeline"] = PIPELINE_VERSION
    if payload.get("judge") is None:  # runs without a judge keep the identity they had before it existed
        payload.pop("judge", None)
    payload.pop("store", None)  # commit cadence does not change what is generated
    payload.pop("parallel", None)  # nor does how many replicas generate it: resume with any N
    return payload


def build_pipeline(config: RunConfig, params=None, ctx=None):
    """The method's declared pipeline (no model, no store: cheap), e.g. to check `--stop-after` up front; with
    the run config's `judge:`, the judge stage appended (add_judge)."""
    from engine import methods
    module = methods.load(config.method)
    params = params if params is not None else method_config(config)
    ctx = ctx or methods.Context(out=Path("."), seed=config.seed, model_name="model")
    pipeline = module.pipeline(params, ctx)
    return add_judge(pipeline, config.judge, ctx) if config.judge is not None else pipeline


JUDGE_STAGE = "judge"


def add_judge(pipeline, judge: JudgeSettings, ctx):
    """`pipeline` with a Generate stage "judge" appended, which reads each row of the published stage and is
    published instead: a local model scores the row's `judge.fields` (default: the published text fields) on
    the rubric, its output constrained to "1".."scale"; the row is published with its score in `judge.column`
    and the scored row's key in `judged_key`, or is a reject `judge_below_threshold` when the score is below
    `judge.threshold`. The method knows nothing of it: rows the judge rejects are not replaced."""
    from engine.constraints import Constraint
    from engine.pipeline.stages import Each, Generate, Pipeline, Publish
    from engine.prompting import render
    from engine.request import Request
    published = pipeline.publish
    fields = judge.fields or published.text_fields
    scores = Constraint.choice([str(i) for i in range(1, judge.scale + 1)])
    model_name, engine, engines = ctx.model_name, "main", dict(pipeline.engines)
    if judge.model is not None:
        from engine import models
        model_dir = models.prepare(judge.model)  # a bad path fails now, before any stage
        fingerprint = models.identity(model_dir)["fingerprint"]
        if fingerprint != ctx.model_name:  # another model: a second engine, started when a row is first judged
            model_name, engine = fingerprint, JUDGE_STAGE
            engines[engine] = ctx.start_engine(model_dir) if ctx.start_engine is not None else _no_engine(model_dir)

    def request(row: dict, seed: int) -> Request:
        shown = [{"name": f, "value": v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}
                 for f in fields if (v := row.get(f)) is not None]
        user = render(judge.prompt, rubric=judge.rubric, fields=shown, scale=judge.scale)
        return Request.build(stage=JUDGE_STAGE, model=model_name, messages=[{"role": "user", "content": user}],
                             constraint=scores, sampling=judge.sampling, seed=seed, meta={"row": row})

    def parse(request: Request, result) -> tuple[dict, str | None]:
        row = {**request.meta["row"], "key": result.key, "judged_key": request.meta["row"]["key"]}
        if not result.valid:
            return {**row, judge.column: None}, result.reason or "invalid"
        score = int(result.text)
        row[judge.column] = score
        return row, (None if score >= judge.threshold else
                     f"judge_below_threshold: {score} < {judge.threshold}")

    stage = Generate(JUDGE_STAGE, reads=Each(published.stage), items=lambda row: [row], request=request,
                     parse=parse, engine=engine, constraints=(scores,), gates=("judge_below_threshold",))
    return Pipeline([*pipeline.stages, stage], Publish(JUDGE_STAGE, published.text_fields), engines=engines)


def _no_engine(model_dir: Path) -> Callable[[], Any]:
    def start() -> Any:
        raise RuntimeError(f"no engine starter for the judge model {model_dir} (Context.start_engine is None)")
    return start


def check_stop_after(config: RunConfig, stop_after: str | None) -> None:
    """Refuse an unknown `--stop-after` for any method, before anything runs (StopAfterError: a ConfigError)."""
    from engine.pipeline.core import check_stop_after as check
    if stop_after is not None:
        check(build_pipeline(config), stop_after)


def run_method(config: RunConfig, out: Path, *, new: bool = False, stop_after: str | None = None,
               replica: tuple[int, int] = (0, 1), progress: bool = True, session: str | None = None,
               engine_overrides: dict | None = None, streaming: bool = True,
               engines: dict[str, Callable[[], Any]] | None = None):
    """Run `config`'s method into run dir `out`; returns (run dir, manifest, the model stages' summed stats).

    With `replica=(i, N)`, N > 1, this process is replica i of the launch named `session` (engine.parallel
    starts them): it generates only what it owns, meets the others where a stage reads whole stages, and
    replica 0 publishes once all of them are done; the others return manifest None. `engine_overrides` (a
    replica's GPU memory share, tensor parallelism) reach the backend, not the run hash. `engines` replaces
    the engine starters (benchmarks and tests lend one).
    """
    from engine import methods, models
    from engine.backends.loader import load_backend
    from engine.pipeline.core import Executor
    from engine.quality import QualityConfig
    from engine.store import RunStore

    params = method_config(config)
    check_stop_after(config, stop_after)
    # Methods publish deduplicated rows by default; a method's QUALITY_DEFAULTS (TDG: no near-dedup) and then
    # the config's `quality: {exact_dedup: false, ...}` override that.
    defaults = getattr(methods.load(config.method), "QUALITY_DEFAULTS", {})
    quality = QualityConfig.model_validate({**defaults, **(config.quality or {})})
    quality.check_files()
    model_dir = models.prepare(config.model)
    model_id = models.identity(model_dir)
    payload = run_payload(config, params, model_id)
    store = RunStore.open(out, payload, new=new, writer=f"r{replica[0]}",
                          commit_rows=config.store.commit_rows, commit_seconds=config.store.commit_seconds,
                          identity={"model": model_id})
    engine_opts = {**config.engine, **(engine_overrides or {})}
    sync = None
    if replica[1] > 1:
        from engine.parallel.sync import ReplicaSync
        sync = ReplicaSync(store, replica, session)
    serialized = sync.serialized if sync else (lambda start: start)  # engine start-ups, one per GPU at a time

    def starter(model: Path) -> Callable[[], Any]:
        return serialized(lambda: load_backend(config.backend, str(model), grammar_backend=config.grammar_backend,
                                               seed=config.seed, **engine_opts))

    ctx = methods.Context(out=store.out, seed=config.seed, model_name=model_id["fingerprint"],
                          start_engine=starter, progress=progress, run_id=store.config_hash[:16],
                          stop_after=stop_after)
    pipeline = build_pipeline(config, params, ctx)
    checker = None
    if engines is None and config.backend == "vllm":  # every constraint compiles under a limit in the run too
        from engine.compiling import ConstraintChecker
        checker = ConstraintChecker(model_dir, config.grammar_backend, compact=bool(config.engine.get("compact_json")),
                                    timeout=config.compile_timeout_s)
    executor = Executor(pipeline, store, engines or {"main": starter(model_dir)}, seed=config.seed,
                        replica=replica, sync=sync, quality=quality, progress=progress, streaming=streaming,
                        checker=checker)
    try:
        complete = executor.run(stop_after)
    finally:
        store.commit()
        if engines is None:
            executor.close_engines()
        if checker is not None:
            checker.close()
    if sync is not None:
        sync.finish()  # every replica's work is committed before replica 0 publishes
    stats = executor.generated()
    if not complete or replica[0] != 0:  # stopped early on purpose, or not the publishing replica
        store.close()
        return store.out, None, stats
    manifest = store.finalize(pipeline.publish.stage, quality=quality, text_fields=pipeline.publish.text_fields)
    store.close()
    return store.out, manifest, stats
