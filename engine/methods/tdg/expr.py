"""Whitelist expressions for TDG templates: parse model text, never evaluate it.

A template's numbers come from small expressions written by a model ("price * count", "a % 4 == 0",
"round(total / people, 2)"). Python's own parser (`ast.parse(mode="eval")`) only *parses* them; then one walk
accepts a node only if it is on the whitelist below and type-checks it (numeric vs boolean). Everything else is
refused with an `ExprError` whose `code` is a verifier reason:

    parse_error        not an expression ("a +", "x = 1")
    unsafe_expression  a node outside the whitelist, a string, a call outside FUNCTIONS, too long, too many
                       nodes, an exponent that is not a small literal or a variable
    unknown_name       a name the template does not declare
    type_error         a comparison used as a number, a number used as a condition, wrong arity

Whitelist: int/decimal literals, variable names (lower-case, no leading underscore), + - * / // % **, unary - +,
comparisons (== != < <= > >=, chained), and / or / not, and calls to FUNCTIONS with positional arguments.

An accepted `Expr` is turned into three things by the walks at the bottom of this file, all built from the
validated tree only:

    to_sympy(e)              symbolic sympy expression (dependency analysis: which variables matter)
    evaluate_exact(e, env)   exact value with sympy Rationals (the verifier's ground truth)
    python_ast(e, ...)       an `ast` tree of OUR construction, for compile.py (exact, Fraction/int) and for
                             the readable float `solution_code` shipped in each row

    >>> e = parse("a * b - c // 2", names={"a", "b", "c"})
    >>> sorted(e.names), e.kind
    (['a', 'b', 'c'], 'num')
    >>> evaluate_exact(e, {"a": 3, "b": 4, "c": 5})
    10
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable

import sympy

MAX_SOURCE_CHARS = 200
"""Longest expression source accepted."""
MAX_NODES = 80
"""Most AST nodes in one expression."""
MAX_EXPONENT = 10
"""Largest |exponent| of `**`, checked statically for literals and at evaluation for variables."""
MAX_LITERAL = 10**12
"""Largest |numeric literal|."""
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,23}")
"""What a variable name looks like: lower-case, no leading underscore (so never a dunder)."""

FUNCTIONS: dict[str, tuple[int, int]] = {
    "min": (2, 4), "max": (2, 4), "abs": (1, 1), "round": (1, 2), "floor": (1, 1), "ceil": (1, 1),
    "gcd": (2, 2), "lcm": (2, 2), "sqrt": (1, 1),
}
"""Callable names and their (min, max) number of positional arguments. `round(x, n)` rounds half away from
zero to n places; `sqrt` is exact and fails on a non-square; `gcd`/`lcm` need integers."""

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_CMPOPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class ExprError(ValueError):
    """An expression that was refused; `code` is the verifier's reason code."""

    def __init__(self, code: str, message: str, source: str = ""):
        super().__init__(f"{code}: {message}" + (f" in {source!r}" if source else ""))
        self.code = code
        self.detail = message


class EvalError(ArithmeticError):
    """An accepted expression that has no exact value for these inputs (non-square sqrt, huge exponent...)."""


@dataclass(frozen=True)
class Expr:
    """A validated expression: its source, its checked tree, the names it reads and its kind ('num'|'bool')."""

    source: str
    tree: ast.expr
    names: frozenset[str]
    kind: str


def parse(source: str, names: Iterable[str] | None = None, *, kind: str | None = "num") -> Expr:
    """Parse and validate `source`; `names` (if given) are the only names it may read; `kind` the type it must
    have ('num' for values, 'bool' for constraints, None for either). Raises ExprError."""
    if not isinstance(source, str):
        raise ExprError("unsafe_expression", f"expression must be a string, got {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise ExprError("unsafe_expression", f"expression longer than {MAX_SOURCE_CHARS} characters "
                                             f"({len(source)})")
    if not source.strip():
        raise ExprError("parse_error", "empty expression")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:  # parse only: nothing runs
        raise ExprError("parse_error", str(getattr(e, "msg", e)), source) from None
    walker = _Checker(source, None if names is None else frozenset(names))
    got = walker.check(tree.body)
    if kind is not None and got != kind:
        want = "a number" if kind == "num" else "a condition"
        raise ExprError("type_error", f"expected {want}", source)
    return Expr(source=source, tree=tree.body, names=frozenset(walker.seen), kind=got)


