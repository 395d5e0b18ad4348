"""Compile a checked template ONCE into plain Python functions: no sympy, no parsing in the per-row hot path.

For each template we generate the source of three small functions and compile it with `compile()`:

    _check(v_a, v_b, ...)          -> bool      all constraints hold
    _finish(v_a, ..., w_name, ...) -> (answer, problem, solution_wocode, solution_code, step values)
    _generate(_key)                -> (attempt, variable values, _finish output) | None
                                      draws variables from blake2b(_key, attempt) bits until the constraints
                                      hold, the steps evaluate, and the answer has its declared type

Why running this generated code is safe although the template came from a model:
  * Every expression in it is produced by `expr.python_ast` from a tree that passed the whitelist walk in
    `expr.parse`; `python_ast` builds NEW nodes of a few types (BinOp, UnaryOp, Compare, BoolOp, Name, Call of
    our helper names, int Constant) and never copies a parsed node or string.
  * Identifiers are `v_<name>` / `w_<name>` where name matched `expr.NAME_RE` (lower-case, no leading '_'),
    or names we number ourselves (_t3, _k0, _w1). Integer literals are Python ints (digits only).
  * Template text and words never enter the source: they are bound as values of `_tN` / `_wN` globals.
  * Before compiling we re-parse the generated source and `_audit` it: no string constants, no attribute
    access, no imports, no lambdas or comprehensions, and every name is ours. Then it is compiled and run
    with `__builtins__` = {} plus exactly the helpers it needs.
Exact arithmetic: ints stay ints; `/` gives an int when it divides, else a Fraction (expr.ex_div).
"""
from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import engine.methods.tdg.expr as X
from engine.methods.tdg.template import CheckedTemplate, Part, Word

MAX_DRAWS = 1000
"""Most attempts to draw one instance whose constraints hold (and whose answer has the declared type)."""

_ERRORS = (ArithmeticError, ValueError, TypeError)

ROUND_HALF_UP_SRC = (
    "def round_half_up(x, places=0):\n"
    "    scale = 10 ** places\n"
    "    y = math.floor(abs(x) * scale + 0.5) / scale\n"
    "    y = y if x >= 0 else -y\n"
    "    return int(y) if places == 0 else y\n"
)
"""Helper defined in solution_code when the template uses round(): rounds half away from zero, like expr."""


def bits(key: bytes, attempt: int) -> int:
    """512 random bits for attempt `attempt` of the instance keyed by `key` (blake2b: stable everywhere)."""
    return int.from_bytes(hashlib.blake2b(key + attempt.to_bytes(4, "little"), digest_size=64).digest(), "little")


def fmt_num(x) -> str:
    """An exact number as text: 12 -> '12', 5/2 -> '2.5', 1/8 -> '0.125', 1/3 -> '1/3'."""
    if type(x) is int:
        return str(x)
    n, d = x.numerator, x.denominator
    if d == 1:
        return str(n)
    for p in range(1, 7):
        s = 10 ** p
        if s % d == 0:
            q = abs(n) * (s // d)
            return ("-" if n < 0 else "") + f"{q // s}.{q % s:0{p}d}"
    return f"{n}/{d}"


def fmt_fixed(x, places: int) -> str:
    """A decimal variable shown with its step's places: (5/2, 2) -> '2.50' (digits past `places` dropped,
    rounding toward minus infinity)."""
    s = 10**places
    n = x * s if type(x) is int else x.numerator * s // x.denominator  # no Fraction built: ~2 us a call less
    return ("-" if n < 0 else "") + f"{abs(n) // s}.{abs(n) % s:0{places}d}"


def answer_checker(kind: str, places: int) -> Callable[[object], bool]:
    """Does an exact value have the declared answer type? integer: whole; decimal: <= places places."""
    if kind == "integer":
        return lambda x: type(x) is int or x.denominator == 1
    if kind == "decimal":
        scale = 10**places
        return lambda x: type(x) is int or (x * scale).denominator == 1
    return lambda x: True


def fmt_answer(x, kind: str) -> str:
    """The `result` string: integer '42'; decimal '12.5'; fraction '3/4' (an int when whole)."""
    if kind == "fraction":
        x = Fraction(x)
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return fmt_num(x)


def _audit(tree: ast.AST, allowed_names: set[str]) -> None:
    """Refuse generated code that contains anything but our own constructs (see the module docstring)."""
    ok = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.If, ast.For,
          ast.Continue, ast.Try, ast.ExceptHandler, ast.Expr, ast.Tuple, ast.Name, ast.Load, ast.Store,
          ast.Constant, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.operator, ast.unaryop,
          ast.boolop, ast.cmpop, ast.Subscript)  # Subscript: only _w0[_wi0] and _out[0], names checked
    for node in ast.walk(tree):
        if not isinstance(node, ok):
            raise RuntimeError(f"generated code contains {type(node).__name__}")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, int)):
            if node.value is not None and node.value is not True:
                raise RuntimeError(f"generated code contains a non-int constant {node.value!r}")
        if isinstance(node, ast.Name) and not (node.id in allowed_names or node.id.startswith(("v_", "w_"))):
            raise RuntimeError(f"generated code uses unexpected name {node.id!r}")


