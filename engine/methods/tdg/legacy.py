"""Import TemplateMath's legacy templates: Python that only ever runs in a locked-down child process.

TemplateMath (arXiv 2411.18104, the TemplateGSM dataset) released jsonl files whose field `template` holds
Python source defining `generate_problem_and_solution_code()`. Their generator exec'd it with the globals
`random`, `math`, `json`, `first_names`, `last_names`, `items`, `places`, `us_counties` (and `os`, `sympy`)
and read back a 4-tuple:

    problem, solution_code, result, solution_wocode = generate_problem_and_solution_code()
    # "Ava buys 3 pens at $2 each ...", "# pens\\npens = 3\\n...\\nresult = pens * price\\n", 6, "Ava pays ..."

`solution_code` is module-level code that leaves the answer in a variable `result`; most templates build it
with an f-string and then run it themselves with `exec(solution_code, {}, exec_globals)`.

    verdicts = verify_legacy(raws, k=8)          # [Verdict(accepted=True, ...), Verdict(False, 'timeout', ...)]
    rows = instantiate_legacy(raws[0], 1000)     # an iterator of row dicts
    for row in rows: ...
    rows.stats  # {'requested': 1000, 'attempted': 1003, 'produced': 1000, 'dropped': {'code_mismatch': 3}, ...}

Nothing from a template is exec'd, eval'd or imported in this process: the source is parsed (`ast.parse`, which
runs nothing) for the static audit, everything else happens in children started by `_run_children`.

Checks of `verify_legacy`, in order; the first failure is the rejection `reason` (LEGACY_REASONS):

  static audit (this process, AST only)
    not_legacy           no str field `template`
    too_long             source over MAX_SOURCE characters
    syntax_error         does not parse
    no_generator         no top-level `def generate_problem_and_solution_code()` without required arguments
    forbidden_import     an import outside MODULES (os, subprocess, socket, sympy, ...), a relative or star import
    forbidden_name       a name from FORBIDDEN_NAMES (open, eval, getattr, globals, type, os, sys, ...); `exec` is
                         allowed only called directly (`exec(code, {}, ns)`, as TemplateMath's templates do)
    dunder               a dunder anywhere: a name, an attribute, a keyword, a string constant ('__class__')
    forbidden_attribute  an attribute starting with '_' (random._os), an escape hatch (gi_frame, f_back,
                         f_globals, tb_frame, mro, Formatter, ...), or any attribute assignment/deletion
    forbidden_syntax     a class, a bare `except:` or one catching BaseException/SystemExit/KeyboardInterrupt
    huge_power           a constant power or shift of more than MAX_POWER_DIGITS digits (10**10**10, 1 << 10**9)
    memory_bomb          a constant sequence repeated more than MAX_REPEAT times ('x' * 10**10, [0] * 10**9)
  instances (one generation child for all templates of the call)
    timeout              an instance ran past `timeout_s` (a Python loop: interval timer; a C-level loop such as
                         b ** b ** b: the parent kills the child when no answer comes in time)
    memory               MemoryError under RLIMIT_AS, or too much output
    recursion            RecursionError (the child's recursion limit is RECURSION_LIMIT)
    killed               the child died (CPU limit, a crash)
    blocked              refused at run time: an import outside MODULES, a runtime-built `exec` string that fails
                         the audit, or an operation the child's audit hook refuses (open, os.*, socket.*, ...)
    instance_error       any other exception
    bad_return           not a 4-tuple (str, str, int|float|Fraction|Decimal|str, str), or a field too long
    nondeterministic     the same (seed, template_id, problem_id) gave a different instance twice
  solution_code, re-run on its own (a second child that never runs template code)
    code_error           solution_code fails the audit, raises, or leaves no usable `result`
    code_mismatch        its `result` differs from the returned result (numbers: relative 1e-9, like
                         sandbox.same_answer; strings: exactly; a numeric string is read as a number)
  text and code
    text_code_mismatch   see "Text/code agreement" below

Instance seeding: before instance `problem_id` the child calls `random.seed(s)` with
s = blake2b("legacy:{seed}:{template_id}:{problem_id}") (8 bytes), and runs the template source in fresh
globals, so an instance depends on those three values only: reproducible across processes and batch sizes.
template_id is the file's own id (field `template_id`, `idx` or `id`, as a string) or else
'legacy-' + a hash of the source.

Text/code agreement (the `text_code_mismatch` rule). Quantities are read from each instance:
  * text mentions: every number written with digits in the problem ('1,200', '3.5', '$12.50', '20%', '3/4',
    '2:30'), each with the values it may stand for ('20%' -> 20, 0.2, 0.8, 1.2, 80, 120; '3/4' -> 0.75, 3, 4;
    '2:30' -> 2, 30, 150, 2.5); ordinals ('5th') are skipped. Number words ('three', 'half' -> 0.5 or 2,
    'twice', 'dozen', ...) are mentions too, but optional ones.
  * code inputs: every int/float literal of solution_code (from its AST; the ndigits of round() are skipped);
  * code values: every numeric top-level variable solution_code leaves behind (inputs, steps and result).
  A template is rejected when, in any of its k instances,
    (A) a code input is neither an ALLOWED_CONSTANTS value (0, 1, 2, 0.5, 100, 60, 24, 12, 7, 365, ...) nor a
        value of some text mention ("solution_code uses 50, which the problem text never names"), or
    (B) a digit mention of the text matches no code input and no code value ("the problem names 48, which
        solution_code never uses or computes"); a computed value may match a mention rounded to the mention's
        decimals ('3.33' matches 3.3333...), an input must match exactly.
  Limits: it compares quantities, not roles, so swapped numbers (text: 3 boxes of 8; code: 8 boxes of 3) and a
  wrong operation (half vs double) pass; a wrong literal that happens to equal an allowed constant passes (A)
  for that instance; a number spelled as a word that the code ignores passes; digits that are part of a name
  ('Route 66', a year used as a date) are quantities for (B) and reject the template when the code ignores
  them. Numbers are compared as floats within relative 1e-9.

The sandbox (both children): `python -I -S -B` with an empty environment in an empty temporary directory, its
own session, rlimits set by the child before it reads any code (sandbox.LIMITS: RLIMIT_AS=mem_mb, RLIMIT_CPU, RLIMIT_FSIZE=0,
RLIMIT_NOFILE=16, RLIMIT_NPROC=0 where the kernel applies it to the user (not to root), RLIMIT_CORE=0),
`unshare(CLONE_NEWUSER|CLONE_NEWNET)` tried (best effort), MODULES imported before any template code,
then an audit hook that refuses every event except compile/exec/builtins.id (open, os.*, subprocess.*, socket.*,
ctypes.*, sys._getframe, gi_frame/tb_frame access, new imports, ...). Template code gets reduced builtins (no
open/eval/getattr/type/object/__build_class__), an import hook returning fresh module proxies that hold only
public, non-module attributes of MODULES, a guarded `exec` that audits its string first and runs it with the
same reduced builtins, a no-op `print`, fresh copies of the name lists, a reset decimal context. The parent
kills a child (its whole session) whenever an instance gives no answer within `timeout_s` + 1 s, marks that
instance, and continues with the next template in a new child; every child is reaped before returning.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

from engine.methods.tdg.sandbox import LIMITS
from engine.methods.tdg.verify import Verdict
from engine.request import stable_hash

GENERATOR = "generate_problem_and_solution_code"
"""The function a legacy template defines."""

LEGACY_REASONS = ("not_legacy", "too_long", "syntax_error", "no_generator", "forbidden_import", "forbidden_name",
                  "dunder", "forbidden_attribute", "forbidden_syntax", "huge_power", "memory_bomb", "timeout",
                  "memory", "recursion", "killed", "blocked", "instance_error", "bad_return", "nondeterministic",
                  "code_error", "code_mismatch", "text_code_mismatch")
"""Every rejection reason of verify_legacy, in the order the checks run."""

MODULES = ("random", "math", "fractions", "decimal", "itertools", "functools", "string", "statistics",
           "collections", "datetime", "json")
"""The only modules legacy code may import (as proxies of their public, non-module attributes)."""

FORBIDDEN_NAMES = (
    "eval", "exec", "compile", "open", "input", "breakpoint", "help", "exit", "quit", "copyright", "credits",
    "license", "getattr", "setattr", "delattr", "hasattr", "globals", "locals", "vars", "dir", "type", "object",
    "super", "classmethod", "staticmethod", "property", "memoryview", "os", "sys", "subprocess", "socket",
    "shutil", "ctypes", "importlib", "builtins", "pathlib", "io", "signal", "resource", "multiprocessing",
    "threading", "pickle", "marshal", "inspect", "gc", "sympy", "numpy")
"""Names legacy code may not mention (`exec` only as a direct call, which the sandbox guards)."""

FORBIDDEN_ATTRIBUTES = (
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code", "ag_await",
    "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "f_trace", "tb_frame", "tb_next", "co_code",
    "co_consts", "co_names", "func_globals", "func_code", "mro", "Formatter", "get_field", "vformat", "modules",
    "system", "popen", "load_module", "builtins", "with_traceback")
"""Attributes legacy code may not use, besides every name that starts with '_'."""

BUILTINS = (
    "abs", "all", "any", "bool", "chr", "dict", "divmod", "enumerate", "filter", "float", "format", "frozenset",
    "int", "isinstance", "iter", "len", "list", "map", "max", "min", "next", "ord", "pow", "range", "repr",
    "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "True", "False", "None",
    "Exception", "ArithmeticError", "ZeroDivisionError", "ValueError", "TypeError", "KeyError", "IndexError",
    "StopIteration", "RuntimeError", "OverflowError", "AssertionError", "LookupError", "NameError")
"""Builtins legacy code gets (plus a guarded exec, a no-op print and the import hook)."""

MAX_SOURCE = 50_000
"""Longest template (or solution_code) source accepted, in characters."""
MAX_TEXT = 20_000
"""Longest problem / solution_code / solution_wocode / str result an instance may return."""
MAX_POWER_DIGITS = 1000
"""Largest constant power (in decimal digits) the audit lets through."""
MAX_REPEAT = 10**7
"""Largest constant repetition count of a sequence the audit lets through."""
RECURSION_LIMIT = 400
"""The child's recursion limit (deep recursion ends as RecursionError: 'recursion')."""