class _Checker:
    """One walk over a parsed tree: whitelist, limits, names, and num/bool types."""

    def __init__(self, source: str, allowed: frozenset[str] | None):
        self.source, self.allowed, self.seen, self.count = source, allowed, set(), 0

    def fail(self, code: str, message: str):
        raise ExprError(code, message, self.source)

    def check(self, node: ast.AST) -> str:  # -> 'num' | 'bool'
        self.count += 1
        if self.count > MAX_NODES:
            self.fail("unsafe_expression", f"more than {MAX_NODES} nodes")
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail("unsafe_expression", f"literal {type(v).__name__} not allowed")
            if not math.isfinite(v) or abs(v) > MAX_LITERAL:
                self.fail("unsafe_expression", f"literal {v!r} out of range")
            return "num"
        if isinstance(node, ast.Name):
            if not NAME_RE.fullmatch(node.id):
                self.fail("unsafe_expression", f"name {node.id!r} not allowed")
            if node.id in FUNCTIONS:
                self.fail("type_error", f"function {node.id!r} used as a value")
            if self.allowed is not None and node.id not in self.allowed:
                self.fail("unknown_name", f"unknown name {node.id!r}")
            self.seen.add(node.id)
            return "num"
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                self.fail("unsafe_expression", f"operator {type(node.op).__name__} not allowed")
            if isinstance(node.op, ast.Pow):
                self._check_exponent(node.right)
            self._want(node.left, "num")
            self._want(node.right, "num")
            return "num"
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                self._want(node.operand, "num")
                return "num"
            if isinstance(node.op, ast.Not):
                self._want(node.operand, "bool")
                return "bool"
            self.fail("unsafe_expression", f"operator {type(node.op).__name__} not allowed")
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self._want(v, "bool")
            return "bool"
        if isinstance(node, ast.Compare):
            if not all(isinstance(op, _CMPOPS) for op in node.ops):
                self.fail("unsafe_expression", "only == != < <= > >= comparisons are allowed")
            for v in (node.left, *node.comparators):
                self._want(v, "num")
            return "bool"
        if isinstance(node, ast.Call):
            f = node.func
            if not isinstance(f, ast.Name) or f.id not in FUNCTIONS:
                what = f.id if isinstance(f, ast.Name) else type(f).__name__
                self.fail("unsafe_expression", f"call to {what!r} not allowed; allowed: {', '.join(FUNCTIONS)}")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                self.fail("unsafe_expression", "keyword and starred arguments not allowed")
            lo, hi = FUNCTIONS[f.id]
            if not lo <= len(node.args) <= hi:
                self.fail("type_error", f"{f.id}() takes {lo}..{hi} arguments, got {len(node.args)}")
            self.count += 1
            for a in node.args:
                self._want(a, "num")
            if f.id == "round" and len(node.args) == 2:
                places = node.args[1]
                if not (isinstance(places, ast.Constant) and type(places.value) is int and 0 <= places.value <= 6):
                    self.fail("unsafe_expression", "round(x, n) needs a literal n in 0..6")
            return "num"
        self.fail("unsafe_expression", f"{type(node).__name__} not allowed")

    def _want(self, node: ast.AST, kind: str) -> None:
        got = self.check(node)
        if got != kind:
            self.fail("type_error", "a condition used as a number" if kind == "num" else "a number used as a condition")

    def _check_exponent(self, node: ast.AST) -> None:
        inner = node.operand if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) else node
        if isinstance(inner, ast.Constant) and type(inner.value) is int:
            if abs(inner.value) > MAX_EXPONENT:
                self.fail("unsafe_expression", f"exponent {inner.value} larger than {MAX_EXPONENT}")
            return
        if isinstance(inner, ast.Name):
            return  # checked when evaluated
        self.fail("unsafe_expression", "an exponent must be a small integer literal or a variable")