@dataclass
class CompiledTemplate:
    """Fast callables for one checked template. `source` is the generated Python, for reading/debugging."""

    checked: CheckedTemplate
    source: str
    check: Callable          # (*numeric values) -> bool
    finish: Callable         # (*numeric values, *words) -> (answer, problem, solution, code, steps, result)
    generate: Callable       # (key: bytes) -> (attempt, values tuple, finish output) | None
    var_names: tuple[str, ...]  # numeric names then word names: the order of `values`

    def evaluate(self, values: dict) -> tuple[bool, object, tuple, tuple[str, str, str]]:
        """(constraints hold, answer, step values, (problem, solution_wocode, solution_code)) for given values.
        Raises ArithmeticError/ValueError when the instance has no value (division by zero, ...)."""
        nums = [values[v.name] for v in self.checked.numeric]
        ok = self.check(*nums)
        ans, problem, solution, code, steps, _ = self.finish(*nums, *(values[w.name] for w in self.checked.words))
        return ok, ans, steps, (problem, solution, code)


def compile_template(ct: CheckedTemplate, *, max_draws: int = MAX_DRAWS) -> CompiledTemplate:
    """Generate, audit and compile the functions of one checked template (a few ms; do it once)."""
    g: dict[str, object] = {"__builtins__": {}, "range": range, "divmod": divmod, "_join": "".join,
                            "_fmt": fmt_num, "_fmtfixed": fmt_fixed, "_ERRORS": _ERRORS, "_bits": bits,
                            "_MAX_DRAWS": max_draws, "_fmtans": fmt_answer, "_anskind": ct.template.answer.type}
    g.update(X.EXACT_HELPERS)
    counter = {"k": 0, "t": 0}

    def const(v) -> ast.expr:  # exact literal: ints inline, Fractions as a numbered global
        if type(v) is int:
            return ast.Constant(v) if v >= 0 else ast.UnaryOp(op=ast.USub(), operand=ast.Constant(-v))
        name = f"_k{counter['k']}"
        counter["k"] += 1
        g[name] = v
        return ast.Name(id=name, ctx=ast.Load())

    def text_const(s: str) -> str:
        name = f"_t{counter['t']}"
        counter["t"] += 1
        g[name] = s
        return name

    def ex(e: X.Expr) -> str:
        return ast.unparse(X.python_ast(e, exact=True, name=lambda n: "v_" + n, const=const))

    places = {v.name: v.places for v in ct.numeric}

    def render(parts: tuple[Part, ...]) -> str:  # -> source of a str-valued expression
        items = []
        for p in parts:
            if isinstance(p, str):
                items.append(text_const(p))
            elif isinstance(p, Word):
                items.append("w_" + p.name)
            elif len(p.names) == 1 and isinstance(p.tree, ast.Name) and places.get(p.tree.id, 0) > 0:
                items.append(f"_fmtfixed(v_{p.tree.id}, {places[p.tree.id]})")
            else:
                items.append(f"_fmt({ex(p)})")
        if not items:
            return text_const("")
        return f"_join(({', '.join(items)},))"

    nums = [f"v_{v.name}" for v in ct.numeric]
    words = [f"w_{w.name}" for w in ct.words]
    for i, w in enumerate(ct.words):
        g[f"_w{i}"] = w.words
        g[f"_wr{i}"] = tuple(repr(s) for s in w.words)

    # solution_code: fixed text with the variable values spliced in (float Python, readable, like TemplateGSM)
    uses_round = any("round" in _calls(e) for e in [ct.answer, *(s.expr for s in ct.steps)])
    head = "import math\n\n" + (ROUND_HALF_UP_SRC + "\n" if uses_round else "") + "\ndef solution():\n"
    code_items = []
    for i, v in enumerate(ct.numeric):
        code_items += [text_const((head if i == 0 else "") + f"    {v.name} = "), f"_fmt(v_{v.name})",
                       text_const("\n")]
    for i, w in enumerate(ct.words):
        code_items += [text_const(f"    {w.name} = "), f"_wr{i}[_wi{i}]", text_const("\n")]
    body = "".join(f"    {s.name} = {X.float_source(s.expr)}\n" for s in ct.steps)
    body += f"    result = {X.float_source(ct.answer)}\n    return result\n"
    code_items.append(text_const(body))

    constraint_src = " and ".join(f"({ex(c)})" for c in ct.constraints) or "True"
    step_lines = "".join(f"    v_{s.name} = {ex(s.expr)}\n" for s in ct.steps)
    solution_parts = [render(s.text) for s in ct.steps]
    answer_text = text_const("The answer is ")
    word_idx = [f"_wi{i}" for i in range(len(ct.words))]
    finish_args = ", ".join(nums + words + word_idx)

    src = f"def _check({', '.join(nums)}):\n    return {constraint_src}\n\n"
    src += f"def _finish({finish_args}):\n{step_lines}"
    src += f"    _ans = {ex(ct.answer)}\n"
    src += "    _result = _fmtans(_ans, _anskind)\n"
    src += f"    _problem = {render(ct.problem)}\n"
    dot = text_const(".")
    tail = f"_join(({answer_text}, _result, {dot}))"
    src += f"    _solution = _nljoin(({''.join(p + ', ' for p in solution_parts)}{tail},))\n"
    src += f"    _code = _join(({', '.join(code_items)},))\n"
    src += f"    return (_ans, _problem, _solution, _code, ({''.join(f'v_{s.name}, ' for s in ct.steps)}), _result)\n\n"

    draw = []
    for v in ct.numeric:
        draw.append(f"        _r, _i = divmod(_r, {v.count})\n")
        lo, step = const(v.lo), const(v.step)
        draw.append(f"        v_{v.name} = {ast.unparse(lo)} + {ast.unparse(step)} * _i\n")
    for i, w in enumerate(ct.words):
        draw.append(f"        _r, _wi{i} = divmod(_r, {len(w.words)})\n        w_{w.name} = _w{i}[_wi{i}]\n")
    src += (
        "def _generate(_key):\n"
        "    for _attempt in range(_MAX_DRAWS):\n"
        "        _r = _bits(_key, _attempt)\n"
        + "".join(draw) +
        "        try:\n"
        f"            if not _check({', '.join(nums)}):\n"
        "                continue\n"
        f"            _out = _finish({finish_args})\n"
        "        except _ERRORS:\n"
        "            continue\n"
        "        if not _oktype(_out[0]) or _out[0] < 0:\n"
        "            continue\n"
        f"        return (_attempt, ({''.join(a + ', ' for a in nums + words)}), _out)\n"
        "    return None\n"
    )
    g["_oktype"] = answer_checker(ct.template.answer.type, ct.template.answer.places)
    g["_nljoin"] = "\n".join

    tree = ast.parse(src)
    _audit(tree, allowed_names=set(g) | {"_check", "_finish", "_generate", "_r", "_i", "_ans", "_result",
                                         "_problem", "_solution", "_code", "_attempt", "_key", "_out",
                                         *word_idx})
    code = compile(tree, f"<tdg {ct.template_id}>", "exec")
    exec(code, g)  # our generated, audited code (see module docstring); never model text
    finish = g["_finish"]
    if ct.words:  # callers pass words; finish wants words + their indexes (for the code's repr)
        raw_finish = finish
        index = [{s: j for j, s in enumerate(w.words)} for w in ct.words]
        n_num, n_w = len(ct.numeric), len(ct.words)

        def finish(*args):
            ws = args[n_num:n_num + n_w]
            return raw_finish(*args, *(index[i][s] for i, s in enumerate(ws)))
    return CompiledTemplate(checked=ct, source=src, check=g["_check"], finish=finish, generate=g["_generate"],
                            var_names=tuple(v.name for v in ct.numeric) + tuple(w.name for w in ct.words))


def _calls(e: X.Expr) -> set[str]:
    return {n.func.id for n in ast.walk(e.tree) if isinstance(n, ast.Call)}
