"""`sdg validate CONFIG` (and `sdg run CONFIG --dry-run`): look before a long run, without generating.

    ok = validate(Path("configs/tdg.yaml"))      # prints the findings; False when there is any problem

Checks, each problem listed (all of them, not only the first):
  - the config: every field of the run config and of the method's params (pydantic's every error);
  - the input files: each file param of the method (examples, task spec, taxonomy, prompts) and each
    decontamination file exists and parses;
  - the model: it can be located or prepared, and its tokenizer loads;
  - every distinct constraint (JSON Schema, regex, choice, Lark grammar) is compiled with the chosen grammar
    backend's own library, as vLLM calls it (llguidance, xgrammar, outlines_core), with the model's
    tokenizer, in a worker process under a time limit per constraint: vLLM has no compile timeout for JSON
    schemas (vllm issue #54003), so a pathological schema ends here in an error naming it, not in a hang
    mid-run. Keywords the backend cannot enforce are named too;
  - per stage, what the config implies: root stages' requests counted, prompt tokens counted with the model's
    tokenizer and the output budget (max_tokens) summed; per-parent stages' fan-out per parent row; stages that
    read whole stages depend on those stages' rows.

Which constraints are found: those a stage declares (`Generate(..., constraints=...)`), those built while the
method declares its pipeline, those of every root stage's requests, those a per-parent stage builds for a placeholder parent row, and those the stage functions hold
(closures, module globals). A constraint built only from a real parent row's content is compiled at run
time, as before (the stage line says "none found before run time").
"""
from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from engine.compiling import DEFAULT_TIMEOUT, _Worker

TOKENIZE_AT_MOST = 2000
"""Root requests tokenized per stage; more are estimated from these (the line says so)."""


@dataclass
class Found:
    """A distinct constraint and where it was met."""

    kind: str
    spec: Any
    name: str
    stages: list[str] = field(default_factory=list)
    seconds: float | None = None
    error: str | None = None


@dataclass
class StagePlan:
    name: str
    kind: str  # "model" | "computed"
    reads: str
    line: str
    requests: int | None = None
    prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    constraints: int = 0


@dataclass
class Findings:
    config_path: Path
    method: str | None = None
    model: str | None = None
    grammar_backend: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: list[StagePlan] = field(default_factory=list)
    constraints: list[Found] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    """Input files already named in a problem (a stage failing on one is not named again)."""

    def problem(self, message: str) -> None:
        if not any(path in message for path in self.bad_files):
            self.problems.append(message)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------- entry points
def validate(config_path: Path, overrides: dict | None = None, timeout: float = DEFAULT_TIMEOUT, file=None) -> bool:
    """Check `config_path` and print what was found; True when there is no problem."""
    file = file or sys.stdout
    findings = check(config_path, overrides=overrides, timeout=timeout)
    print(render(findings), file=file, flush=True)
    return findings.ok


def check(config_path: Path, overrides: dict | None = None, timeout: float = DEFAULT_TIMEOUT,
          compile: bool = True) -> Findings:
    """Every check; nothing is generated and nothing is written (a method's pipeline is declared with a
    temporary directory as its run directory). compile=False skips compiling the constraints."""
    f = Findings(Path(config_path))
    config = _config(f, overrides or {})
    if config is None:
        return f
    f.method, f.grammar_backend = config.method, config.grammar_backend
    module = _module(f, config)
    _files(f, config, module)
    params = _params(f, config, module) if module is not None else None
    model_dir, tokenizer = _model(f, config)
    if params is None:
        return f
    with tempfile.TemporaryDirectory(prefix="sdg-validate-") as tmp:
        found: dict[str, Found] = {}
        _plan(f, config, params, Path(tmp), tokenizer, found)
    f.constraints = list(found.values())
    _unsupported(f, config.grammar_backend)
    if not compile:
        return f
    if model_dir is not None and config.backend == "vllm" and f.constraints:
        _compile_all(f, model_dir, config.grammar_backend, bool(config.engine.get("compact_json")), timeout)
    elif f.constraints and config.backend != "vllm":
        f.notes.append(f"backend {config.backend}: constraints are checked after decoding, not compiled")
    return f