# ---------------------------------------------------------------------------------------------------------
# Exact helpers shared by the compiled (Fraction/int) path. Each takes and returns int | Fraction.
# ---------------------------------------------------------------------------------------------------------
def ex_div(a, b):
    """a / b, exact: an int when it divides evenly, else a Fraction. (7, 2) -> Fraction(7, 2); (8, 2) -> 4"""
    if type(a) is int and type(b) is int:
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    return Fraction(a) / b


def ex_pow(a, b):
    """a ** b for an integer |b| <= MAX_EXPONENT; 2 ** -1 -> Fraction(1, 2)."""
    if type(b) is not int:
        if b.denominator != 1:
            raise EvalError("non-integer exponent")
        b = b.numerator
    if abs(b) > MAX_EXPONENT:
        raise EvalError(f"exponent {b} larger than {MAX_EXPONENT}")
    return a ** b if b >= 0 else Fraction(1) / Fraction(a) ** -b


def ex_round(x, places=0):
    """Round half away from zero: round(2.5) -> 3, round(-2.5) -> -3, round(1.005, 2) -> 1.01 (exact input)."""
    scale = 10 ** places
    q = Fraction(x) * scale
    n = math.floor(abs(q) + Fraction(1, 2))
    n = n if q >= 0 else -n
    return n if places == 0 else ex_div(n, scale)


def _as_int(x, what):
    if type(x) is int:
        return x
    if x.denominator != 1:
        raise EvalError(f"{what} needs integers")
    return x.numerator


def ex_gcd(a, b):
    return math.gcd(_as_int(a, "gcd"), _as_int(b, "gcd"))


def ex_lcm(a, b):
    return math.lcm(_as_int(a, "lcm"), _as_int(b, "lcm"))


def ex_sqrt(x):
    """Exact square root of a perfect-square rational; anything else is an EvalError."""
    x = Fraction(x)
    if x < 0:
        raise EvalError("sqrt of a negative number")
    n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
    if n * n != x.numerator or d * d != x.denominator:
        raise EvalError("sqrt of a non-square")
    return n if d == 1 else Fraction(n, d)


EXACT_HELPERS: dict[str, Callable] = {
    "_div": ex_div, "_pow": ex_pow, "_min": min, "_max": max, "_abs": abs, "_round": ex_round,
    "_floor": math.floor, "_ceil": math.ceil, "_gcd": ex_gcd, "_lcm": ex_lcm, "_sqrt": ex_sqrt,
}
"""Names the exact compiled code may call: the only globals besides its constants and variables."""


def literal_value(v: int | float) -> int | Fraction:
    """A parsed literal as an exact number: 3 -> 3, 0.1 -> Fraction(1, 10) (via its shortest repr)."""
    return v if type(v) is int else Fraction(repr(v))


# ---------------------------------------------------------------------------------------------------------
# Walk 1: symbolic sympy, for dependency analysis.
# ---------------------------------------------------------------------------------------------------------
class _Gcd(sympy.Function):
    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(math.gcd(int(a), int(b)))


class _Lcm(sympy.Function):
    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(math.lcm(int(a), int(b)))


class _RoundHalfUp(sympy.Function):
    @classmethod
    def eval(cls, x, places=sympy.Integer(0)):
        if x.is_Rational:
            return sympy.Rational(ex_round(Fraction(int(x.p), int(x.q)), int(places)))


def to_sympy(e: Expr, env: dict[str, sympy.Basic] | None = None) -> sympy.Basic:
    """The expression as sympy, names replaced from `env` (default: a Symbol per name). Exponents are not
    bounded here; use evaluate_exact for numbers."""
    env = env or {}

    def walk(n: ast.AST):
        if isinstance(n, ast.Constant):
            return sympy.Rational(str(literal_value(n.value)))
        if isinstance(n, ast.Name):
            return env[n.id] if n.id in env else sympy.Symbol(n.id)
        if isinstance(n, ast.BinOp):
            a, b = walk(n.left), walk(n.right)
            op = type(n.op)
            if op is ast.Add:
                return a + b
            if op is ast.Sub:
                return a - b
            if op is ast.Mult:
                return a * b
            if op is ast.Div:
                return a / b
            if op is ast.FloorDiv:
                return sympy.floor(a / b)
            if op is ast.Mod:
                return sympy.Mod(a, b)
            return a ** b
        if isinstance(n, ast.UnaryOp):
            v = walk(n.operand)
            if isinstance(n.op, ast.Not):
                return sympy.Not(v)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BoolOp):
            vals = [walk(v) for v in n.values]
            return sympy.And(*vals) if isinstance(n.op, ast.And) else sympy.Or(*vals)
        if isinstance(n, ast.Compare):
            parts, left = [], walk(n.left)
            for op, c in zip(n.ops, n.comparators):
                right = walk(c)
                parts.append(_SYMPY_CMP[type(op)](left, right))
                left = right
            return sympy.And(*parts) if len(parts) > 1 else parts[0]
        if isinstance(n, ast.Call):
            args = [walk(a) for a in n.args]
            return _SYMPY_FUNCS[n.func.id](*args)
        raise ExprError("unsafe_expression", f"{type(n).__name__} not allowed")  # unreachable after parse()

    return walk(e.tree)


