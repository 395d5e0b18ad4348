"""Verify a template before accepting it: twice exact (sympy and the compiled code) and once in a sandbox.

    verdicts = verify_templates([raw1, raw2], k=8)     # batched: one sandbox process for all of them
    v = verdicts[0]; v.accepted, v.reason, v.details, v.stats

Checks, in order; the first failure is the rejection `reason`:

    schema                     not valid against grammars/tdg/meta_template.schema.json / the pydantic model
    parse_error                an expression or placeholder does not parse (or braces do not pair)
    unsafe_expression          an expression outside the whitelist (engine.methods.tdg.expr)
    unknown_name, type_error   a name that is not declared; a condition used as a number or vice versa
    answer_var_not_in_text     the answer depends on a variable the problem text never shows
    unused_variable            a variable (shown or not) that influences neither the answer nor a constraint,
                               or a word variable the text never uses
    unsatisfiable_constraints  some instance needed more than `max_draws` draws to satisfy the constraints
    eval_error                 an instance that satisfies the constraints has no exact answer (x/0, sqrt(2))
    answer_type                an answer that is not of the declared type (integer, decimal(places), fraction)
    negative_answer            an answer below zero (word problems ask for amounts)
    compile_mismatch           the compiled fast path disagrees with sympy (a bug of ours, never expected)
    sandbox_error              the rendered solution_code raised or was killed in the sandbox
    code_mismatch              the rendered solution_code returned a different answer

"Influences" is decided on the sympy form of the answer with every step inlined: a variable influences the
answer when it is among the free symbols after sympy's automatic simplification (so `a - a + b` does not
depend on a). The K instances are drawn from a generator seeded by (seed, template_id): reproducible.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import jsonschema
import sympy

from engine.request import stable_hash
import engine.methods.tdg.expr as X
from engine.methods.tdg.compile import CompiledTemplate, compile_template
from engine.methods.tdg.sandbox import run_solutions, same_answer
from engine.methods.tdg.template import SCHEMA_PATH, CheckedTemplate, TemplateError, check_template, template_id_of

REASONS = ("schema", "parse_error", "unsafe_expression", "unknown_name", "type_error", "answer_var_not_in_text",
           "unused_variable", "unsatisfiable_constraints", "eval_error", "answer_type", "negative_answer",
           "compile_mismatch", "sandbox_error", "code_mismatch")
"""Every rejection reason, in the order the checks run."""


@dataclass
class Verdict:
    """The outcome of verifying one template."""
    accepted: bool
    reason: str | None            # one of REASONS when rejected
    details: str                  # human-readable: what failed and where
    template_id: str | None
    raw: object                   # the template as given
    checked: CheckedTemplate | None = None
    compiled: CompiledTemplate | None = None
    stats: dict = field(default_factory=dict)  # k, draws, satisfy_rate, sandbox_s, ...

    def to_row(self) -> dict:
        """A store row: the template JSON, its id, and the verdict (for accepted and rejected templates)."""
        return {"template_id": self.template_id, "template": json.dumps(self.raw, sort_keys=True)
                if not isinstance(self.raw, str) else self.raw, "accepted": self.accepted, "reason": self.reason,
                "details": self.details, "source": self.checked.source if self.checked else None,
                "skill": self.checked.template.skill if self.checked else None, **{f"stat_{k}": v for k, v in
                                                                                   self.stats.items()}}


@lru_cache(maxsize=1)
def _schema_validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _reject(raw, reason: str, details: str, tid=None, **kw) -> Verdict:
    return Verdict(False, reason, details, tid, raw, **kw)


@dataclass
class _Pending:
    verdict: Verdict
    codes: list[str]
    answers: list[Fraction]


def _exact_instance(ct: CheckedTemplate, values: dict) -> tuple[bool, Fraction | None]:
    """(constraints hold, exact answer) with sympy; the answer is None when constraints fail."""
    for c in ct.constraints:
        if not X.evaluate_exact(c, values):
            return False, None
    env = dict(values)
    for s in ct.steps:
        env[s.name] = X.evaluate_exact(s.expr, env)
    a = X.evaluate_exact(ct.answer, env)
    return True, Fraction(int(a.p), int(a.q))


def _prepare(raw, *, k: int, seed: int, max_draws: int, source: str) -> Verdict | _Pending:
    obj = raw
    if isinstance(raw, str):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            return _reject(raw, "parse_error", f"not JSON: {e.msg}")
    err = jsonschema.exceptions.best_match(_schema_validator().iter_errors(obj))
    if err is not None:
        where = "/".join(map(str, err.absolute_path)) or "root"
        return _reject(obj, "schema", f"{where}: {err.message[:200]}")
    tid = template_id_of(obj)
    try:
        ct = check_template(obj, source=source)
    except TemplateError as e:
        return _reject(obj, e.code, e.detail, tid)

    # -- the text and the answer must agree on which variables matter ------------------------------------
    env: dict[str, sympy.Basic] = {}
    try:
        for s in ct.steps:
            env[s.name] = X.to_sympy(s.expr, env)
        answer_deps = {str(x) for x in X.to_sympy(ct.answer, env).free_symbols}
    except (ArithmeticError, TypeError, ValueError) as e:  # e.g. "a % 0": sympy raises on the symbol itself
        return _reject(obj, "eval_error", f"the steps cannot be analysed: {type(e).__name__}: {e}", tid, checked=ct)
    constraint_deps = set().union(*(c.names for c in ct.constraints)) if ct.constraints else set()
    shown = ct.problem_names()
    missing = sorted(answer_deps - shown)
    if missing:
        return _reject(obj, "answer_var_not_in_text", f"the answer uses {missing} but the problem text never "
                                                      "shows them", tid, checked=ct)
    for v in ct.numeric:
        if v.name not in answer_deps and v.name not in constraint_deps:
            where = "shown in the text" if v.name in shown else "declared"
            return _reject(obj, "unused_variable", f"{v.name!r} is {where} but influences neither the answer "
                                                   "nor a constraint", tid, checked=ct)
    for w in ct.words:
        if w.name not in shown:
            return _reject(obj, "unused_variable", f"word variable {w.name!r} is not used in the problem text",
                           tid, checked=ct)

    compiled = compile_template(ct)
    # -- K instances, exact with sympy, cross-checked against the compiled code -------------------------------
    rng = random.Random(stable_hash(["tdg-verify", seed, tid]))
    codes, answers, draws = [], [], 0
    for i in range(k):
        for attempt in range(max_draws):
            draws += 1
            values = {v.name: v.value(rng.randrange(v.count)) for v in ct.numeric}
            values.update({w.name: rng.choice(w.words) for w in ct.words})
            try:
                ok, exact = _exact_instance(ct, values)
            except (X.EvalError, ZeroDivisionError) as e:
                try:
                    ok = all(X.evaluate_exact(c, values) for c in ct.constraints)
                except (X.EvalError, ZeroDivisionError):
                    ok = False  # a constraint without a value counts as not satisfied
                if ok:
                    return _reject(obj, "eval_error", f"instance {values}: {e}", tid, checked=ct)
                continue
            if not ok:
                continue
            break
        else:
            return _reject(obj, "unsatisfiable_constraints", f"instance {i}: no values satisfy the constraints "
                                                             f"in {max_draws} draws", tid, checked=ct,
                           stats={"draws": draws})
        kind, places = ct.template.answer.type, ct.template.answer.places
        if kind == "integer" and exact.denominator != 1:
            return _reject(obj, "answer_type", f"answer {exact} is not an integer for {values}", tid, checked=ct)
        if kind == "decimal" and (exact * 10**places).denominator != 1:
            return _reject(obj, "answer_type", f"answer {exact} has more than {places} decimal places for "
                                               f"{values}", tid, checked=ct)
        if exact < 0:
            return _reject(obj, "negative_answer", f"answer {exact} < 0 for {values}", tid, checked=ct)
        try:
            c_ok, c_ans, _, (_, _, code) = compiled.evaluate(values)
        except (ArithmeticError, ValueError, TypeError) as e:
            return _reject(obj, "compile_mismatch", f"compiled code failed on {values}: {e}", tid, checked=ct)
        if not c_ok or Fraction(c_ans) != exact:
            return _reject(obj, "compile_mismatch", f"compiled {c_ans} != sympy {exact} for {values}", tid,
                           checked=ct)
        codes.append(code)
        answers.append(exact)
    v = Verdict(True, None, "", tid, obj, checked=ct, compiled=compiled,
                stats={"k": k, "draws": draws, "satisfy_rate": round(k / draws, 4)})
    return _Pending(v, codes, answers)


def verify_templates(raws: list, *, k: int = 8, seed: int = 0, max_draws: int = 200, sandbox: bool = True,
                     source: str = "model", timeout_s: float = 1.0) -> list[Verdict]:
    """Verify each template (dict, JSON string or Template); results in input order.

    k          instances sampled per template
    seed       seeds the instance draws (with each template's id)
    max_draws  draws allowed per instance before the constraints count as unsatisfiable
    sandbox    run each instance's solution_code in the sandbox (one child process for the whole batch)
    source     'model' or 'seed', carried into the checked template and the rows
    """
    prepared = [_prepare(r, k=k, seed=seed, max_draws=max_draws, source=source) for r in raws]
    pending = [p for p in prepared if isinstance(p, _Pending)]
    if sandbox and pending:
        t0 = time.perf_counter()
        results = run_solutions([c for p in pending for c in p.codes], timeout_s=timeout_s)
        spent = time.perf_counter() - t0
        pos = 0
        for p in pending:
            for code, exact in zip(p.codes, p.answers):
                r = results[pos]
                pos += 1
                if p.verdict.accepted and not r.ok:
                    p.verdict.accepted, p.verdict.reason = False, "sandbox_error"
                    p.verdict.details = f"solution_code failed: {r.error}"
                elif p.verdict.accepted and not same_answer(r.value, exact):
                    p.verdict.accepted, p.verdict.reason = False, "code_mismatch"
                    p.verdict.details = f"solution_code returned {r.value!r}, exact answer is {exact}"
            p.verdict.stats["sandbox_s"] = round(spent / len(pending), 4)
            if not p.verdict.accepted:
                p.verdict.compiled = None
    for p in pending:
        p.verdict.stats["sandbox"] = sandbox
    return [p.verdict if isinstance(p, _Pending) else p for p in prepared]


def verify_template(raw, **kw) -> Verdict:
    """Verify one template; see verify_templates for the keyword arguments."""
    return verify_templates([raw], **kw)[0]
