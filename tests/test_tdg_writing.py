"""TDG's two-phase constrained writing (engine/methods/tdg/writing.py): what the schemas let through is what
the verifier accepts on the points the constraint owns (declared names only, expressions that parse, ranges
consistent by construction, every variable in the text), and the method's stages (variables -> drafts ->
revisions -> templates) on the real engine record acceptance before and after the revision round."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine.methods.tdg import writing
from engine.methods.tdg.verify import verify_template

VARIABLES = [{"name": "name", "type": "choice", "list": "names"},
             {"name": "price", "type": "integer", "min": 20, "max": 300, "step": 10},
             {"name": "off", "type": "integer", "min": 5, "max": 60, "step": 5}]
GOOD_TEXT = {"problem": "{name} buys a coat for ${price} with {off}% off. How many dollars does {name} pay?",
             "constraints": ["price * off % 100 == 0"],
             "steps": [{"name": "step1", "expr": "price * off / 100", "text": "The discount is ${step1}."},
                       {"name": "step2", "expr": "price - step1", "text": "{name} pays ${step2}."}],
             "answer": {"type": "integer", "places": 0}}


def _valid(schema: dict, value: dict) -> bool:
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def test_the_text_schema_admits_a_good_text_and_it_verifies():
    schema = writing.text_schema(VARIABLES)
    assert _valid(schema, GOOD_TEXT)
    verdict = verify_template(writing.assemble("discount", VARIABLES, GOOD_TEXT), k=8)
    assert verdict.accepted, (verdict.reason, verdict.details)


@pytest.mark.parametrize("change, why", [
    (lambda t: t.update(problem="{name} buys a coat for ${cost}. How much?"), "an undeclared name in the text"),
    (lambda t: t.update(problem="{name} buys a coat for ${price}. How much does {name} pay?"),
     "a variable missing from the text"),
    (lambda t: t.update(problem="{name} buys a coat for ${price} with {off}% off."), "not a question"),
    (lambda t: t["steps"][0].update(expr="price * discount / 100"), "an undeclared name in an expression"),
    (lambda t: t["steps"][0].update(expr="price * (off / 100"), "an expression that does not parse"),
    (lambda t: t["steps"][0].update(expr="step2 + 1"), "a step used before it is computed"),
    (lambda t: t["steps"][0].update(name="discount"), "a step name of its own"),
    (lambda t: t["steps"][1].update(text="{name} pays {total}."), "an undeclared placeholder in a step"),
    (lambda t: t["answer"].update(expr="step2"), "an answer that names a step (it is the last one)"),
    (lambda t: t["steps"][0].update(expr="name * 2"), "a word variable in arithmetic"),
])
def test_the_text_schema_refuses_what_the_verifier_would(change, why):
    text = json.loads(json.dumps(GOOD_TEXT))
    change(text)
    assert not _valid(writing.text_schema(VARIABLES), text), why


def test_the_answer_is_the_last_step_written_and_a_rejected_draft_keeps_its_skill():
    """The text names no answer step: the answer is the last step written, so it cannot name a step that was
    never written (measured before: 'unknown name step2' where one step was written). And a draft the verifier
    rejects keeps the variables request's skill, so its revision is not rejected for a null skill."""
    from engine.methods import tdg
    one_step = json.loads(json.dumps(GOOD_TEXT))
    one_step["steps"] = [{"name": "step1", "expr": "price - price * off / 100", "text": "{name} pays ${step1}."}]
    assert _valid(writing.text_schema(VARIABLES), one_step)
    template = writing.assemble("discount", VARIABLES, one_step)
    assert template["answer"] == {"expr": "step1", "type": "integer", "places": 0}
    assert verify_template(template, k=8).accepted
    assert writing.assemble("discount", VARIABLES, GOOD_TEXT)["answer"]["expr"] == "step2"
    for change, reason in ((lambda t: t.update(constraints=["price > off * 100"]), "unsatisfiable_constraints"),
                           (lambda t: t["steps"][0].update(expr="price * rate"), "unknown_name")):
        text = json.loads(json.dumps(one_step))
        change(text)
        row = tdg._verified(tdg.Config(topics=[]), {"skill": "discount", "variables": VARIABLES}, text)
        assert (row["accepted"], row["reason"], row["skill"]) == (False, reason, "discount")