# ------------------------------------------------------------------------------------------------- the config
def _errors(e: ValidationError, where: str) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        out.append(f"{where}: {loc + ': ' if loc else ''}{err['msg']}")
    return out


def _config(f: Findings, overrides: dict):
    """The RunConfig, with every top-level error listed; fields in error are dropped (defaults) so the other
    checks still run. None when the file cannot be read at all."""
    from engine.config import ConfigError, RunConfig, load_yaml_mapping
    try:
        raw = load_yaml_mapping(f.config_path, "config file")
    except ConfigError as e:
        f.problems.append(str(e))
        return None
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    for _ in range(len(raw) + 1):
        try:
            config = RunConfig.model_validate(raw)
            break
        except ValidationError as e:
            f.problems += _errors(e, str(f.config_path))
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            if "method" in bad or not bad & set(raw):
                return None
            raw = {k: v for k, v in raw.items() if k not in bad}
    else:  # pragma: no cover - each pass drops at least one field
        return None
    config._source = f.config_path
    return config


def _module(f: Findings, config):
    from engine import methods
    try:
        return methods.load(config.method)
    except methods.MethodError as e:
        f.problems.append(str(e))
        return None


def _params(f: Findings, config, module):
    """The method's validated params; None when they do not validate (every error listed, but for a file
    already named)."""
    params = dict(config.params)
    try:
        if hasattr(module, "resolve_paths"):
            params = module.resolve_paths(params, f.config_path.parent)
        return module.Config.model_validate(params)
    except ValidationError as e:
        for message in _errors(e, f"params of method {config.method}"):
            f.problem(message)
    except Exception as e:  # noqa: BLE001 - a method's resolve_paths or validator failing is a finding
        f.problem(f"params of method {config.method}: {e}")
    return None


def _files(f: Findings, config, module) -> None:
    """Each input file named in the params (FILE_PARAMS, resolved like the method does) and each
    decontamination file: it exists and parses."""
    if module is not None:
        params = dict(config.params)
        try:
            if hasattr(module, "resolve_paths"):
                params = module.resolve_paths(params, f.config_path.parent)
        except Exception:  # noqa: BLE001 - reported by _method
            pass
        for name in getattr(module, "FILE_PARAMS", ()):
            path = params.get(name)
            if isinstance(path, str) and path:
                problem = _parse_file(Path(path))
                if problem:
                    f.problems.append(f"params.{name}: {problem}")
                    f.bad_files.append(path)
    from engine.quality import QualityConfig
    from engine.quality.decontam import check_file
    try:
        quality = QualityConfig.model_validate(config.quality or {})
    except ValidationError as e:
        f.problems += _errors(e, "quality")
        return
    for i, d in enumerate(quality.decontam_files):
        try:
            check_file(d.path, d.columns)
        except Exception as e:  # noqa: BLE001 - QualityError and friends: a finding
            f.problems.append(f"quality.decontam_files[{i}]: {e}")


def _parse_file(path: Path) -> str | None:
    """Why `path` cannot be used (missing, unreadable, does not parse), or None."""
    if not path.is_file():
        return f"file not found: {path}"
    try:
        text = path.read_text(encoding="utf-8") if path.suffix != ".parquet" else None
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:
                        return f"{path}:{n}: not JSON ({e})"
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            yaml.safe_load(text)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq
            pq.read_metadata(path)
    except Exception as e:  # noqa: BLE001 - any parse error is the finding
        return f"{path}: does not parse ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _model(f: Findings, config):
    from engine import models
    try:
        model_dir = models.prepare(config.model)
    except Exception as e:  # noqa: BLE001 - ModelError and the converter's errors: a finding
        f.problems.append(f"model: {e}")
        return None, None
    f.model = model_dir.name
    try:
        from transformers import AutoTokenizer
        return model_dir, AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001
        f.problems.append(f"model {model_dir}: its tokenizer does not load ({e})")
        return model_dir, None


