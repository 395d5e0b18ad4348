"""Compiling constraints under a time limit, in a worker process: `sdg validate`, `sdg generate`'s preflight and
every run's first use of a constraint (the pipeline core) go through here. vLLM has no compile timeout for JSON
Schemas (vllm issue #54003): a pathological schema would stall the engine; here it is killed with its worker.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 20.0
"""Seconds one constraint may take to compile."""
WORKER_START_TIMEOUT = 300.0
"""Seconds the compile worker may take to import its library and load the tokenizer."""


class ConstraintChecker:
    """Each constraint checked as the engine would take it, under a time limit, before any engine starts
    (`sdg generate`'s preflight):

        checker = ConstraintChecker(model_dir, "guidance", timeout=30)
        checker.check("json", {"type": "string", "minLength": 5, "maxLength": 2})
        # -> ("refused_schema", "vLLM refuses it: Grammar error: Unsatisfiable schema: minLength (5) is ...")
        checker.close()

    vLLM's own request validation runs first (SamplingParams: nesting depth, the grammar backend's validation),
    then the compile `sdg validate` does (_compiler), both in one worker process; past `timeout` seconds the
    worker is killed (and a fresh one started for the next constraint) and the verdict is "compile_timeout".
    vLLM has no compile timeout for JSON Schemas (vllm issue #54003): without this a pathological schema stalls
    the engine. check() returns None, or (code, detail) with code "refused_schema" or "compile_timeout"."""

    def __init__(self, model_dir: Path, grammar_backend: str, compact: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.model_dir, self.grammar_backend, self.compact, self.timeout = model_dir, grammar_backend, compact, timeout
        self.worker: _Worker | None = None

    def check(self, kind: str, spec: Any) -> tuple[str, str] | None:
        from engine.constraints import ConstraintError
        if self.worker is None:
            self.worker = _Worker(self.model_dir, self.grammar_backend, self.compact, vllm_checks=True)
            if self.worker.error:
                error = self.worker.error
                self.close()
                raise ConstraintError(f"grammar backend {self.grammar_backend}: {error}")
        status, value = self.worker.compile(kind, spec, self.timeout)
        if status == "ok":
            return None
        if status == "timeout":
            self.close()
            return "compile_timeout", (f"did not compile within {self.timeout:g} s with {self.grammar_backend} (a "
                                       f"pathological constraint would stall the engine: simplify it)")
        return "refused_schema", value

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


class _Worker:
    """A process holding the grammar library and the model's tokenizer, compiling one constraint at a time."""

    def __init__(self, model_dir: Path, grammar_backend: str, compact: bool, vllm_checks: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, str(model_dir), grammar_backend, compact, vllm_checks),
                                   daemon=True)
        self.process.start()
        child.close()
        self.error = None
        if not self.conn.poll(WORKER_START_TIMEOUT):
            self.error = f"the compile worker did not start within {WORKER_START_TIMEOUT:g} s"
            return
        try:
            status, value = self.conn.recv()
        except EOFError:
            status, value = "error", "the compile worker died while starting"
        if status != "ready":
            self.error = value

    def compile(self, kind: str, spec: Any, timeout: float) -> tuple[str, Any]:
        self.conn.send((kind, list(spec) if kind == "choice" else spec))
        if not self.conn.poll(timeout):
            return "timeout", None
        try:
            return self.conn.recv()
        except EOFError:
            return "error", "the compile worker died (out of memory?)"

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def _serve(conn, model_dir: str, grammar_backend: str, compact: bool, vllm_checks: bool = False) -> None:
    """The worker's loop: load the library and tokenizer once, then compile what is sent (with `vllm_checks`,
    after vLLM's own validation of a request's constraint)."""
    import os
    import warnings
    warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("SDG_QUIET"):  # `sdg` without -v: no library logs (xgrammar's C++ warnings); verdicts come
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # back through the pipe
    try:
        compile_one = _compiler(model_dir, grammar_backend, compact)
        if vllm_checks:
            compile_one = _with_vllm_checks(compile_one, model_dir, grammar_backend, compact)
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"cannot load it with the model's tokenizer: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            kind, spec = conn.recv()
        except EOFError:
            return
        started = time.perf_counter()
        try:
            compile_one(kind, spec)
            conn.send(("ok", time.perf_counter() - started))
        except Exception as e:  # noqa: BLE001 - the library's own message is the finding
            conn.send(("error", str(e).splitlines()[0][:300] if str(e) else type(e).__name__))