ALLOWED_CONSTANTS = (0, 1, 2, 0.5, 0.25, 10, 100, 1000, 7, 12, 24, 30, 52, 60, 365, 3600)
"""Literals solution_code may use without the text naming them: 0/1/2, halves and quarters, percent and
metric factors, days/weeks/months/hours/minutes conversions."""

_POLICY = {"modules": list(MODULES), "names": list(FORBIDDEN_NAMES), "attrs": list(FORBIDDEN_ATTRIBUTES),
           "builtins": list(BUILTINS), "max_source": MAX_SOURCE, "max_text": MAX_TEXT,
           "max_power_digits": MAX_POWER_DIGITS, "max_repeat": MAX_REPEAT, "recursion_limit": RECURSION_LIMIT}


# -- the static audit (also shipped, as source, into the children: it uses only ast and re) ----------------------
def audit_source(src, policy, require_generator=True):
    """Audit Python source without running it: None when it passes, else (reason, detail).

        audit_source("import os", _POLICY) -> ('forbidden_import', 'line 1: import os')
    """
    import ast
    import math as _m
    import re as _re

    if not isinstance(src, str):
        return ("syntax_error", "the source is not a string")
    if len(src) > policy["max_source"]:
        return ("too_long", "%d characters, at most %d" % (len(src), policy["max_source"]))
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        return ("syntax_error", "%s: %s" % (type(e).__name__, str(e)[:200]))
    modules, names, attrs = set(policy["modules"]), set(policy["names"]), set(policy["attrs"])
    dunder = _re.compile(r"__\w+__")
    max_digits, max_repeat = policy["max_power_digits"], policy["max_repeat"]

    class Huge(Exception):
        pass

    def const(node, depth=0):
        # a number when `node` is a constant arithmetic expression; raises Huge for a too large power
        if depth > 50:
            return None
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = const(node.operand, depth + 1)
            return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp):
            a, b = const(node.left, depth + 1), const(node.right, depth + 1)
            if a is None or b is None:
                return None
            if isinstance(node.op, ast.Pow):
                return power(a, b)
            if isinstance(node.op, ast.LShift):
                if b > max_digits * 3.33:
                    raise Huge()
                return None
            try:
                if isinstance(node.op, ast.Add):
                    return a + b
                if isinstance(node.op, ast.Sub):
                    return a - b
                if isinstance(node.op, ast.Mult):
                    if abs(a) > 10**max_digits or abs(b) > 10**max_digits:
                        return None
                    return a * b
            except (OverflowError, ValueError):
                return None
        return None

    def power(a, b):
        if abs(a) > 1 and b > 0 and b * _m.log10(abs(a)) > max_digits:
            raise Huge()
        try:
            return a ** b
        except (OverflowError, ZeroDivisionError, ValueError):
            return None

    def repeated(node):
        return isinstance(node, (ast.List, ast.Tuple, ast.JoinedStr)) or (
            isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))

    direct_exec = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "exec":
            direct_exec.add(id(node.func))
    found = []  # (reason, detail), all of them; the most telling reason is reported

    def bad(reason, detail):
        found.append((reason, where + detail))

    try:
        for node in ast.walk(tree):
            where = "line %d: " % getattr(node, "lineno", 0)
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name not in modules:
                        bad("forbidden_import", "import " + a.name)
                    if a.asname and (dunder.search(a.asname) or a.asname in names):
                        bad("forbidden_name", "import as " + a.asname)
            elif isinstance(node, ast.ImportFrom):
                if node.level or node.module not in modules:
                    bad("forbidden_import", "from %s%s import" % ("." * node.level, node.module or ""))
                for a in node.names:
                    if a.name == "*":
                        bad("forbidden_import", "from %s import *" % node.module)
                    elif a.name.startswith("_") or a.name in attrs:
                        bad("forbidden_attribute", "from %s import %s" % (node.module, a.name))
                    if a.asname and (dunder.search(a.asname) or a.asname in names):
                        bad("forbidden_name", "import as " + a.asname)
            elif isinstance(node, ast.Name):
                if dunder.search(node.id):
                    bad("dunder", "name " + node.id)
                elif node.id in names and id(node) not in direct_exec:
                    bad("forbidden_name", node.id)
            elif isinstance(node, ast.Attribute):
                if dunder.search(node.attr):
                    bad("dunder", "attribute ." + node.attr)
                elif node.attr.startswith("_") or node.attr in attrs:
                    bad("forbidden_attribute", "attribute ." + node.attr)
                elif not isinstance(node.ctx, ast.Load):
                    bad("forbidden_attribute", "assignment to attribute ." + node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if dunder.search(node.name):
                    bad("dunder", "def " + node.name)
                elif node.name in names:
                    bad("forbidden_name", "def " + node.name)
            elif isinstance(node, ast.arg):
                if dunder.search(node.arg):
                    bad("dunder", "argument " + node.arg)
            elif isinstance(node, ast.keyword):
                if node.arg and dunder.search(node.arg):
                    bad("dunder", "keyword " + node.arg)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                for n in node.names:
                    if dunder.search(n) or n in names:
                        bad("forbidden_name", "global " + n)
            elif isinstance(node, ast.ClassDef):
                bad("forbidden_syntax", "class " + node.name)
            elif isinstance(node, ast.ExceptHandler):
                if node.type is None:
                    bad("forbidden_syntax", "bare except:")
                else:
                    for c in (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]):
                        if isinstance(c, ast.Name) and c.id in ("BaseException", "SystemExit", "KeyboardInterrupt",
                                                                "GeneratorExit"):
                            bad("forbidden_syntax", "except " + c.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                m = dunder.search(text)
                if m:
                    bad("dunder", "string constant with " + m.group(0))
            elif isinstance(node, ast.BinOp):
                try:
                    if isinstance(node.op, (ast.Pow, ast.LShift)):
                        const(node)
                    elif isinstance(node.op, ast.Mult):
                        for seq, n in ((node.left, node.right), (node.right, node.left)):
                            if repeated(seq):
                                count = const(n)
                                if isinstance(count, int) and count > max_repeat:
                                    bad("memory_bomb", "a sequence repeated %s times" % (
                                        count if count < 10**30 else "more than 10**30"))
                except Huge:
                    bad("huge_power", "a constant power of more than %d digits" % max_digits)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pow":
                if len(node.args) == 2:
                    try:
                        a, b = const(node.args[0]), const(node.args[1])
                        if a is not None and b is not None:
                            power(a, b)
                    except Huge:
                        bad("huge_power", "a constant power of more than %d digits" % max_digits)
    except RecursionError:
        return ("syntax_error", "expression nested too deeply")
    if found:
        order = ("forbidden_import", "dunder", "forbidden_name", "forbidden_attribute", "forbidden_syntax",
                 "huge_power", "memory_bomb")
        reason = min((r for r, _ in found), key=order.index)
        details = [d for r, d in found if r == reason][:3] + [r + ": " + d for r, d in found if r != reason][:3]
        return (reason, "; ".join(details))
    if require_generator:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "generate_problem_and_solution_code":
                required = len(node.args.args) - len(node.args.defaults) + len(node.args.posonlyargs)
                kw_required = sum(d is None for d in node.args.kw_defaults)
                if required == 0 and kw_required == 0:
                    return None
                return ("no_generator", "generate_problem_and_solution_code() takes required arguments")
        return ("no_generator", "no top-level def generate_problem_and_solution_code()")
    return None


# -- the child ------------------------------------------------------------------------------------------------------
_RUNNER_BODY = r'''
import sys, json, signal, types
payload = json.loads(sys.stdin.read())
sys.stdin.close()
POLICY = payload["policy"]
MODE = payload["mode"]
TIMEOUT = float(payload["timeout"])
MAX_TEXT = int(POLICY["max_text"])
_MODS = {}
for _name in POLICY["modules"]:
    _MODS[_name] = __import__(_name)
import random, decimal, fractions, ast
def _isolate():
    # CLONE_NEWUSER | CLONE_NEWNET: no network (best effort); no ctypes handle outlives this function
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000)
    except Exception:
        pass
_isolate()
del _isolate
_out = sys.stdout
_DENY = set(POLICY["attrs"])
sys.setrecursionlimit(int(POLICY["recursion_limit"]))

def _proxy(name):
    m = _MODS[name]
    p = types.ModuleType(name)
    for k, v in list(vars(m).items()):
        if k.startswith("_") or k in _DENY or isinstance(v, types.ModuleType):
            continue
        setattr(p, k, v)
    return p

def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name not in _MODS:
        raise ImportError("import of %r is not allowed in the sandbox" % (name,))
    return _proxy(name)

class _Refused(Exception):
    pass

def _noprint(*args, **kwargs):
    return None

import builtins as _b
_SAFE = {k: getattr(_b, k) for k in POLICY["builtins"] if hasattr(_b, k)}
_SAFE["print"] = _noprint
_SAFE["__import__"] = _import

def _fresh():
    return {"__builtins__": dict(_SAFE), "__name__": "__legacy__"}

def _guarded_exec(code, g=None, l=None):
    if type(code) is not str:
        raise TypeError("exec takes a source string in the sandbox")
    bad = audit_source(code, POLICY, False)
    if bad is not None and bad[0] in ("syntax_error", "too_long"):
        raise SyntaxError("exec: %s" % bad[1])
    if bad is not None:
        raise _Refused("exec refused: %s: %s" % bad)
    ns = _fresh()
    if type(g) is dict:
        for k, v in list(g.items()):
            if k != "__builtins__":
                ns[k] = v
    loc = l if type(l) is dict else ns
    exec(compile(code, "<exec>", "exec"), ns, loc)
    if type(g) is dict and loc is ns:
        for k, v in ns.items():
            if k != "__builtins__":
                g[k] = v
_SAFE["exec"] = _guarded_exec

_DATA = payload.get("data") or {}
def _injected():
    d = {"random": _proxy("random"), "math": _proxy("math"), "json": _proxy("json")}
    for k, v in _DATA.items():
        d[k] = [dict(x) if type(x) is dict else x for x in v]
    return d

def _enc(v):
    t = type(v)
    if t is int:
        return {"int": str(v)}
    if t is float:
        if v != v or v in (float("inf"), float("-inf")):
            return None
        return {"float": repr(v)}
    if t is fractions.Fraction:
        return {"frac": "%d/%d" % (v.numerator, v.denominator)}
    if t is decimal.Decimal:
        return {"dec": str(v)} if v.is_finite() else None
    if t is str:
        return {"str": v} if len(v) <= MAX_TEXT else None
    return None

def _literals(tree):
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "round":
            for a in node.args[1:]:
                skip.add(id(a))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            skip.add(id(node.operand))
            v = node.operand.value
            if type(v) in (int, float):
                out.append(-v)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            out.append(node.value)
    res = []
    for v in out[:500]:
        try:
            res.append(float(v))
        except OverflowError:
            pass
    return res

def _values(g):
    res = []
    for k, v in g.items():
        if type(v) in (int, float, fractions.Fraction, decimal.Decimal):
            try:
                f = float(v)
            except (OverflowError, ValueError):
                continue
            if f == f and abs(f) < 1e300:
                res.append(f)
        if len(res) >= 500:
            break
    return res

class _Timeout(BaseException):
    pass
def _alarm(signum, frame):
    raise _Timeout()
signal.signal(signal.SIGALRM, _alarm)

def _task_gen(task, code_cache):
    src = payload["templates"][task["t"]]
    code = code_cache.get(task["t"])
    if code is None:
        code = code_cache[task["t"]] = compile(src, "<legacy template>", "exec")
    random.seed(task["seed"])
    g = _fresh()
    g.update(_injected())
    exec(code, g)
    fn = g.get("generate_problem_and_solution_code")
    if fn is None:
        return {"error": "bad_return", "detail": "generate_problem_and_solution_code is not defined"}
    out = fn()
    if type(out) not in (tuple, list) or len(out) != 4:
        return {"error": "bad_return", "detail": "returned %s, not a 4-tuple" % type(out).__name__}
    problem, sol, res, wocode = out
    for label, s in (("problem", problem), ("solution_code", sol), ("solution_wocode", wocode)):
        if type(s) is not str:
            return {"error": "bad_return", "detail": "%s is a %s, not a str" % (label, type(s).__name__)}
        if len(s) > MAX_TEXT:
            return {"error": "bad_return", "detail": "%s is longer than %d characters" % (label, MAX_TEXT)}
    if not problem.strip() or not sol.strip():
        return {"error": "bad_return", "detail": "empty problem or solution_code"}
    try:
        enc = _enc(res)
        text = str(res) if enc is not None else None
    except ValueError as e:
        enc, text = None, None
    if enc is None:
        return {"error": "bad_return", "detail": "result is a %s (int, float, Fraction, Decimal or str expected)"
                % type(res).__name__}
    return {"problem": problem, "code": sol, "result": enc, "text": text[:MAX_TEXT], "wocode": wocode}

def _task_run(task):
    src = task["code"]
    bad = audit_source(src, POLICY, False)
    if bad is not None:
        return {"error": "blocked", "detail": "solution_code fails the audit: %s: %s" % bad}
    tree = ast.parse(src)
    random.seed(0)
    g = _fresh()
    exec(compile(tree, "<solution_code>", "exec"), g)
    if "result" not in g:
        return {"error": "no_result", "detail": "solution_code leaves no variable `result`"}
    try:
        enc = _enc(g["result"])
    except ValueError:
        enc = None
    if enc is None:
        return {"error": "bad_result", "detail": "result is a %s" % type(g["result"]).__name__}
    return {"result": enc, "consts": _literals(tree), "values": _values(g)}

def _hook(event, args):
    if event not in ("compile", "exec", "builtins.id"):
        raise _Refused("refused in the sandbox: " + event)
sys.addaudithook(_hook)
_out.write('{"ready": true}\n')
_out.flush()

_failed = set()
_cache = {}
for i, task in enumerate(payload["tasks"]):
    grp = task.get("g")
    if grp is not None and grp in _failed:
        rec = {"error": "skipped"}
    else:
        decimal.setcontext(decimal.Context())
        try:
            signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
            rec = _task_gen(task, _cache) if MODE == "gen" else _task_run(task)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            rec = {"error": "timeout", "detail": "no answer within %gs" % TIMEOUT}
        except MemoryError:
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec = {"error": "memory", "detail": "MemoryError"}
        except RecursionError:
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec = {"error": "recursion", "detail": "RecursionError"}
        except (ImportError, _Refused) as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec = {"error": "blocked", "detail": "%s: %s" % (type(e).__name__, str(e)[:300])}
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                msg = str(e)[:300]
            except BaseException:
                msg = ""
            rec = {"error": "error", "detail": "%s: %s" % (type(e).__name__, msg)}
        if grp is not None and "error" in rec:
            _failed.add(grp)
    rec["i"] = i
    try:
        line = json.dumps(rec)
    except (TypeError, ValueError):
        line = json.dumps({"i": i, "error": "bad_return", "detail": "unserializable instance"})
    _out.write(line + "\n")
    _out.flush()
'''

_RUNNER = LIMITS + inspect.getsource(audit_source) + _RUNNER_BODY

GRACE_S = 1.0
"""Seconds past `timeout_s` the parent waits for an instance's answer before it kills the child."""
STARTUP_S = 10.0
"""Seconds a child may take to start and import MODULES (a loaded machine is slow)."""
MAX_OUTPUT = 256 * 2**20
"""Bytes of answers the parent reads from one child at most."""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _spawn(mode: str, tasks: list[dict], common: dict, *, timeout_s: float, mem_mb: int
           ) -> tuple[dict[int, dict], int | None, str | None]:
    """Run `tasks` in one child -> ({position: record}, position the child stopped at or None, why)."""
    payload = json.dumps({"mode": mode, "timeout": timeout_s, "policy": _POLICY, "tasks": tasks, **common}).encode()
    cpu = int(STARTUP_S + (timeout_s + GRACE_S) * len(tasks)) + 1
    recs: dict[int, dict] = {}
    got = 0
    with tempfile.TemporaryDirectory(prefix="tdg-legacy-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _RUNNER, str(mem_mb * 2**20), str(cpu)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={},
                                cwd=cwd, start_new_session=True, close_fds=True)
        try:
            try:
                proc.stdin.write(payload)
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            fd = proc.stdout.fileno()
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            buf, total = bytearray(), 0
            deadline = time.monotonic() + STARTUP_S + timeout_s + GRACE_S
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill(proc)
                    return recs, got, "timeout"
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    proc.wait()
                    return (recs, None, None) if got >= len(tasks) else (
                        recs, got, "killed (exit status %s)" % proc.returncode)
                total += len(chunk)
                if total > MAX_OUTPUT:
                    _kill(proc)
                    return recs, got, "memory"
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = bytes(buf[:nl]), buf[nl + 1:]
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        _kill(proc)
                        return recs, got, "killed (garbled answer)"
                    if "i" in rec:
                        recs[rec["i"]] = rec
                        got = rec["i"] + 1
                    deadline = time.monotonic() + timeout_s + GRACE_S
        finally:
            if proc.poll() is None:
                _kill(proc)
            proc.stdout.close()


def _run_children(mode: str, tasks: list[dict], common: dict, *, timeout_s: float, mem_mb: int) -> list[dict]:
    """Every task's record, in order, over as many children as it takes: when a child dies or is killed on
    task j, j gets the error and the rest of j's group ('g': its template) is skipped."""
    results: list[dict | None] = [None] * len(tasks)
    failed: set = set()
    pending = list(range(len(tasks)))
    while pending:
        todo = []
        for j in pending:
            if tasks[j].get("g") is not None and tasks[j]["g"] in failed:
                results[j] = {"error": "skipped"}
            else:
                todo.append(j)
        if not todo:
            break
        recs, stop, why = _spawn(mode, [tasks[j] for j in todo], common, timeout_s=timeout_s, mem_mb=mem_mb)
        for pos, rec in recs.items():
            results[todo[pos]] = rec
            if "error" in rec and tasks[todo[pos]].get("g") is not None:
                failed.add(tasks[todo[pos]]["g"])
        if stop is None:
            break
        j = todo[stop]
        kind = "timeout" if why == "timeout" else "memory" if why == "memory" else "killed"
        results[j] = {"error": kind, "detail": f"the child was stopped: {why}"}
        if tasks[j].get("g") is not None:
            failed.add(tasks[j]["g"])
        pending = todo[stop + 1:]
    return [r if r is not None else {"error": "skipped"} for r in results]


# -- values ------------------------------------------------------------------------------------------------------
def _decode(enc: dict):
    if "int" in enc:
        return int(enc["int"])
    if "float" in enc:
        return float(enc["float"])
    if "frac" in enc:
        return Fraction(enc["frac"])
    if "dec" in enc:
        return Fraction(enc["dec"])  # exact, as Decimal is
    return enc["str"]


def _as_number(v):
    if isinstance(v, str):
        try:
            return Fraction(v.strip().replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
    return v


def same_result(a, b, *, rel: float = 1e-9) -> bool:
    """Does a re-run `result` equal the returned one? Numbers within `rel` (at least 1e-9 absolute, as
    sandbox.same_answer); strings exactly, or as numbers when both read as numbers ('12.50' == 12.5)."""
    if isinstance(a, str) and isinstance(b, str) and a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is None or y is None:
        return False
    if isinstance(x, float) or isinstance(y, float):
        try:
            return abs(float(x) - float(y)) <= rel * max(1.0, abs(float(x)), abs(float(y)))
        except OverflowError:
            return False
    return Fraction(x) == Fraction(y)


# -- text/code agreement -----------------------------------------------------------------------------------------
_WORDS = {"zero": (0,), "one": (1,), "two": (2,), "three": (3,), "four": (4,), "five": (5,), "six": (6,),
          "seven": (7,), "eight": (8,), "nine": (9,), "ten": (10,), "eleven": (11,), "twelve": (12,),
          "thirteen": (13,), "fourteen": (14,), "fifteen": (15,), "sixteen": (16,), "seventeen": (17,),
          "eighteen": (18,), "nineteen": (19,), "twenty": (20,), "thirty": (30,), "forty": (40,), "fifty": (50,),
          "sixty": (60,), "seventy": (70,), "eighty": (80,), "ninety": (90,), "hundred": (100,),
          "thousand": (1000,), "half": (0.5, 2), "halves": (0.5, 2), "third": (1 / 3, 3), "thirds": (1 / 3, 3),
          "quarter": (0.25, 4), "quarters": (0.25, 4), "fourth": (0.25, 4), "fifth": (0.2, 5),
          "twice": (2,), "double": (2,), "doubled": (2,), "triple": (3,), "tripled": (3,), "thrice": (3,),
          "dozen": (12,), "dozens": (12,), "pair": (2,), "pairs": (2,)}
_MENTION = re.compile(r"(?<![\w.])(\$?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:\s*/\s*(\d+)|:(\d{2}))?(\s*%|\s*percent)?"
                      r"(st|nd|rd|th)?(?![\d])", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+", re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    """A quantity named in a problem text: its surface form, the values it may stand for, the decimals shown."""
    text: str
    values: tuple[float, ...]
    places: int = 0


def text_mentions(text: str) -> tuple[list[Mention], list[Mention]]:
    """(digit mentions, word mentions) of a problem text.

        digits, words = text_mentions("Ava buys 3/4 of 1,200 pens at a 20% discount, twice.")
        [(m.text, m.values) for m in digits]
        -> [('3/4', (0.75, 3.0, 4.0)), ('1,200', (1200.0,)), ('20%', (20.0, 0.2, 0.8, 1.2, 80.0, 120.0))]
        [(m.text, m.values) for m in words] -> [('twice', (2.0,))]
    """
    digits = []
    for m in _MENTION.finditer(text):
        dollar, whole, frac, denom, minutes, pct, ordinal = m.groups()
        if ordinal:
            continue
        x = float(whole.replace(",", "") + ("." + frac if frac else ""))
        places = len(frac) if frac else 0
        if denom is not None:
            d = float(denom)
            values = ((x / d,) if d else ()) + (x, d)
        elif minutes is not None:
            mm = float(minutes)
            values = (x, mm, x * 60 + mm, x + mm / 60)
        elif pct:
            values = (x, x / 100, 1 - x / 100, 1 + x / 100, 100 - x, 100 + x)
        else:
            values = (x,)
        digits.append(Mention(m.group(0).strip(), tuple(values), places))
    words = [Mention(w, tuple(float(v) for v in _WORDS[w.lower()])) for w in _WORD.findall(text)
             if w.lower() in _WORDS]
    return digits, words


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


def text_code_agreement(problem: str, consts: list[float], values: list[float]) -> str | None:
    """None when the problem text and solution_code name the same quantities, else what disagrees (rules (A)
    and (B) of the module docstring). `consts`: solution_code's literals; `values`: its numeric variables."""
    digits, words = text_mentions(problem)
    named = [v for m in digits + words for v in m.values]
    unnamed = []
    for c in consts:
        if any(_close(c, a) for a in ALLOWED_CONSTANTS) or any(_close(c, v) for v in named):
            continue
        if _fmt(c) not in unnamed:
            unnamed.append(_fmt(c))
    unused = []
    for m in digits:
        if any(_close(v, c) for v in m.values for c in consts):
            continue
        tol = 0.5 * 10.0 ** -m.places + 1e-9 if m.places else None
        if any(_close(v, c) or (tol is not None and abs(v - c) <= tol) for v in m.values for c in values):
            continue
        if m.text not in unused:
            unused.append(m.text)
    if not unnamed and not unused:
        return None
    parts = []
    if unnamed:
        parts.append(f"solution_code uses {', '.join(unnamed)}, which the problem text never names")
    if unused:
        parts.append(f"the problem names {', '.join(unused)}, which solution_code never uses or computes")
    return "; ".join(parts)


# -- templates -----------------------------------------------------------------------------------------------------
def is_legacy(raw) -> bool:
    """A TemplateMath template: a dict whose str field `template` defines generate_problem_and_solution_code
    (checked by text, without running or parsing it)."""
    return (isinstance(raw, dict) and isinstance(raw.get("template"), str)
            and re.search(r"^\s*def\s+" + GENERATOR + r"\s*\(", raw["template"], re.MULTILINE) is not None)


def legacy_template_id(raw: dict) -> str:
    """The file's own id (`template_id`, `idx` or `id`) as a string, else 'legacy-' + a hash of the source."""
    for key in ("template_id", "idx", "id"):
        v = raw.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            return str(v)
    return "legacy-" + stable_hash(raw.get("template", ""), length=12)


def instance_seed(seed: int, template_id: str, problem_id: int) -> int:
    """The `random.seed` of one instance: blake2b('legacy:{seed}:{template_id}:{problem_id}'), 8 bytes."""
    key = f"legacy:{seed}:{template_id}:{problem_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


_DATA_CACHE: dict | None = None


def legacy_data() -> dict[str, list]:
    """The globals TemplateMath's templates expect, from our word lists: first_names, last_names, items,
    places (str lists) and us_counties ([{'CountyName': ..., 'StateName': ...}])."""
    global _DATA_CACHE
    if _DATA_CACHE is None:
        from engine.methods.tdg.template import word_lists
        w = word_lists()
        _DATA_CACHE = {
            "first_names": list(w.get("names", ())),
            "last_names": ["Garcia", "Nguyen", "Okafor", "Smith", "Kowalski", "Haddad", "Tanaka", "Moreau",
                           "Rossi", "Silva", "Novak", "Johansson", "Patel", "Murphy", "Cohen", "Ibrahim"],
            "items": list(w.get("items", ())),
            "places": list(w.get("places", ())),
            "us_counties": [{"CountyName": c, "StateName": s} for c, s in (
                ("Travis County", "Texas"), ("King County", "Washington"), ("Dane County", "Wisconsin"),
                ("Marin County", "California"), ("Story County", "Iowa"), ("Wake County", "North Carolina"),
                ("Polk County", "Oregon"), ("Essex County", "Vermont"))],
        }
    return _DATA_CACHE


@dataclass
class _Instance:
    problem_id: int
    problem: str = ""
    code: str = ""
    result: object = None
    text: str = ""
    wocode: str = ""
    error: str | None = None      # a LEGACY_REASONS code
    detail: str = ""


_GEN_ERRORS = {"timeout": "timeout", "memory": "memory", "recursion": "recursion", "killed": "killed",
               "blocked": "blocked", "bad_return": "bad_return", "error": "instance_error", "skipped": "skipped"}


def _generate(sources: list[str], jobs: list[tuple[int, str, int, int]], *, timeout_s: float, mem_mb: int
              ) -> list[_Instance]:
    """jobs: (source index, template_id, seed, problem_id) -> instances, one generation child (or more when
    one dies). Sources must have passed audit_source."""
    tasks = [{"t": t, "g": t, "seed": instance_seed(seed, tid, pid)} for t, tid, seed, pid in jobs]
    recs = _run_children("gen", tasks, {"templates": sources, "data": legacy_data()}, timeout_s=timeout_s,
                         mem_mb=mem_mb)
    out = []
    for (_, _, _, pid), rec in zip(jobs, recs):
        if "error" in rec:
            out.append(_Instance(pid, error=_GEN_ERRORS.get(rec["error"], "instance_error"),
                                 detail=rec.get("detail", "")))
        else:
            out.append(_Instance(pid, rec["problem"], rec["code"], _decode(rec["result"]), rec["text"],
                                 rec["wocode"]))
    return out


@dataclass
class _Rerun:
    ok: bool
    result: object = None
    consts: list = field(default_factory=list)
    values: list = field(default_factory=list)
    detail: str = ""


def _rerun(codes: list[str], *, timeout_s: float, mem_mb: int) -> list[_Rerun]:
    """Each solution_code on its own (fresh globals, a child that runs no template code)."""
    recs = _run_children("run", [{"code": c} for c in codes], {}, timeout_s=timeout_s, mem_mb=mem_mb)
    return [_Rerun(False, detail=f"{r['error']}: {r.get('detail', '')}") if "error" in r
            else _Rerun(True, _decode(r["result"]), r["consts"], r["values"]) for r in recs]


def _check(inst: _Instance, rerun: _Rerun, text_check: bool) -> tuple[str, str] | None:
    """(reason, details) when an instance's re-run or its text disagrees, else None."""
    if not rerun.ok:
        return "code_error", f"problem {inst.problem_id}: solution_code re-run failed: {rerun.detail}"
    if not same_result(rerun.result, inst.result):
        return "code_mismatch", (f"problem {inst.problem_id}: solution_code leaves result={rerun.result!r}, "
                                 f"the template returned {inst.result!r}")
    if text_check:
        why = text_code_agreement(inst.problem, rerun.consts, rerun.values)
        if why:
            return "text_code_mismatch", f"problem {inst.problem_id}: {why}; problem: {inst.problem[:300]!r}"
    return None


def verify_legacy(raws: list[dict], *, k: int = 8, seed: int = 0, timeout_s: float = 2.0, mem_mb: int = 512,
                  text_check: bool = True) -> list[Verdict]:
    """Verify legacy templates; verdicts in input order (`Verdict.raw` is the dict as given, `stats` has k,
    gen_s and rerun_s, the seconds of the two children shared by every template of the call).

    k           instances per template (problem_id 0..k-1), plus problem 0 again for the determinism check
    seed        the run seed of the instances (with template_id and problem_id)
    timeout_s   seconds one instance (or one solution_code) may run
    mem_mb      address-space limit of each child
    text_check  apply the text/code agreement rule
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    verdicts: list[Verdict | None] = [None] * len(raws)
    sources, owners, tids = [], [], []
    for i, raw in enumerate(raws):
        if not is_legacy(raw):
            verdicts[i] = Verdict(False, "not_legacy", "no str field 'template' defining "
                                  f"{GENERATOR}()", None, raw)
            continue
        tid = legacy_template_id(raw)
        bad = audit_source(raw["template"], _POLICY)
        if bad is not None:
            verdicts[i] = Verdict(False, bad[0], bad[1], tid, raw, stats={"k": k, "stage": "audit"})
            continue
        sources.append(raw["template"])
        owners.append(i)
        tids.append(tid)
    if not sources:
        return verdicts  # type: ignore[return-value]

    jobs = [(t, tids[t], seed, pid) for t in range(len(sources)) for pid in [*range(k), 0]]
    t0 = time.perf_counter()
    insts = _generate(sources, jobs, timeout_s=timeout_s, mem_mb=mem_mb)
    gen_s = time.perf_counter() - t0
    per: list[list[_Instance]] = [insts[t * (k + 1):(t + 1) * (k + 1)] for t in range(len(sources))]
    survivors = []
    for t, group in enumerate(per):
        i, raw = owners[t], raws[owners[t]]
        stats = {"k": k, "gen_s": round(gen_s, 4)}
        err = next((x for x in group if x.error and x.error != "skipped"), None)
        if err is not None:
            verdicts[i] = Verdict(False, err.error, f"problem {err.problem_id}: {err.detail}", tids[t], raw,
                                  stats={**stats, "stage": "instances"})
            continue
        first, again = group[0], group[-1]
        if (first.problem, first.code, first.text, first.wocode) != (again.problem, again.code, again.text,
                                                                     again.wocode):
            verdicts[i] = Verdict(False, "nondeterministic", "problem 0 came out different twice with the same "
                                  f"seed: {first.problem[:150]!r} vs {again.problem[:150]!r}", tids[t], raw,
                                  stats={**stats, "stage": "instances"})
            continue
        survivors.append(t)

    t0 = time.perf_counter()
    reruns = _rerun([x.code for t in survivors for x in per[t][:k]], timeout_s=timeout_s, mem_mb=mem_mb)
    rerun_s = time.perf_counter() - t0
    for n, t in enumerate(survivors):
        i, raw = owners[t], raws[owners[t]]
        stats = {"k": k, "gen_s": round(gen_s, 4), "rerun_s": round(rerun_s, 4)}
        failure = None
        for inst, rr in zip(per[t][:k], reruns[n * k:(n + 1) * k]):
            failure = _check(inst, rr, text_check)
            if failure:
                break
        if failure:
            verdicts[i] = Verdict(False, failure[0], failure[1], tids[t], raw, stats={**stats, "stage": "rerun"})
        else:
            verdicts[i] = Verdict(True, None, "", tids[t], raw, stats=stats)
    return verdicts  # type: ignore[return-value]


class LegacyError(ValueError):
    """A legacy template that may not be run at all (not legacy, or it fails the static audit)."""


class LegacyInstances(Iterator[dict]):
    """The rows of one legacy template, produced lazily in batches (one generation child and one re-run child
    per batch); `stats` is updated as they come and final once the iterator is exhausted:

        {"template_id": "7", "requested": 100, "attempted": 101, "produced": 100,
         "dropped": {"code_mismatch": 1}, "aborted": None, "gen_s": 0.41, "rerun_s": 0.12}

    A row: {"problem", "solution_code", "result" (str(result), as TemplateGSM), "solution_wocode", "source",
    "template_id", "problem_id" (int), "seed", "sandbox_verified" (its solution_code, re-run on its own, gave
    its result), "text_checked" (it passed the text/code agreement rule)}.
    """

    def __init__(self, raw: dict, n: int, *, seed: int, template_id: str, batch: int, extra: int,
                 timeout_s: float, mem_mb: int, check: bool, text_check: bool):
        self.raw, self.n, self.seed, self.template_id = raw, n, seed, template_id
        self.batch, self.extra, self.timeout_s, self.mem_mb = batch, extra, timeout_s, mem_mb
        self.check, self.text_check = check, text_check and check
        self.stats = {"template_id": template_id, "requested": n, "attempted": 0, "produced": 0, "dropped": {},
                      "aborted": None, "gen_s": 0.0, "rerun_s": 0.0}
        self._rows = self._produce()

    def __next__(self) -> dict:
        return next(self._rows)

    def _drop(self, reason: str) -> None:
        self.stats["dropped"][reason] = self.stats["dropped"].get(reason, 0) + 1

    def _produce(self) -> Iterator[dict]:
        src, st = self.raw["template"], self.stats
        next_pid, limit, stops = 0, self.n + self.extra, 0
        while st["produced"] < self.n and next_pid < limit:
            want = min(self.batch, self.n - st["produced"], limit - next_pid)
            pids = list(range(next_pid, next_pid + want))
            next_pid += want
            st["attempted"] += want
            t0 = time.perf_counter()
            # each problem its own group: one failing instance does not skip the rest of the batch
            tasks = [{"t": 0, "g": p, "seed": instance_seed(self.seed, self.template_id, p)} for p in pids]
            recs = _run_children("gen", tasks, {"templates": [src], "data": legacy_data()},
                                 timeout_s=self.timeout_s, mem_mb=self.mem_mb)
            st["gen_s"] = round(st["gen_s"] + time.perf_counter() - t0, 4)
            insts = []
            for pid, rec in zip(pids, recs):
                if "error" in rec:
                    reason = _GEN_ERRORS.get(rec["error"], "instance_error")
                    self._drop(reason)
                    stops += reason in ("timeout", "killed", "memory")
                else:
                    insts.append(_Instance(pid, rec["problem"], rec["code"], _decode(rec["result"]), rec["text"],
                                           rec["wocode"]))
            reruns: list[_Rerun | None] = [None] * len(insts)
            if self.check and insts:
                t0 = time.perf_counter()
                reruns = _rerun([x.code for x in insts], timeout_s=self.timeout_s, mem_mb=self.mem_mb)
                st["rerun_s"] = round(st["rerun_s"] + time.perf_counter() - t0, 4)
            for inst, rr in zip(insts, reruns):
                if st["produced"] >= self.n:
                    break
                if rr is not None:
                    bad = _check(inst, rr, self.text_check)
                    if bad:
                        self._drop(bad[0])
                        continue
                st["produced"] += 1
                yield {"problem": inst.problem, "solution_code": inst.code, "result": inst.text,
                       "solution_wocode": inst.wocode, "source": str(self.raw.get("source") or "legacy"),
                       "template_id": self.template_id, "problem_id": inst.problem_id, "seed": self.seed,
                       "sandbox_verified": rr is not None, "text_checked": rr is not None and self.text_check}
            if stops >= 3:
                st["aborted"] = f"{stops} instances timed out or killed their child"
                return


def instantiate_legacy(raw: dict, n: int, *, seed: int = 0, template_id: str | None = None, batch: int = 500,
                       extra: int | None = None, timeout_s: float = 2.0, mem_mb: int = 512, check: bool = True,
                       text_check: bool = True) -> LegacyInstances:
    """n rows of a legacy template (verify it first with verify_legacy), as a lazy iterator whose `stats`
    counts what was dropped and why (see LegacyInstances).

    Problems 0..n-1 are generated first; a row that fails (its instance raised or timed out, its solution_code
    re-run disagrees, its text and code disagree) is dropped, counted in stats['dropped'], and replaced by the
    next problem_id, up to `extra` more (default max(8, n // 10)); so fewer than n rows come out only when more
    than `extra` fail, or after 3 instances that timed out or killed their child (stats['aborted']).

    seed         run seed (with template_id and problem_id it determines each instance)
    template_id  defaults to legacy_template_id(raw)
    batch        instances per child
    check        re-run each row's solution_code on its own (the row is dropped when it disagrees)
    text_check   apply the text/code agreement rule to each row (needs check)
    Raises LegacyError when raw is not a legacy template or fails the static audit: it is never run then.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not is_legacy(raw):
        raise LegacyError(f"not a legacy template: no str field 'template' defining {GENERATOR}()")
    bad = audit_source(raw["template"], _POLICY)
    if bad is not None:
        raise LegacyError(f"{bad[0]}: {bad[1]}")
    tid = template_id or legacy_template_id(raw)
    return LegacyInstances(raw, n, seed=seed, template_id=tid, batch=batch,
                           extra=max(8, n // 10) if extra is None else extra, timeout_s=timeout_s, mem_mb=mem_mb,
                           check=check, text_check=text_check)
