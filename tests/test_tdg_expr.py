"""The whitelist expression parser: what it refuses, and that its three walks agree."""
from fractions import Fraction

import pytest
import sympy

from engine.methods.tdg import expr as X
from engine.methods.tdg.compile import compile_template
from engine.methods.tdg.template import check_template

NAMES = {"a", "b", "c"}


@pytest.mark.parametrize("src, code", [
    ("__import__('os')", "unsafe_expression"),
    ("__import__", "unsafe_expression"),
    ("a.real", "unsafe_expression"),
    ("().__class__", "unsafe_expression"),
    ("(1).__class__.__bases__", "unsafe_expression"),
    ("9**9**9", "unsafe_expression"),
    ("a ** 100", "unsafe_expression"),
    ("a ** (b + 1)", "unsafe_expression"),
    ("lambda: 1", "unsafe_expression"),
    ("'abc'", "unsafe_expression"),
    ("b'x'", "unsafe_expression"),
    ("[a, b]", "unsafe_expression"),
    ("a[0]", "unsafe_expression"),
    ("{a: 1}", "unsafe_expression"),
    ("[x for x in a]", "unsafe_expression"),
    ("open(a)", "unsafe_expression"),
    ("eval('1')", "unsafe_expression"),
    ("min(a, b, key=c)", "unsafe_expression"),
    ("max(*a)", "unsafe_expression"),
    ("a if b else c", "unsafe_expression"),
    ("(a := 3)", "unsafe_expression"),
    ("a is b", "unsafe_expression"),
    ("a in b", "unsafe_expression"),
    ("a & b", "unsafe_expression"),
    ("~a", "unsafe_expression"),
    ("True", "unsafe_expression"),
    ("1j", "unsafe_expression"),
    ("1e999", "unsafe_expression"),
    ("+".join(["a"] * 150), "unsafe_expression"),  # too long
    ("a" + "+1" * 90, "unsafe_expression"),         # too many nodes (and long)
    ("a +", "parse_error"),
    ("import os", "parse_error"),
    ("x = 1", "parse_error"),
    ("d + 1", "unknown_name"),
    ("_a + 1", "unsafe_expression"),
    ("(a > b) + 1", "type_error"),
    ("min(a)", "type_error"),
])
def test_whitelist_rejects(src, code):
    with pytest.raises(X.ExprError) as e:
        X.parse(src, names=NAMES)
    assert e.value.code == code, e.value


def test_constraint_kinds():
    assert X.parse("a % 4 == 0 and a < b", names=NAMES, kind="bool").kind == "bool"
    with pytest.raises(X.ExprError) as e:
        X.parse("a + 1", names=NAMES, kind="bool")
    assert e.value.code == "type_error"


@pytest.mark.parametrize("src, env, want", [
    ("a * b - c // 2", {"a": 3, "b": 4, "c": 5}, 10),
    ("a / b", {"a": 7, "b": 2, "c": 0}, Fraction(7, 2)),
    ("0.1 + 0.2", {}, Fraction(3, 10)),
    ("a % b", {"a": -7, "b": 3}, 2),
    ("round(a / b)", {"a": 5, "b": 2}, 3),
    ("round(a / b, 1)", {"a": -1, "b": 4}, Fraction(-3, 10)),
    ("floor(a / b) + ceil(a / b)", {"a": 7, "b": 2}, 7),
    ("gcd(a, b) + lcm(a, b)", {"a": 12, "b": 18}, 42),
    ("sqrt(a)", {"a": Fraction(9, 4)}, Fraction(3, 2)),
    ("a ** -2", {"a": 2}, Fraction(1, 4)),
    ("max(a, b, c) - min(a, b) + abs(c)", {"a": 1, "b": 5, "c": -3}, 7),
])
def test_exact_value_and_compiled_agree(src, env, want):
    e = X.parse(src, names=set(env) | NAMES)
    got = X.evaluate_exact(e, env)
    assert got == sympy.Rational(want.numerator, want.denominator) if isinstance(want, Fraction) else got == want
    # the exact python path (what compile.py emits) gives the same number
    import ast
    consts = {}

    def const(v):
        name = f"_k{len(consts)}"
        consts[name] = v
        return ast.Name(id=name, ctx=ast.Load())

    tree = ast.Expression(X.python_ast(e, exact=True, name=lambda n: "v_" + n, const=const))
    ns = {"__builtins__": {}, **X.EXACT_HELPERS, **consts, **{"v_" + k: v for k, v in env.items()}}
    assert eval(compile(ast.fix_missing_locations(tree), "<t>", "eval"), ns) == want  # our own AST


@pytest.mark.parametrize("src, env", [("sqrt(a)", {"a": 2}), ("a / b", {"a": 1, "b": 0}),
                                      ("a ** b", {"a": 2, "b": 11}), ("gcd(a, b)", {"a": Fraction(1, 2), "b": 2})])
def test_no_exact_value(src, env):
    with pytest.raises((X.EvalError, ZeroDivisionError)):
        X.evaluate_exact(X.parse(src, names=set(env)), env)


def test_to_sympy_free_symbols_simplify():
    e = X.parse("a - a + b", names=NAMES)
    assert X.to_sympy(e).free_symbols == {sympy.Symbol("b")}


def test_generated_code_has_no_model_text():
    raw = {"skill": "x", "variables": [{"name": "n", "type": "integer", "min": 1, "max": 9, "step": 1}],
           "constraints": [], "problem": "A text with quotes ' \" and code __import__('os') {n} apples.",
           "steps": [{"name": "m", "expr": "n * 2", "text": "Double: {m}. ''' \\n"}],
           "answer": {"expr": "m", "type": "integer", "places": 0}}
    c = compile_template(check_template(raw))
    assert "__import__" not in c.source and "'" not in c.source and '"' not in c.source
    out = c.generate(b"k")
    assert "__import__('os')" in out[2][1]  # the text is data, rendered verbatim
