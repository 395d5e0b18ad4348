"""Instantiation: deterministic across runs and worker counts; answers equal sympy's exact values."""
import json

import pytest

from engine.methods.tdg.compile import fmt_answer
from engine.methods.tdg.instantiate import TemplateSpec, instance_key, instantiate, make_row
from engine.methods.tdg.template import DATA_DIR, check_template
from engine.methods.tdg.compile import compile_template
from engine.methods.tdg.verify import _exact_instance
from engine.pipeline.stages import Rows

SEEDS = [json.loads(l) for l in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines() if l.strip()]
FIELDS = {"problem", "solution_code", "result", "solution_wocode", "source", "template_id", "problem_id",
          "variables", "verified", "sandbox_verified"}


@pytest.fixture(scope="module")
def specs():
    return [TemplateSpec(r, "seed", {"verified": True, "sandbox": True}) for r in SEEDS[:6]]


def test_rows_have_templategsm_fields(specs):
    rows = list(instantiate(specs, n_per_template=3, seed=1, workers=1))
    assert len(rows) == 18
    assert FIELDS <= set(rows[0])
    assert [r["problem_id"] for r in rows[:3]] == [0, 1, 2]
    assert all("{" not in r["problem"] for r in rows)


def test_deterministic_across_runs_and_workers(specs):
    one = list(instantiate(specs, n_per_template=40, seed=7, workers=1, chunk=16))
    again = list(instantiate(specs, n_per_template=40, seed=7, workers=1, chunk=40))
    two = list(instantiate(specs, n_per_template=40, seed=7, workers=2, chunk=16))
    assert one == again == two
    other = list(instantiate(specs, n_per_template=40, seed=8, workers=1))
    assert other != one


def test_instance_key_is_stable():
    assert instance_key(0, "tdg-abc", 3) == b"0:tdg-abc:3"


def test_answers_match_sympy():
    for raw in SEEDS:
        ct = check_template(raw, source="seed")
        c = compile_template(ct)
        for pid in range(30):
            row = make_row(c, 3, pid)
            variables = json.loads(row["variables"])
            values = {}
            for v in ct.numeric:
                values[v.name] = next(v.value(i) for i in range(v.count) if _fmt_var(v, v.value(i)) == variables[v.name])
            for w in ct.words:
                values[w.name] = variables[w.name]
            ok, exact = _exact_instance(ct, values)
            assert ok
            assert row["result"] == fmt_answer(exact, ct.template.answer.type), (raw["skill"], values)


def _fmt_var(v, x):
    from engine.methods.tdg.compile import fmt_fixed, fmt_num
    return fmt_fixed(x, v.places) if v.places else fmt_num(x)


# -- the method end to end with a scripted backend (no model): templates stage -> problems stage ------------------
class _ScriptedBackend:
    """Answers template requests from a script: a valid template, a bad one, a cut-off one, cycling."""
    name = "scripted"

    def __init__(self, outputs):
        self.outputs = outputs

    def preflight(self, requests):
        pass

    def identity(self):
        return {"backend": "scripted"}

    def generate(self, requests):
        from engine.request import Result
        for i, r in enumerate(x for x in requests if x is not None):
            text, finish = self.outputs[i % len(self.outputs)]
            valid, parsed, reason = r.constraint.check(text, finish)
            yield Result(key=r.key, text=text, parsed=parsed, prompt_tokens=10, output_tokens=20,
                         finish_reason=finish, valid=valid, reason=reason)


def _no_engine():
    raise AssertionError("a complete run started an engine")