# ------------------------------------------------------------------------------------------------- the stages
class _Placeholder:
    """A parent row's value that can be shown but not inspected: a stage whose fan-out depends on its parent's
    content fails on it (and says so), a stage that passes its parent along counts."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __str__(self) -> str:
        return f"<{self._name}>"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)

    def _refuse(self, *a, **k):
        raise TypeError(f"the fan-out depends on the parent's {self._name!r}")

    __iter__ = __len__ = __getitem__ = __int__ = __float__ = __index__ = __bool__ = _refuse
    __lt__ = __gt__ = __le__ = __ge__ = __add__ = __radd__ = __mul__ = _refuse


class _PlaceholderRow(dict):
    def __missing__(self, key):
        return _Placeholder(str(key))

    def get(self, key, default=None):
        return self[key]


@contextmanager
def _collecting(found: dict[str, Found], stage: list[str]) -> Iterator[None]:
    """Record every Constraint built meanwhile, attributed to the stage named in `stage[0]` (if any)."""
    from engine.constraints import Constraint
    original = Constraint.__post_init__

    def post_init(self) -> None:
        original(self)
        _add(found, self, stage[0] if stage else None)

    Constraint.__post_init__ = post_init
    try:
        yield
    finally:
        Constraint.__post_init__ = original


def _identity(c) -> str:
    return json.dumps(c.identity(), sort_keys=True, default=str)


def _add(found: dict[str, Found], c, stage: str | None) -> None:
    key = _identity(c)
    item = found.get(key)
    if item is None:
        item = found[key] = Found(c.kind, c.spec, _describe(c))
    if stage and stage not in item.stages:
        item.stages.append(stage)


def _describe(c) -> str:
    if c.kind == "json":
        title = c.spec.get("title") if isinstance(c.spec, dict) else None
        text = json.dumps(c.spec, sort_keys=True)
        return f"JSON Schema {title!r} ({len(text):,} chars)" if title else f"JSON Schema {text[:60]}…" \
            if len(text) > 60 else f"JSON Schema {text}"
    if c.kind == "regex":
        return f"regex {c.spec[:60]!r}"
    if c.kind == "choice":
        return f"choice of {len(c.spec)}: {', '.join(map(repr, c.spec[:4]))}{'…' if len(c.spec) > 4 else ''}"
    return f"Lark grammar ({len(c.spec):,} chars)"


def _held(fn, seen: set[int], depth: int = 0) -> Iterator[tuple[Any, bool]]:
    """(constraint, whether the function holds it itself) for the constraints a stage function holds: in its
    closure (nested functions followed) and defaults (its own), and in its module's globals (dicts, lists and
    tuples of constraints included: the method's, not necessarily this stage's)."""
    from engine.constraints import Constraint
    if fn is None or id(fn) in seen or depth > 3:
        return
    seen.add(id(fn))
    values = [(c.cell_contents, True) for c in (getattr(fn, "__closure__", None) or ()) if _filled(c)]
    values += [(v, True) for v in (getattr(fn, "__defaults__", None) or ())]
    glob = getattr(fn, "__globals__", None)
    if glob is not None and id(glob) not in seen:
        seen.add(id(glob))
        values += [(v, False) for v in glob.values()]
    for v, own in values:
        items = list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else [v]
        for x in items:
            if isinstance(x, Constraint):
                yield x, own
            elif own and callable(x) and getattr(x, "__closure__", None) is not None and not isinstance(x, type):
                yield from _held(x, seen, depth + 1)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _plan(f: Findings, config, params, tmp: Path, tokenizer, found: dict[str, Found]) -> None:
    from engine import methods
    from engine.pipeline.core import seed_of
    from engine.pipeline.run import build_pipeline
    from engine.pipeline.stages import Compute, Each
    current: list[str] = []
    with _collecting(found, current):
        try:
            ctx = methods.Context(out=tmp, seed=config.seed, model_name="validate", progress=False,
                                  start_engine=lambda model_dir: (lambda: None))
            pipeline = build_pipeline(config, params, ctx)
        except Exception as e:  # noqa: BLE001 - a method refusing its inputs: a finding
            f.problem(f"method {config.method}: {e}")
            return
        for stage in pipeline.stages:
            current[:] = [stage.name]
            reads = stage.reads
            reads_text = ("-" if reads is None else
                          f"each row of {', '.join(reads.stages)}" if isinstance(reads, Each) else
                          f"whole {', '.join(reads.stages)}" + (f", up to {stage.rounds} rounds" if stage.rounds > 1 else ""))
            if isinstance(stage, Compute):
                line = ("computed, no model" + ("" if stage.persist else "; not stored (computed again by each run)"))
                f.stages.append(StagePlan(stage.name, "computed", reads_text, line))
                continue
            plan = StagePlan(stage.name, "model", reads_text, "")
            try:
                if reads is None:
                    _plan_root(plan, stage, config, tokenizer, seed_of, found)
                elif isinstance(reads, Each):
                    _plan_child(plan, stage, tokenizer, found)
                else:
                    plan.line = ("items known once the stages it reads are done"
                                 + (f"; at most {stage.attempts} attempts per item" if stage.attempts > 1 else ""))
            except Exception as e:  # noqa: BLE001 - a root stage failing on its own config: a finding
                f.problem(f"stage {stage.name}: its requests cannot be built: {e}")
                plan.line = "requests cannot be built (see the problems)"
            if stage.engine != "main":
                plan.line += f"; engine {stage.engine!r}"
            for c in stage.constraints:  # declared by the method: known from the config alone
                _add(found, c, stage.name)
            seen: set[int] = set()
            for fn in (stage.items, stage.request, stage.parse):
                for c, own in _held(fn, seen):
                    _add(found, c, stage.name if own else None)
            f.stages.append(plan)
        current.clear()
    for plan in f.stages:
        plan.constraints = sum(1 for c in found.values() if plan.name in c.stages)
        if plan.kind == "model" and not plan.constraints and plan.requests:
            plan.line += "; unconstrained"
        elif plan.kind == "model" and not plan.constraints and plan.requests is None:
            plan.line += "; constraint: none found before run time"


def prompt_tokens(request, tokenizer) -> int | None:
    """The prompt length of `request` in tokens, as the engine sends it (chat template applied); None without a
    tokenizer."""
    if tokenizer is None:
        return None
    if request.messages is not None:
        text = tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer(request.prompt)["input_ids"])


def _plan_root(plan: StagePlan, stage, config, tokenizer, seed_of, found: dict[str, Found]) -> None:
    items = list(stage.items())
    plan.requests = len(items)
    if not items:
        plan.line = "no request with this config"
        return
    prompt = output = 0
    counted = 0
    for i, item in enumerate(items):
        request = stage.request(item, seed_of(config.seed, stage.name, [i], 0))
        if request.constraint is not None:
            _add(found, request.constraint, stage.name)
        output += request.sampling.max_tokens
        if counted < TOKENIZE_AT_MOST:
            n = prompt_tokens(request, tokenizer)
            if n is not None:
                prompt += n
                counted += 1
    plan.max_output_tokens = output
    if counted:
        plan.prompt_tokens = round(prompt * len(items) / counted)
    estimate = " (estimated from the first %d)" % counted if counted < len(items) else ""
    plan.line = (f"{len(items):,} requests; prompt tokens {plan.prompt_tokens or 0:,}{estimate}; "
                 f"output at most {output:,} tokens")
    if stage.attempts > 1:
        plan.line += f"; up to {stage.attempts} attempts per item (x{stage.attempts} at worst)"


def _plan_child(plan: StagePlan, stage, tokenizer, found: dict[str, Found]) -> None:
    parent = _PlaceholderRow(key="0" * 64)
    try:
        items = list(stage.items(parent))
    except Exception as e:  # noqa: BLE001 - the placeholder refused: the count needs the parent's content
        plan.line = f"fan-out per parent row: depends on the parent row ({e})"
        return
    line = f"{len(items)} request{'s' if len(items) != 1 else ''} per parent row"
    if items:
        try:
            request = stage.request(items[0], 0)
            if request.constraint is not None:
                _add(found, request.constraint, stage.name)
            n = prompt_tokens(request, tokenizer)
            line += f"; output at most {request.sampling.max_tokens:,} tokens each"
            if n is not None:
                line += f"; about {n:,} prompt tokens each (with a placeholder parent)"
        except Exception:  # noqa: BLE001 - the request needs the parent's real content
            line += "; its requests depend on the parent row's content"
    if stage.attempts > 1:
        line += f"; up to {stage.attempts} attempts each"
    plan.line = line


# ------------------------------------------------------------------------------------------------- constraints
def _unsupported(f: Findings, grammar_backend: str) -> None:
    from engine.backends.vllm import unsupported_features
    for c in f.constraints:
        if c.kind == "json":
            bad = unsupported_features(c.spec, grammar_backend)
            if bad:
                c.error = f"the {grammar_backend} grammar backend cannot enforce {', '.join(bad)}"


def _compile_all(f: Findings, model_dir: Path, grammar_backend: str, compact: bool, timeout: float) -> None:
    """Compile each constraint in a worker process; one that takes longer than `timeout` is an error naming
    it, and the worker is replaced for the next ones."""
    todo = [c for c in f.constraints if c.error is None]
    worker = None
    try:
        for c in todo:
            if worker is None:
                worker = _Worker(model_dir, grammar_backend, compact)
                if worker.error:
                    f.problems.append(f"grammar backend {grammar_backend}: {worker.error}")
                    worker.stop()
                    return
            status, value = worker.compile(c.kind, c.spec, timeout)
            if status == "ok":
                c.seconds = value
            elif status == "timeout":
                c.error = (f"did not compile within {timeout:g} s with {grammar_backend} (a pathological "
                           f"constraint would stall the engine: simplify it)")
                worker.stop()
                worker = None
            else:
                c.error = f"{grammar_backend} cannot compile it: {value}"
    finally:
        if worker is not None:
            worker.stop()
    for c in f.constraints:
        if c.error:
            stages = f" (stage {', '.join(c.stages)})" if c.stages else ""
            f.problems.append(f"{c.name}{stages}: {c.error}")


# ------------------------------------------------------------------------------------------------- output
def render(f: Findings) -> str:
    lines = [f"config {f.config_path}: method {f.method or '?'}, model {f.model or '?'}, "
             f"grammar backend {f.grammar_backend or '?'}"]
    if f.stages:
        width = max(len(s.name) for s in f.stages)
        lines.append("stages (what the config implies):")
        for s in f.stages:
            reads = "" if s.reads == "-" else f" [reads {s.reads}]"
            lines.append(f"  {s.name:<{width}}  {s.kind:<8} {s.line}{reads}")
        roots = [s for s in f.stages if s.requests is not None]
        if roots:
            lines.append(f"  root stages: {sum(s.requests for s in roots):,} requests, "
                         f"{sum(s.prompt_tokens or 0 for s in roots):,} prompt tokens, at most "
                         f"{sum(s.max_output_tokens or 0 for s in roots):,} output tokens")
    if f.constraints:
        lines.append(f"constraints: {len(f.constraints)} distinct")
        for c in f.constraints:
            state = ("error" if c.error else f"compiled in {c.seconds:.2f} s" if c.seconds is not None
                     else "not compiled")
            lines.append(f"  {c.name} [{', '.join(c.stages) or 'declared'}]: {state}")
    lines += [f"note: {n}" for n in f.notes]
    if f.problems:
        lines.append(f"{len(f.problems)} problem{'s' if len(f.problems) != 1 else ''}:")
        lines += [f"error: {p}" for p in f.problems]
    else:
        lines.append("ok: no problem found")
    return "\n".join(lines)