def _with_vllm_checks(compile_one, model_dir: str, grammar_backend: str, compact: bool):
    """`compile_one`, preceded by vLLM's own validation of a request's constraint (what its engine refuses:
    schemas nested too deeply, a backend's unsupported or unsatisfiable schema), as `LLM.generate` runs it."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.sampling_params import StructuredOutputsParams
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = StructuredOutputsConfig(backend=grammar_backend, disable_any_whitespace=compact)
    model = SimpleNamespace(is_diffusion=False)  # all that this validation reads of the model's config

    def checked(kind: str, spec: Any) -> None:
        field = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
        params = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(
            **{field: list(spec) if kind == "choice" else spec}))
        try:
            params._validate_structured_outputs(model, config, tokenizer)
        except Exception as e:  # noqa: BLE001 - VLLMValidationError, ValueError: vLLM's message is the finding
            raise ValueError(f"vLLM refuses it: {e}") from None
        try:
            compile_one(kind, spec)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"the {grammar_backend} grammar backend cannot compile it: {e}") from None
    return checked


def _compiler(model_dir: str, grammar_backend: str, compact: bool):
    """kind, spec -> None or raises: the constraint compiled as vLLM compiles it for that backend."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        vocab_size = max(AutoConfig.from_pretrained(model_dir).vocab_size, len(tokenizer))
    except Exception:  # noqa: BLE001
        vocab_size = len(tokenizer)
    if grammar_backend == "guidance":
        import llguidance
        import llguidance.hf
        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, vocab_size)

        def compile_one(kind: str, spec: Any) -> None:
            if kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec, defaults={"whitespace_flexible": not compact})
            elif kind == "choice":
                grammar = llguidance.grammar_from("choice", json.dumps(spec))
            else:
                grammar = llguidance.grammar_from("regex" if kind == "regex" else "grammar", spec)
            error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
            if error:
                raise ValueError(error)
            matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
            matcher.compute_logit_bias()  # the first mask: where a lazy lexer does its work
            if matcher.is_error():
                raise ValueError(matcher.get_error())
        return compile_one
    if grammar_backend == "xgrammar":
        import xgrammar as xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

        def compile_one(kind: str, spec: Any) -> None:
            if kind == "json":
                compiler.compile_json_schema(json.dumps(spec), any_whitespace=not compact,
                                             separators=(",", ":") if compact else None)
            elif kind == "regex":
                compiler.compile_regex(spec)
            elif kind == "choice":
                from vllm.v1.structured_output.utils import choice_as_grammar
                compiler.compile_grammar(choice_as_grammar(spec))
            else:
                from vllm.v1.structured_output.utils import convert_lark_to_ebnf
                compiler.compile_grammar(convert_lark_to_ebnf(spec))
        return compile_one
    import re

    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    from vllm.v1.structured_output.utils import get_outlines_vocabulary
    vocabulary = get_outlines_vocabulary(tokenizer)

    def compile_one(kind: str, spec: Any) -> None:
        if kind == "json":
            regex = build_regex_from_schema(json.dumps(spec))
        elif kind == "regex":
            regex = spec
        elif kind == "choice":
            regex = "(" + "|".join(re.escape(c) for c in spec) + ")"
        else:
            raise ValueError("the outlines grammar backend takes no Lark grammar")
        oc.Index(regex, vocabulary.inner)
    return compile_one
