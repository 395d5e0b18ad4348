"""Template verification: the seed library passes; planted bad templates fail for the right reason;
the sandbox contains hostile code."""
import copy
import json

from fractions import Fraction

import jsonschema
import pytest

from engine.methods.tdg.sandbox import run_solutions
from engine.methods.tdg.template import DATA_DIR, SCHEMA_PATH, word_lists
from engine.methods.tdg.verify import REASONS, verify_template, verify_templates

SEEDS = [json.loads(l) for l in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines() if l.strip()]

GOOD = {"skill": "money", "variables": [{"name": "name", "type": "choice", "list": "names"},
                                        {"name": "apples", "type": "integer", "min": 2, "max": 20, "step": 1},
                                        {"name": "pears", "type": "integer", "min": 2, "max": 20, "step": 1}],
        "constraints": [], "problem": "{name} has {apples} apples and {pears} pears. How many fruits in all?",
        "steps": [{"name": "total", "expr": "apples + pears", "text": "{apples} + {pears} = {total}."}],
        "answer": {"expr": "total", "type": "integer", "places": 0}}


def variant(**changes):
    t = copy.deepcopy(GOOD)
    for k, v in changes.items():
        t[k] = v
    return t


def test_schema_is_valid_and_lists_match_data():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    enum = schema["properties"]["variables"]["items"]["anyOf"][2]["properties"]["list"]["enum"]
    assert sorted(enum) == sorted(word_lists())
    assert all(len(w) >= 10 for w in word_lists().values())


def test_seed_library_all_verify():
    assert len(SEEDS) >= 20
    verdicts = verify_templates(SEEDS, k=8, source="seed")
    bad = [(s["skill"], v.reason, v.details) for s, v in zip(SEEDS, verdicts) if not v.accepted]
    assert not bad
    assert len({v.template_id for v in verdicts}) == len(SEEDS)


def test_good_template_accepted():
    v = verify_template(GOOD)
    assert v.accepted and v.reason is None and v.stats["k"] == 8


@pytest.mark.parametrize("template, reason", [
    # the text says pears, the answer counts plums (a variable never shown)
    (variant(variables=GOOD["variables"] + [{"name": "plums", "type": "integer", "min": 1, "max": 9, "step": 1}],
             steps=[{"name": "total", "expr": "apples + plums", "text": "{apples} + {plums} = {total}."}]),
     "answer_var_not_in_text"),
    # the text shows pears, but the answer ignores them
    (variant(steps=[{"name": "total", "expr": "apples * 2", "text": "{apples} * 2 = {total}."}]), "unused_variable"),
    # pears cancel out: structurally present, no influence
    (variant(steps=[{"name": "total", "expr": "apples + pears - pears", "text": "{total}."}]), "unused_variable"),
    (variant(constraints=["apples > 100"]), "unsatisfiable_constraints"),
    (variant(answer={"expr": "total / 3", "type": "integer", "places": 0}), "answer_type"),
    (variant(answer={"expr": "apples - pears - 30", "type": "integer", "places": 0}), "negative_answer"),
    (variant(answer={"expr": "total / (apples % 1)", "type": "fraction", "places": 0}), "eval_error"),
    (variant(answer={"expr": "__import__('os')", "type": "integer", "places": 0}), "unsafe_expression"),
    (variant(answer={"expr": "total.real", "type": "integer", "places": 0}), "unsafe_expression"),
    (variant(answer={"expr": "total +", "type": "integer", "places": 0}), "parse_error"),
    (variant(answer={"expr": "bananas", "type": "integer", "places": 0}), "unknown_name"),
    (variant(problem="{name} has {apples} apples and {pears pears. How many?"), "parse_error"),
    (variant(extra=1), "schema"),
    (variant(variables=[{"name": "name", "type": "choice", "list": "spaceships"}]), "schema"),
])
def test_planted_bad_templates(template, reason):
    assert reason in REASONS
    v = verify_template(template)
    assert not v.accepted
    assert v.reason == reason, (v.reason, v.details)
    assert v.details


def test_code_mismatch_float_vs_exact():
    # exact: ceil(n * 11/10) for n = 10, 20, ... is n * 1.1; in floats 10 * 1.1 = 11.000000000000002 -> 12
    t = variant(variables=[{"name": "n", "type": "integer", "min": 10, "max": 90, "step": 10}],
                problem="A price of {n} dollars rises by ten percent. Rounded up, what is the new price?",
                steps=[{"name": "total", "expr": "ceil(n * 1.1)", "text": "{total}."}])
    v = verify_template(t)
    assert not v.accepted and v.reason == "code_mismatch", (v.reason, v.details)
    # without the sandbox the same template passes: the second check is what catches it
    assert verify_template(t, sandbox=False).accepted