def test_ranges_are_consistent_by_construction():
    parsed = {"skill": "sale", "variables": [{"name": "name", "type": "choice", "list": "names"},
                                          {"name": "n", "type": "integer", "min": 7, "count": 5, "step": 3}]}
    assert _valid(writing.variables_schema(), parsed)
    variables, reason = writing.check_variables(parsed)
    assert reason is None and variables[1] == {"name": "n", "type": "integer", "min": 7, "max": 19, "step": 3}
    vs = [{"name": x, "type": "integer", "min": 1, "count": 3, "step": 1} for x in ("n", "n")]
    assert writing.check_variables({"skill": "s", "variables": vs})[1] == "duplicate_name"
    assert not _valid(writing.variables_schema(), {"skill": "s", "variables": [
        {"name": "n", "type": "integer", "min": 1, "max": 9, "step": 2}, parsed["variables"][0]]})  # no max


def test_a_name_the_verifier_reserves_is_renamed_not_rejected():
    """The demo's model named a variable `range`; the verifier refuses Python's builtins as names, so that
    template was a schema reject. Every reserved name the variables schema allows is now renamed, and the
    template verifies."""
    allowed = re.compile(writing.variables_schema()["properties"]["variables"]["items"]["anyOf"][0]
                         ["properties"]["name"]["pattern"])
    reserved = sorted(n for n in writing.RESERVED if allowed.fullmatch(n))
    assert {"range", "sum", "max", "len", "result", "and"} <= set(reserved)
    for name in reserved:
        parsed = {"skill": "discount", "variables": [
            {"name": name, "type": "integer", "min": 2, "count": 9, "step": 1},
            {"name": "price", "type": "integer", "min": 20, "count": 20, "step": 5}]}
        variables, reason = writing.check_variables(parsed)
        new = variables[0]["name"]
        assert reason is None and new == f"{name}_" and new not in writing.RESERVED
        text = {"problem": f"Ann buys {{{new}}} shirts at ${{price}} each. What is the total?",
                "steps": [{"name": "step1", "expr": f"{new} * price", "text": "The total is ${step1}."}],
                "constraints": [],
                "answer": {"type": "integer", "places": 0}}
        assert _valid(writing.text_schema(variables), text), name
        verdict = verify_template(writing.assemble("discount", variables, text), k=4)
        assert verdict.accepted, (name, verdict.reason, verdict.details)


def test_seed_examples_in_the_two_phase_form_verify():
    examples = writing.two_phase_examples()
    assert len(examples) >= 3
    for x in examples:
        variables, reason = writing.check_variables({"skill": x["skill"], "variables": x["variables"]})
        assert reason is None
        verdict = verify_template(writing.assemble(x["skill"], variables, x["text"]), k=4)
        assert verdict.accepted, (x["skill"], verdict.reason, verdict.details)


def test_the_revision_schema_asks_for_a_verdict_first():
    schema = writing.revision_schema(VARIABLES)
    assert list(schema["properties"])[0] == "verdict"
    assert _valid(schema, {"verdict": "wrong", **GOOD_TEXT}) and not _valid(schema, GOOD_TEXT)


def test_expression_language_examples():
    pattern = writing.expr_pattern(["a", "ab", "b"])
    for ok in ("a + b", "ab * 2", "(a + b) / 2", "a % 3", "3 * (2 + b)"):
        assert re.fullmatch(pattern, ok), ok
    for bad in ("a+b", "a ** 2", "sqrt(a)", "((a + b) * 2) / 3", "abc", "12", "2 * (3 + 4)"):
        assert not re.fullmatch(pattern, bad), bad


def test_the_schemas_compile_with_the_default_grammar_backend():
    """llguidance (vLLM's `guidance` backend) validates every schema of the writing, as vLLM does before a
    request runs: a pattern it cannot intersect with a length bound is refused there, not in a test run."""
    llguidance = pytest.importorskip("llguidance")
    import llguidance.hf
    from transformers import AutoTokenizer
    from engine import models
    tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(str(models.prepare(None))))
    five = VARIABLES + [{"name": "count", "type": "integer", "min": 1, "max": 9, "step": 1},
                        {"name": "weeks", "type": "integer", "min": 2, "max": 40, "step": 2}]
    for schema in (writing.variables_schema(), writing.text_schema(VARIABLES), writing.text_schema(five),
                   writing.revision_schema(five)):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        assert llguidance.LLMatcher.validate_grammar(grammar, tokenizer) == ""