def test_method_end_to_end(tmp_path):
    """Seed and model templates are verified, each accepted one is instantiated; a resume asks nothing."""
    from engine.methods import Context
    from engine.methods import tdg
    from engine.pipeline.core import Executor
    from engine.store import RunStore
    good = dict(SEEDS[1], skill="speed")  # a valid template (distinct id from the seed: new skill)
    bad = dict(SEEDS[1], steps=[{"name": "dist", "expr": "speed * 3", "text": "{dist}"}], skill="bad")
    outputs = [(json.dumps(good), "stop"), (json.dumps(bad), "stop"), ('{"skill": "x", "vari', "length")]
    config = tdg.Config(topics=["speed", "fractions", "money"], templates_per_topic=1, problems_per_template=5,
                        verify_instances=4, few_shot=1, writing="one_request")  # scripted: whole templates
    store = RunStore.open(tmp_path / "run", {"method": "tdg"})
    pipeline = tdg.pipeline(config, Context(out=store.out, progress=False))
    assert pipeline.publish.stage == "problems"
    Executor(pipeline, store, {"main": lambda: _ScriptedBackend(outputs)}, progress=False).run()
    templates, seeds = store.rows("templates"), store.rows("seed_templates")
    assert {t["source"] for t in templates} == {"model"} and len(templates) == 1
    assert {t["source"] for t in seeds} == {"seed"} and len(seeds) == len(SEEDS)
    reasons = sorted(r["reason"] for r in store.rejects("templates"))
    assert reasons == ["truncated", "unused_variable"]
    problems = store.rows("problems")
    assert len(problems) == 5 * (len(SEEDS) + 1)
    assert FIELDS <= set(problems[0])
    # resume: nothing new is generated or added, and no engine starts
    Executor(pipeline, store, {"main": _no_engine}, progress=False).run()
    assert len(store.rows("problems")) == len(problems)
    store.close()


def test_every_row_checked_twice_in_the_sandbox():
    """A row whose answer disagrees with what its own solution_code returns in the sandbox is rejected."""
    from engine.methods import tdg

    config = tdg.Config(topics=[], problems_per_template=3)
    specs = [tdg.template_spec(row) for row, reason in tdg.seed_template_rows(config) if reason is None][:2]
    rows = [dict(r, key=f"k{i}") for i, r in enumerate(instantiate(specs, n_per_template=3, seed=0, workers=1))]
    rows[1]["result"] = str(int(float(rows[1]["result"])) + 7)  # an answer its code does not compute
    checked = list(tdg.checked_rows(config, rows))
    assert [reason for _, reason in checked] == [None, "row_code_mismatch"] + [None] * (len(rows) - 2)
    assert all(row["row_code_verified"] for row, reason in checked if reason is None)
    assert checked[1][0]["key"] == "k1"


def test_repeated_draws_are_drawn_again_and_counted():
    """A draw whose variable values an earlier instance had is not a row: the next id is drawn instead. A
    template with 6 possible instances asked for 10 gives its 6, and every other id tried is counted as a
    repeat: in the rows (redrawn_before) or, after the last row, in one 'repeats_exhausted' reject."""
    from engine.methods import tdg

    raw = {"skill": "eggs", "variables": [{"name": "a", "type": "integer", "min": 2, "max": 4, "step": 1},
                                          {"name": "b", "type": "integer", "min": 1, "max": 2, "step": 1}],
           "constraints": [], "problem": "A box holds {a} rows of {b} eggs. How many eggs are in the box?",
           "steps": [{"name": "total", "expr": "a * b", "text": "{a} * {b} = {total} eggs."}],
           "answer": {"expr": "total", "type": "integer", "places": 0}}
    template_id = check_template(raw, source="file").template_id
    config = tdg.Config(topics=[], problems_per_template=10)
    items = list(tdg.problem_rows(config)({"template": json.dumps(raw), "template_id": template_id,
                                           "source": "file", "stat_sandbox": True}))
    assert isinstance(items[0], Rows)  # the checked rows come a batch at a time
    out = [pair for item in items
           for pair in (zip(item.rows, item.reasons) if isinstance(item, Rows) else [item])]
    rows = [row for row, reason in out if reason is None]
    rejects = [row for row, reason in out if reason == "repeats_exhausted"]
    assert len(rows) == 6 and len({r["variables"] for r in rows}) == 6 and len(out) == 7
    assert all(r["row_code_verified"] for r in rows)
    tried = 2 * 10 + 100  # the id limit: every id gives a valid draw here (no constraints)
    assert len(rejects) == 1 and rejects[0]["template_id"] == template_id
    assert sum(r["redrawn_before"] for r in rows) + rejects[0]["redrawn_before"] == tried - 6


@pytest.mark.parametrize("seed", [0, 7, -3, 2**40])
def test_problem_keys_are_the_stable_hash_of_seed_template_and_id(seed):
    """problem_key builds the JSON once per template: the keys must be stable_hash's, or a resumed run would
    redo (and duplicate) every row committed before."""
    from engine.methods import tdg
    from engine.request import stable_hash
    key = tdg.problem_key(seed, "tdg-0123456789ab")
    for problem_id in (0, 1, 17, 999, 10**7, 2**63):
        assert key(problem_id) == stable_hash(["tdg-problem", seed, "tdg-0123456789ab", problem_id])
