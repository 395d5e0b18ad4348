"""vLLM in-process: one engine, its batch kept full through the add_request/step loop.

vLLM reaches its throughput only while its scheduler always has waiting requests. One `LLM.generate` call
over everything does that but shows nothing until the very end; fixed chunks drain the batch at every
boundary. Here requests are added lazily so that `in_flight` of them are always inside the engine, and each
finished one is yielded at once so the caller can persist it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

from engine.backends import reaper
from engine.backends.base import DEFAULT_GRAMMAR_BACKEND, Backend, BackendError
from engine.constraints import ConstraintError
from engine.models import identity as model_identity
from engine.models import set_offline
from engine.request import Request, Result

log = logging.getLogger(__name__)

_END = object()

# JSON Schema keywords each grammar backend cannot enforce (from vLLM's own checks for xgrammar/guidance,
# and outlines_core's regex translation). Named in the error so the user knows what to change.
UNSUPPORTED_JSON = {
    "xgrammar": {"multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "patternProperties",
                 "propertyNames", "allOf", "if", "dependentSchemas", "not"},
    "guidance": {"patternProperties", "if", "dependentSchemas", "not", "contains", "uniqueItems"},
    "outlines": {"multipleOf", "uniqueItems", "contains", "patternProperties", "propertyNames", "allOf", "if",
                 "dependentSchemas", "not", "$dynamicRef"},
}


def unsupported_features(schema: dict, grammar_backend: str) -> list[str]:
    """JSON pointers and names of keywords in `schema` that `grammar_backend` cannot enforce.

    >>> unsupported_features({"type": "array", "uniqueItems": True}, "xgrammar")
    ['/uniqueItems']
    """
    banned = UNSUPPORTED_JSON[grammar_backend]
    found: list[str] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                # "properties" maps names to schemas: a property *named* like a keyword is fine.
                if k in banned and not path.endswith("/properties"):
                    found.append(f"{path}/{k}")
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    return found


class VllmBackend(Backend):
    """Generate with vLLM's offline engine in this process.

    Args:
        model_dir: a local Hugging Face model folder.
        grammar_backend: 'guidance' (default, fastest measured), 'xgrammar' or 'outlines'.
        in_flight: requests kept inside the engine at once; default 2 × max_num_seqs so the scheduler
            always has waiting requests.
        max_model_len: context length to reserve KV cache for.
        kv_cache_gib: CPU only: KV cache size (vLLM-CPU otherwise reserves most of a NUMA node and fails on
            small machines). Ignored on GPU, where gpu_memory_utilization applies.
        compact_json: JSON outputs without free whitespace between tokens (vLLM's disable_any_whitespace,
            an engine-wide setting in vLLM, honoured by the guidance and xgrammar grammar backends). Small
            models can otherwise spend their token budget on runs of spaces and newlines inside the JSON; on
            an H100 guidance was faster this way (9,243 vs 7,911 output tok/s, gpu/README.md), and on this CPU 44/96
            JSON outputs of SmolLM2-135M were complete within 96 tokens instead of 5/96 (bench/results/). Off
            by default: with it on, GLAN's model-written taxonomy lists from SmolLM2 were all rejected in a test
            run, so turn it on per run config (`engine: {compact_json: true}`) where it helps.
        engine_kwargs: passed to `vllm.LLM` as they are.
    """

    name = "vllm"

    def __init__(self, model_dir: Path, grammar_backend: str = DEFAULT_GRAMMAR_BACKEND, in_flight: int | None = None,
                 max_model_len: int = 4096, kv_cache_gib: int = 2, max_num_seqs: int | None = None,
                 gpu_memory_utilization: float | None = None, seed: int = 0, compact_json: bool = False,
                 **engine_kwargs) -> None:
        set_offline()
        try:
            import torch
            import vllm
        except ImportError as e:
            raise BackendError(f"vLLM is not installed ({e}); install the 'cpu' or 'gpu' extra") from None
        self.model_dir = Path(model_dir)
        self.grammar_backend = grammar_backend
        self.compact_json = bool(compact_json)
        self.on_cpu = not torch.cuda.is_available()
        structured = {"backend": grammar_backend}
        if compact_json:
            if grammar_backend not in ("guidance", "xgrammar"):
                raise BackendError(f"compact_json needs the guidance or xgrammar grammar backend, not {grammar_backend}")
            structured["disable_any_whitespace"] = True
        kwargs: dict = dict(model=str(self.model_dir), dtype="bfloat16", seed=seed, max_model_len=max_model_len,
                            structured_outputs_config=structured)
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
            # vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
            # by chunked prefill. Per-request seeds are what make a resumed run reproduce an uninterrupted
            # one, so keep seeds and turn chunking off; a whole prompt then fits one step.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        kwargs.update(engine_kwargs)
        self.settings = {k: v for k, v in kwargs.items() if k != "model"}
        if os.environ.get("SDG_QUIET"):  # `sdg` without -v: no weight-loading bar from vLLM either
            kwargs.setdefault("use_tqdm_on_load", False)
        started = time.perf_counter()
        before = reaper.children()
        self.llm = vllm.LLM(**kwargs)
        self._reaper = reaper.watch(before)  # its engine processes die with this one, SIGKILL included
        self.start_seconds = time.perf_counter() - started
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.in_flight = in_flight or 2 * self.max_num_seqs
        self.max_model_len = max_model_len
        self.vllm_version = vllm.__version__

    # -- translation ----------------------------------------------------------------------------
    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.prompt)["input_ids"]

    def _sampling_params(self, request: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if request.constraint is not None:
            c = request.constraint
            field = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}[c.kind]
            structured = StructuredOutputsParams(**{field: list(c.spec) if c.kind == "choice" else c.spec})
        s = request.sampling
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              ignore_eos=s.ignore_eos, seed=request.seed, structured_outputs=structured,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    # -- checks before generation ---------------------------------------------------------------
    def preflight(self, requests: list[Request]) -> None:
        from vllm.exceptions import VLLMValidationError

        seen: set[str] = set()
        cfg = self.engine.vllm_config
        for request in requests:
            c = request.constraint
            if c is None:
                continue
            ident = repr(c.identity())
            if ident in seen:
                continue
            seen.add(ident)
            if c.kind == "json":
                bad = unsupported_features(c.spec, self.grammar_backend)
                if bad:
                    raise ConstraintError(f"the {self.grammar_backend} grammar backend cannot enforce "
                                          f"{', '.join(bad)} in the JSON Schema of request {request.key}")
            try:
                self._sampling_params(request).verify(cfg.model_config, cfg.speculative_config,
                                                      cfg.structured_outputs_config, self.tokenizer)
            except (VLLMValidationError, ValueError) as e:
                raise ConstraintError(f"the {self.grammar_backend} grammar backend rejects the {c.kind} constraint "
                                      f"of request {request.key}: {e}") from None

    # -- the loop -------------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        pending: dict[str, Request] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.in_flight:
                    request = next(source, _END)
                    if request is _END:
                        exhausted = True
                        break
                    if request is None:  # nothing ready until some request in flight finishes
                        if not pending:
                            raise RuntimeError("the request feed waits while nothing is in flight")
                        break
                    if request.key in pending:
                        raise ValueError(f"duplicate request key {request.key} in one generate call")
                    ids = self._prompt_ids(request)
                    if len(ids) + 1 > self.max_model_len:
                        yield Result(key=request.key, text="", parsed=None, prompt_tokens=len(ids), output_tokens=0,
                                     finish_reason="prompt_too_long", valid=False, reason="prompt_too_long",
                                     meta=request.meta)
                        continue
                    self.engine.add_request(request.key, {"prompt_token_ids": ids}, self._sampling_params(request))
                    pending[request.key] = request
                if not pending:
                    return
                for output in self.engine.step():
                    if not output.finished:
                        continue
                    request = pending.pop(output.request_id)
                    yield self._result(request, output)
        except BaseException:
            # Leave the engine clean for the next call: whatever we added and did not finish is aborted.
            if pending:
                self.engine.abort_request(list(pending))
                while self.engine.has_unfinished_requests():
                    self.engine.step()
            raise

    def _result(self, request: Request, output) -> Result:
        completion = output.outputs[0]
        finish = completion.finish_reason or "stop"
        text = completion.text
        if request.constraint is None:
            valid, parsed, reason = True, text, ("truncated" if finish == "length" else None)
        else:
            valid, parsed, reason = request.constraint.check(text, finish)
        return Result(key=request.key, text=text, parsed=parsed, prompt_tokens=len(output.prompt_token_ids),
                      output_tokens=len(completion.token_ids), finish_reason=finish, valid=valid, reason=reason,
                      meta=request.meta)

    def identity(self) -> dict:
        return {"backend": "vllm", "vllm": self.vllm_version, "grammar_backend": self.grammar_backend,
                "compact_json": self.compact_json,
                "device": "cpu" if self.on_cpu else "cuda", "model": model_identity(self.model_dir),
                "settings": {k: v for k, v in self.settings.items() if isinstance(v, (int, float, str, bool, dict))}}

    def close(self) -> None:
        del self.llm, self.engine
