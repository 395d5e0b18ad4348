"""`sdg generate` and bad lines at scale (issue #18): every bad line of a prompts file listed in one error, or,
with `--on-bad-line reject`, each kept as a reject with its reason while the good lines run; every distinct
constraint compiled under a time limit before the engine starts; a complete run resumed without an engine.
Real vLLM and the embedded model where an engine runs; the grammar libraries and the model's tokenizer always."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import sdg

REFUSED = {"type": "string", "minLength": 5, "maxLength": 2}
"""A valid JSON Schema, without keywords the grammar backends cannot enforce, that vLLM refuses (unsatisfiable)."""

LINES = [
    {"id": "good-1", "prompt": "Say hi:"},
    "{not json",                                                                                 # invalid JSON
    {"id": "bad-schema", "prompt": "x", "schema": {"type": "object", "properties": {"a": {"type": 5}}}},
    {"id": "good-2", "prompt": "Yes or no?", "choices": ["yes", "no"]},
    {"id": "unsupported", "prompt": "x", "schema": {"type": "array", "uniqueItems": True}},      # guidance: no
    {"id": "refused", "prompt": "x", "schema": REFUSED},                                         # vLLM: no
    {"id": "too-long", "prompt": "word " * 5000},                                                # > 4,096 tokens
    {"id": "good-3", "prompt": "A year:", "regex": "(19|20)[0-9]{2}"},
]
BAD = {2: "malformed_json", 3: "bad_constraint", 5: "unsupported_schema", 6: "refused_schema", 7: "prompt_too_long"}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def nested_one_of(depth: int) -> dict:
    """xgrammar's compile time grows super-exponentially with oneOf nesting (vllm issue #54003); depth 8 takes
    about 10 s on this 2-core machine, idle (tests/test_validate.py)."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"oneOf": [{"type": "object", "properties": {"a": schema, "b": {"type": "integer"}},
                             "required": ["a"]}, {"type": "array", "items": schema}, schema]}
    return schema


def test_every_bad_line_is_listed_in_one_error_and_nothing_is_written(tmp_path):
    """The five kinds of bad line, each named with its line number, field and reason, in one error; exit 2."""
    prompts, out = _write(tmp_path / "p.jsonl", LINES), tmp_path / "out"
    proc = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--max-tokens", "8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "5 bad lines" in errors[0] and "--on-bad-line reject" in errors[0], proc.stderr
    listed = [line.strip() for line in proc.stderr.splitlines() if line.startswith("  line ")]
    assert [int(line.split()[1].rstrip(":")) for line in listed] == sorted(BAD), listed
    for line, (number, code) in zip(listed, sorted(BAD.items())):
        assert line.endswith(f"[{code}]"), line
    assert "schema: malformed JSON Schema" in listed[1]
    assert "schema: the guidance grammar backend cannot enforce /uniqueItems" in listed[2]
    assert "schema: vLLM refuses it" in listed[3] and "minLength" in listed[3]
    assert "prompt: 5,001 prompt tokens do not fit the engine's context of 4,096" in listed[4]
    assert not out.exists()