def test_sandbox_contains_hostile_code():
    codes = ["def solution():\n    return 6 * 7\n",
             "def solution():\n    while True:\n        pass\n",
             "def solution():\n    x = [0] * (10 ** 10)\n    return 1\n",
             "def solution():\n    import socket\n    return socket.socket()\n",
             "import socket\ndef solution():\n    return 1\n",
             "def solution():\n    return open('/tmp/tdg_sandbox_probe', 'w').write('x')\n",
             "def solution():\n    return ().__class__.__base__.__subclasses__()\n",
             "def solution():\n    return 1 / 4\n",
             "def solution():\n    print('0 int 999')\n    return 5\n",  # a line forged in the child's output
             "def solution():\n    raise ValueError('two\\nlines and spaces')\n",
             "from fractions import Fraction\ndef solution():\n    return Fraction(-10, 4)\n",
             "def solution():\n    return True\n",
             "def solution():\n    return 2 ** 70\n",
             "def solution():\n    name = 'Zoë \u4e2d'\n    return len(name)\n",  # text past ASCII, lengths right
             "def solution():\n    raise ValueError('Zoë\\\\n')\n"]
    r = run_solutions(codes, timeout_s=0.5)
    assert r[0].ok and r[0].value == 42
    assert not r[1].ok and r[1].error == "timeout"
    assert not r[2].ok and r[2].error in ("memory", "killed")
    assert not r[3].ok and "ImportError" in r[3].error
    assert not r[4].ok and "ImportError" in r[4].error
    assert not r[5].ok
    assert not r[6].ok
    assert r[7].ok and r[7].value == 0.25  # the batch went on after every failure
    assert r[0].value == 42 and r[8].ok and r[8].value == 5  # what a code prints is not taken for a result
    assert not r[9].ok and r[9].error == "ValueError: two\nlines and spaces"
    assert r[10].ok and r[10].value == Fraction(-5, 2)
    assert not r[11].ok and r[11].error == "returned a bool"
    assert r[12].ok and r[12].value == 2 ** 70 and type(r[12].value) is int
    assert r[13].ok and r[13].value == 5
    assert not r[14].ok and r[14].error == "ValueError: Zoë\\n"


@pytest.mark.parametrize("template, reason", [
    # huge ranges: refused by the schema's bounds before anything is drawn
    (variant(variables=[GOOD["variables"][0], {"name": "apples", "type": "integer", "min": 0, "max": 10**18,
                                               "step": 1}, GOOD["variables"][2]]), "schema"),
    (variant(variables=[GOOD["variables"][0], {"name": "apples", "type": "decimal", "min": 0, "max": 1e300,
                                               "step": 1e-300, "places": 2}, GOOD["variables"][2]]), "schema"),
    # deep nesting and huge exponents inside a template's own expressions
    (variant(answer={"expr": "(" * 60 + "total" + ")" * 60, "type": "integer", "places": 0}), "schema"),
    (variant(answer={"expr": "total ** 99999", "type": "integer", "places": 0}), "unsafe_expression"),
    (variant(answer={"expr": "().__class__.__bases__[0].__subclasses__()", "type": "integer", "places": 0}),
     "unsafe_expression"),
    # constraints no draw can satisfy within the bounded number of draws
    (variant(constraints=["apples % 7 == 3 and pears % 11 == 5 and apples > pears * 3"]), "unsatisfiable_constraints"),
])
def test_hostile_templates_rejected_with_reason(template, reason):
    v = verify_template(template)
    assert not v.accepted and v.reason == reason, (v.reason, v.details)


def test_legacy_style_code_cannot_harm_the_host():
    """Free Python as TemplateMath's templates carry it, run only in the sandbox: deep recursion, runaway
    arithmetic, loops, imports; each fails with a reason and the batch (and this process) goes on."""
    codes = ["def solution():\n    def f(n):\n        return f(n + 1)\n    return f(0)\n",
             "import sys\nsys.setrecursionlimit(10**9)\ndef solution():\n    return 1\n",
             "def solution():\n    return 9 ** 9 ** 9\n",
             "def solution():\n    while True:\n        x = [0] * 10**6\n",
             "def solution():\n    return __import__('os').system('true')\n",
             "def solution():\n    return 6\n"]
    r = run_solutions(codes, timeout_s=1.0)
    assert "RecursionError" in r[0].error
    assert "ImportError" in r[1].error
    assert r[2].error == "timeout"
    assert r[3].error in ("timeout", "memory", "killed")
    assert not r[4].ok
    assert r[5].ok and r[5].value == 6
