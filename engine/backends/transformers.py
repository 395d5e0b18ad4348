"""The reference backend: transformers `generate`, constrained by Outlines' logits processors.

Same Request/Result contract as vLLM, one request at a time: slow, simple, and independent of vLLM, so it
serves as the reference in tests and as the fallback on machines without vLLM.
"""
from __future__ import annotations

import re
from importlib.metadata import version as _version
from pathlib import Path
from typing import Iterable, Iterator

from engine.backends.base import DEFAULT_GRAMMAR_BACKEND, Backend
from engine.constraints import ConstraintError
from engine.models import identity as model_identity
from engine.models import set_offline
from engine.request import Request, Result

# Our grammar-backend names -> Outlines' names for the same libraries.
OUTLINES_BACKEND = {"guidance": "llguidance", "xgrammar": "xgrammar", "outlines": "outlines_core"}


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model_dir: Path, grammar_backend: str = DEFAULT_GRAMMAR_BACKEND, **_ignored) -> None:
        set_offline()
        import outlines
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.grammar_backend = grammar_backend
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.bfloat16)
        self.model.eval()
        self.outlines_model = outlines.from_transformers(self.model, self.tokenizer)
        self.versions = {"transformers": transformers.__version__, "outlines": _version("outlines")}

    def _logits_processor(self, request: Request):
        from outlines import backends

        c = request.constraint
        if c is None:
            return None
        name = OUTLINES_BACKEND[self.grammar_backend]
        if c.kind == "json":
            import json
            return backends.get_json_schema_logits_processor(name, self.outlines_model, json.dumps(c.spec))
        if c.kind == "regex":
            return backends.get_regex_logits_processor(name, self.outlines_model, c.spec)
        if c.kind == "choice":
            alternation = "|".join(re.escape(choice) for choice in c.spec)
            return backends.get_regex_logits_processor(name, self.outlines_model, f"({alternation})")
        # Lark grammars are executed by llguidance whatever the JSON backend is.
        return backends.get_cfg_logits_processor("llguidance", self.outlines_model, c.spec)

    def preflight(self, requests: list[Request]) -> None:
        seen: set[str] = set()
        for request in requests:
            if request.constraint is None or repr(request.constraint.identity()) in seen:
                continue
            seen.add(repr(request.constraint.identity()))
            try:
                self._logits_processor(request)
            except Exception as e:  # the Outlines backends raise their own error types
                raise ConstraintError(f"the {self.grammar_backend} grammar backend (transformers) rejects the "
                                      f"{request.constraint.kind} constraint of request {request.key}: {e}") from None

    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        for request in requests:
            if request is not None:  # one at a time: nothing is ever in flight when the feed is asked again
                yield self._generate_one(request)

    def _generate_one(self, request: Request) -> Result:
        torch = self.torch
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        s = request.sampling
        processor = self._logits_processor(request)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        kwargs = dict(max_new_tokens=s.max_tokens, do_sample=s.temperature > 0,
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        if s.ignore_eos:
            kwargs["suppress_tokens"] = [self.tokenizer.eos_token_id]
        if processor is not None:
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([processor])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        stopped = bool(new) and new[-1] == eos
        finish = "stop" if stopped or len(new) < s.max_tokens else "length"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if request.constraint is None:
            valid, parsed, reason = True, text, ("truncated" if finish == "length" else None)
        else:
            valid, parsed, reason = request.constraint.check(text, finish)
        return Result(key=request.key, text=text, parsed=parsed, prompt_tokens=ids.shape[1], output_tokens=len(new),
                      finish_reason=finish, valid=valid, reason=reason, meta=request.meta)

    def identity(self) -> dict:
        return {"backend": "transformers", **self.versions, "grammar_backend": self.grammar_backend,
                "device": "cpu", "model": model_identity(self.model_dir)}