def test_reject_runs_the_good_lines_and_a_complete_rerun_starts_no_engine(tmp_path):
    """--on-bad-line reject: the five bad lines are rejects with their reason codes, counted in the manifest,
    and the three good lines are generated, in one real vLLM run. Then the same command again: everything is
    committed, so it loads no model (no engine line, far less than an engine start) and exits 0."""
    prompts, out = _write(tmp_path / "p.jsonl", LINES), tmp_path / "out"
    args = ("generate", "--prompts", str(prompts), "--out", str(out), "--max-tokens", "8", "--on-bad-line", "reject")
    first = sdg(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "engine main:" in first.stderr
    from engine.store import RunStore
    store = RunStore.open(out, json.loads((out / "config.json").read_text())["config"])
    rejects = store.rejects("generate")
    bad = {r["row"]["line"]: r for r in rejects if "line" in r["row"]}
    assert {n: r["reason"].split(":")[0] for n, r in bad.items()} == BAD
    assert bad[6]["row"]["id"] == "refused" and "minLength" in bad[6]["row"]["error"]
    generated = {r["id"] for r in store.rows("generate")} | {r["row"].get("id") for r in rejects
                                                            if "line" not in r["row"]}
    assert generated == {"good-1", "good-2", "good-3"}  # a good line may be a reject too (tiny model, 8 tokens)
    manifest = json.loads((out / "manifest.json").read_text())["stages"]["generate"]
    for code in BAD.values():
        assert manifest["rejects_by_reason"][code] == 1, manifest["rejects_by_reason"]
    assert manifest["rows"] + manifest["rejects"] == len(LINES)
    store.close()

    started = time.perf_counter()
    again = sdg(*args)
    seconds = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    assert "engine main:" not in again.stderr and "generated" not in again.stdout, again.stderr[-2000:]
    assert seconds < 60, seconds  # an engine start alone takes about 70 s here (the preflight's worker: ~10 s)
    assert json.loads((out / "manifest.json").read_text())["stages"]["generate"]["rejects"] == manifest["rejects"]


def test_vllm_itself_refuses_the_refused_schema(vllm_backend):
    """The schema the preflight calls refused is refused by the real engine too (its own request check)."""
    from engine.constraints import Constraint, ConstraintError
    from engine.request import Request, Sampling
    request = Request.build(stage="s", model="m", prompt="x", constraint=Constraint.json_schema(REFUSED),
                            sampling=Sampling(max_tokens=4), seed=0)
    with pytest.raises(ConstraintError, match="minLength"):
        vllm_backend.preflight([request])


def test_a_pathological_schema_ends_in_a_clear_error_within_the_limit(tmp_path):
    """--compile-timeout 2 with xgrammar: nested oneOf compiles for about 10 s; the preflight's worker is
    killed at 2 s and the line is named, before any engine starts. (The default grammar backend, guidance,
    bounds its own work: no schema tried stalled it; it refuses too-large schemas in milliseconds.)"""
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "ok", "regex": "[a-z]+"},
                                            {"id": "slow", "prompt": "x", "schema": nested_one_of(8)}])
    out = tmp_path / "out"
    proc = sdg("generate", "--prompts", str(prompts), "--out", str(out), "--grammar-backend", "xgrammar",
               "--compile-timeout", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert f"{prompts}:2: schema: did not compile within 2 s with xgrammar" in errors[0]
    assert not out.exists()


def test_the_compile_limit_holds(model_dir):
    """The checker behind the preflight answers within the limit (plus the kill), whatever the compile would take,
    and compiles the next constraint in a fresh worker. Timed apart from the worker's start-up (vLLM imported),
    which a loaded machine stretches."""
    from engine.compiling import ConstraintChecker
    checker = ConstraintChecker(model_dir, "xgrammar", timeout=2)
    try:
        assert checker.check("regex", "[a-z]+") is None  # the worker is up
        started = time.perf_counter()
        verdict = checker.check("json", nested_one_of(8))
        seconds = time.perf_counter() - started
        assert verdict is not None and verdict[0] == "compile_timeout", verdict
        assert seconds < 2 + 3, seconds
        assert checker.check("json", REFUSED)[0] == "refused_schema"
    finally:
        checker.close()


def test_the_prompts_file_is_streamed(tmp_path):
    """The method's items read the file lazily: from a pipe whose writer waits, the first item arrives before
    the second line is even written."""
    import os
    import threading

    from engine.methods import Context
    from engine.methods.generate import Config, pipeline
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    reader_has_first = threading.Event()

    def write() -> None:
        with open(fifo, "w") as f:
            f.write(json.dumps({"prompt": "p0"}) + "\n")
            f.flush()
            reader_has_first.wait(20)
            f.write(json.dumps({"prompt": "p1"}) + "\n")

    writer = threading.Thread(target=write)
    writer.start()
    config = Config.model_construct(prompts=fifo)  # not validated: that would read the pipe
    items = pipeline(config, Context(out=tmp_path)).stages[0].items()
    started = time.perf_counter()
    first = next(items)
    waited = time.perf_counter() - started
    reader_has_first.set()
    assert first[:2] == (0, 1) and waited < 10, (first, waited)
    assert [item[:2] for item in items] == [(1, 2)]
    writer.join()


def test_in_the_run_a_slow_constraint_is_bounded_too(tmp_path, vllm_backend, model_dir):
    """In a run (`sdg run` builds the executor with a checker), each distinct constraint is compiled under the
    limit before the engine sees it: one an item built (here a prompts line's) becomes that request's reject
    (`constraint_refused: compile_timeout`) and the run goes on; one the stage declares fails the run with an
    error naming it. The checker compiles with xgrammar (which stalls on nested oneOf), the engine is the
    session's."""
    from engine.compiling import ConstraintChecker
    from engine.constraints import Constraint, ConstraintError
    from engine.methods import Context, generate
    from engine.pipeline.core import Executor, result_row
    from engine.pipeline.stages import Generate, Pipeline, Publish
    from engine.request import Request, Sampling
    from engine.store import RunStore
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Yes or no?", "choices": ["yes", "no"]},
                                            {"id": "slow", "prompt": "x", "schema": nested_one_of(8)}])
    config = generate.Config(prompts=prompts, sampling=Sampling(max_tokens=4))
    checker = ConstraintChecker(model_dir, "xgrammar", timeout=2)
    try:
        with RunStore.open(tmp_path / "run", {"method": "generate"}) as store:
            pipeline = generate.pipeline(config, Context(out=store.out, progress=False))
            started = time.perf_counter()
            assert Executor(pipeline, store, {"main": lambda: vllm_backend}, progress=False, checker=checker).run()
            assert time.perf_counter() - started < 120  # the worker's start-up, the 2 s limit, one short output
            rejects = store.rejects("generate")
            assert len(store.rows("generate")) == 1, [(r["reason"], r["row"].get("prompt")) for r in rejects]
            (reject,) = rejects
            assert reject["reason"].startswith("constraint_refused: compile_timeout: did not compile within 2 s")
        slow = Constraint.json_schema(nested_one_of(8))
        declared = Pipeline([Generate("s", items=lambda: [0], parse=result_row, constraints=(slow,),
                                      request=lambda item, seed: Request.build(
                                          stage="s", model="m", prompt="x", constraint=slow,
                                          sampling=Sampling(max_tokens=4), seed=seed))], Publish("s", ["output"]))
        with RunStore.open(tmp_path / "run2", {"method": "x"}) as store:
            with pytest.raises(ConstraintError, match="compile_timeout"):
                Executor(declared, store, {"main": lambda: vllm_backend}, progress=False, checker=checker).run()
            assert store.rows("s") == []
    finally:
        checker.close()