_SYMPY_CMP = {ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne, ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt,
              ast.GtE: sympy.Ge}
_SYMPY_FUNCS = {"min": sympy.Min, "max": sympy.Max, "abs": sympy.Abs, "round": _RoundHalfUp,
                "floor": sympy.floor, "ceil": sympy.ceiling, "gcd": _Gcd, "lcm": _Lcm, "sqrt": sympy.sqrt}


# ---------------------------------------------------------------------------------------------------------
# Walk 2: exact evaluation with sympy numbers (the verifier's ground truth, independent of compile.py).
# ---------------------------------------------------------------------------------------------------------
def evaluate_exact(e: Expr, env: dict[str, object]) -> sympy.Rational | bool:
    """Value of `e` with sympy exact arithmetic; env values are int, Fraction or sympy numbers.
    Returns a sympy Rational (num) or bool; raises EvalError when there is no exact finite value."""
    senv = {k: (sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sympy.sympify(v))
            for k, v in env.items() if k in e.names}

    def num(n):
        v = walk(n)
        if not isinstance(v, sympy.Rational):
            raise EvalError(f"no exact rational value ({v})")
        return v

    def walk(n: ast.AST):
        if isinstance(n, ast.Constant):
            return sympy.Rational(str(literal_value(n.value)))
        if isinstance(n, ast.Name):
            return senv[n.id]
        if isinstance(n, ast.BinOp):
            a, b = num(n.left), num(n.right)
            op = type(n.op)
            if op in (ast.Div, ast.FloorDiv, ast.Mod) and b == 0:
                raise EvalError("division by zero")
            if op is ast.Add:
                return a + b
            if op is ast.Sub:
                return a - b
            if op is ast.Mult:
                return a * b
            if op is ast.Div:
                return a / b
            if op is ast.FloorDiv:
                return sympy.floor(a / b)
            if op is ast.Mod:
                return sympy.Mod(a, b)
            if not b.is_Integer or abs(b) > MAX_EXPONENT:
                raise EvalError(f"exponent {b} not an integer within {MAX_EXPONENT}")
            if a == 0 and b < 0:
                raise EvalError("division by zero")
            return a ** b
        if isinstance(n, ast.UnaryOp):
            if isinstance(n.op, ast.Not):
                return not walk(n.operand)
            v = num(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BoolOp):
            if isinstance(n.op, ast.And):
                return all(walk(v) for v in n.values)
            return any(walk(v) for v in n.values)
        if isinstance(n, ast.Compare):
            left = num(n.left)
            for op, c in zip(n.ops, n.comparators):
                right = num(c)
                if not bool(_SYMPY_CMP[type(op)](left, right)):
                    return False
                left = right
            return True
        if isinstance(n, ast.Call):
            args = [num(a) for a in n.args]
            name = n.func.id
            if name in ("gcd", "lcm") and not all(a.is_Integer for a in args):
                raise EvalError(f"{name} needs integers")
            if name == "sqrt" and args[0] < 0:
                raise EvalError("sqrt of a negative number")
            v = _SYMPY_FUNCS[name](*args)
            if not isinstance(v, sympy.Rational):
                raise EvalError(f"{name}() has no exact rational value")
            return v
        raise ExprError("unsafe_expression", f"{type(n).__name__} not allowed")

    out = walk(e.tree)
    if isinstance(out, bool):
        return out
    if not isinstance(out, sympy.Rational):
        raise EvalError(f"no exact rational value ({out})")
    return out


# ---------------------------------------------------------------------------------------------------------
# Walk 3: Python `ast` of our own construction (compile.py and the readable solution_code).
# ---------------------------------------------------------------------------------------------------------
_PY_BINOP = {ast.Add: ast.Add, ast.Sub: ast.Sub, ast.Mult: ast.Mult, ast.Div: ast.Div, ast.FloorDiv: ast.FloorDiv,
             ast.Mod: ast.Mod, ast.Pow: ast.Pow}
_PY_CMP = {ast.Eq: ast.Eq, ast.NotEq: ast.NotEq, ast.Lt: ast.Lt, ast.LtE: ast.LtE, ast.Gt: ast.Gt, ast.GtE: ast.GtE}


def python_ast(e: Expr, *, exact: bool, name: Callable[[str], str], const: Callable[[object], ast.expr]) -> ast.expr:
    """A NEW ast tree for `e`, built node by node from our own node types (never copied from the parse):

    exact=True   int/Fraction semantics: `/` -> _div(a, b), `**` -> _pow(a, b), calls -> EXACT_HELPERS
    exact=False  readable float Python for solution_code: `/`, `**`, math.floor, round_half_up, ...

    `name(id)` maps a variable to the identifier to emit; `const(value)` the node for an exact literal."""

    def call(fn: str, args: list[ast.expr]) -> ast.expr:
        return ast.Call(func=ast.Name(id=fn, ctx=ast.Load()), args=args, keywords=[])

    def walk(n: ast.AST) -> ast.expr:
        if isinstance(n, ast.Constant):
            return const(literal_value(n.value))
        if isinstance(n, ast.Name):
            ident = name(n.id)
            if not ident.isidentifier():
                raise ValueError(f"bad identifier {ident!r}")
            return ast.Name(id=ident, ctx=ast.Load())
        if isinstance(n, ast.BinOp):
            a, b = walk(n.left), walk(n.right)
            if exact and isinstance(n.op, ast.Div):
                return call("_div", [a, b])
            if exact and isinstance(n.op, ast.Pow):
                return call("_pow", [a, b])
            return ast.BinOp(left=a, op=_PY_BINOP[type(n.op)](), right=b)
        if isinstance(n, ast.UnaryOp):
            op = {ast.USub: ast.USub, ast.UAdd: ast.UAdd, ast.Not: ast.Not}[type(n.op)]()
            return ast.UnaryOp(op=op, operand=walk(n.operand))
        if isinstance(n, ast.BoolOp):
            return ast.BoolOp(op=ast.And() if isinstance(n.op, ast.And) else ast.Or(),
                              values=[walk(v) for v in n.values])
        if isinstance(n, ast.Compare):
            return ast.Compare(left=walk(n.left), ops=[_PY_CMP[type(o)]() for o in n.ops],
                               comparators=[walk(c) for c in n.comparators])
        if isinstance(n, ast.Call):
            fn = n.func.id
            args = [walk(a) for a in n.args]
            if exact:
                return call("_" + fn, args)
            if fn in ("floor", "ceil", "sqrt"):
                return ast.Call(func=ast.Attribute(value=ast.Name(id="math", ctx=ast.Load()), attr=fn,
                                                   ctx=ast.Load()), args=args, keywords=[])
            if fn in ("gcd", "lcm"):
                ints = [call("int", [a]) for a in args]
                return ast.Call(func=ast.Attribute(value=ast.Name(id="math", ctx=ast.Load()), attr=fn,
                                                   ctx=ast.Load()), args=ints, keywords=[])
            if fn == "round":
                return call("round_half_up", args)
            return call(fn, args)  # min, max, abs
        raise ExprError("unsafe_expression", f"{type(n).__name__} not allowed")

    return walk(e.tree)


def float_source(e: Expr) -> str:
    """Readable float Python for `e` (what solution_code shows): 'price * count / 2'."""
    def const(v):
        return ast.Constant(value=v if type(v) is int else float(v))
    return ast.unparse(python_ast(e, exact=False, name=lambda s: s, const=const))
