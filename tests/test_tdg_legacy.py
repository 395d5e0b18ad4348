"""Legacy TemplateMath templates: good ones verify and instantiate reproducibly, text/code mismatches and wrong
results are rejected with their reason, and every hostile kind is rejected within a bounded time without
harming the host. No template code runs in this process: only engine.methods.tdg.legacy's children run it."""
import json
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from engine.methods.tdg.legacy import (LEGACY_REASONS, LegacyError, _POLICY, _generate, _rerun, audit_source,
                                       instantiate_legacy, is_legacy, legacy_template_id, same_result,
                                       text_code_agreement, verify_legacy)

DATA = Path(__file__).parent / "data" / "tdg_legacy"


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]


GOOD, MISMATCH, HOSTILE = load("good"), load("mismatch"), load("hostile")
PWNED_GLOB = "tdg_legacy_pwned_*"


def pwned() -> list[str]:
    return sorted(str(p) for p in Path("/tmp").glob(PWNED_GLOB))


# -- good templates ---------------------------------------------------------------------------------------------
def test_good_templates_verify():
    verdicts = verify_legacy(GOOD, k=8, seed=0)
    assert [(v.accepted, v.reason, v.details) for v in verdicts] == [(True, None, "")] * len(GOOD)
    assert [v.template_id for v in verdicts] == [raw["idx"] for raw in GOOD]
    assert all(v.stats["k"] == 8 for v in verdicts)


def test_good_templates_instantiate_reproducibly_and_every_row_reruns():
    for raw in GOOD:
        rows = instantiate_legacy(raw, 25, seed=5)
        first = list(rows)
        assert rows.stats["produced"] == 25 and rows.stats["dropped"] == {} and rows.stats["aborted"] is None
        again = list(instantiate_legacy(raw, 25, seed=5, batch=7))  # other batch boundaries, same rows
        assert first == again
        other = list(instantiate_legacy(raw, 25, seed=6))
        assert [r["problem"] for r in other] != [r["problem"] for r in first]
        assert [r["problem_id"] for r in first] == list(range(25))
        for r in first:
            assert set(r) >= {"problem", "solution_code", "result", "solution_wocode", "template_id", "problem_id"}
            assert r["template_id"] == raw["idx"] and isinstance(r["problem_id"], int)
            assert r["sandbox_verified"] is True and r["text_checked"] is True
        # every row's solution_code, re-run on its own (in the sandbox, never here), leaves its result
        reruns = _rerun([r["solution_code"] for r in first], timeout_s=2.0, mem_mb=512)
        assert all(rr.ok and same_result(rr.result, r["result"]) for rr, r in zip(reruns, first))


def test_verify_instances_are_the_instantiated_ones():
    raw = GOOD[0]
    rows = list(instantiate_legacy(raw, 3, seed=0))
    again = _generate([raw["template"]], [(0, raw["idx"], 0, pid) for pid in range(3)], timeout_s=2.0, mem_mb=512)
    assert [r["problem"] for r in rows] == [x.problem for x in again]


# -- rejected for their content ---------------------------------------------------------------------------------
def test_mismatches_rejected_with_their_reason():
    verdicts = verify_legacy(MISMATCH, k=8)
    for raw, v in zip(MISMATCH, verdicts):
        assert (v.accepted, v.reason) == (False, raw["expect"]), v.details
    boxes = verdicts[0]
    assert "never names" in boxes.details and "never uses or computes" in boxes.details


def test_instantiate_drops_and_counts_mismatched_rows():
    rows = instantiate_legacy(MISMATCH[0], 10, extra=0)
    out = list(rows)
    assert rows.stats["produced"] == len(out) < 10
    assert rows.stats["dropped"] == {"text_code_mismatch": 10 - len(out)}


def test_solution_code_is_rerun_on_its_own():
    # the code needs a helper of the template: fine inside the template's own exec, fails on its own
    src = ("def helper(x):\n    return x * 3\n\n"
           "def generate_problem_and_solution_code():\n"
           "    n = random.randint(4, 9)\n"
           "    code = f'result = helper({n})'\n"
           "    ns = {'helper': helper}\n"
           "    exec(code, ns, ns)\n"
           "    return f'Triple {n}.', code, ns['result'], 'x'\n")
    v = verify_legacy([{"template": src}], k=2)[0]
    assert (v.accepted, v.reason) == (False, "code_error") and "NameError" in v.details
    assert v.template_id.startswith("legacy-")


def test_text_code_agreement_rule():
    assert text_code_agreement("Ann buys 3 pens at $1.50 each.", [3, 1.5], [3, 1.5, 4.5]) is None
    # a derived quantity shown in the text is fine when the code computes it (rounded to the text's decimals)
    assert text_code_agreement("Walking 10 km takes 3 hours: 3.33 km per hour.", [10, 3],
                               [10, 3, 3.3333333]) is None
    assert "names 3.34" in text_code_agreement("Walking 10 km takes 3 hours: 3.34 km per hour.", [10, 3],
                                               [10, 3, 3.3333333])
    # 20% may be used as 0.8 (what is left), unit constants need not be named
    assert text_code_agreement("A 20% discount on $40.", [40, 0.8], [32.0]) is None
    assert text_code_agreement("It takes 90 minutes.", [90, 60], [1.5]) is None
    # the text shows 48, the code uses 50
    why = text_code_agreement("Nat sold 48 clips.", [50], [50])
    assert "uses 50" in why and "names 48" in why
    # half vs a literal 3
    assert "uses 3" in text_code_agreement("She sold 10 in April and half as many in May.", [10, 3], [10, 13])


def test_audit_rules():
    ok = "def generate_problem_and_solution_code():\n    ns = {}\n    exec('result = 1', {}, ns)\n    return 1\n"
    assert audit_source(ok, _POLICY) is None
    for src, reason in [
        ("def generate_problem_and_solution_code():\n    f = exec\n", "forbidden_name"),
        ("def generate_problem_and_solution_code():\n    try:\n        pass\n    except:\n        pass\n",
         "forbidden_syntax"),
        ("class A:\n    pass\ndef generate_problem_and_solution_code():\n    pass\n", "forbidden_syntax"),
        ("def generate_problem_and_solution_code():\n    random.seed = 1\n", "forbidden_attribute"),
        ("from random import _inst\ndef generate_problem_and_solution_code():\n    pass\n", "forbidden_attribute"),
        ("from .x import y\ndef generate_problem_and_solution_code():\n    pass\n", "forbidden_import"),
        ("def generate_problem_and_solution_code():\n    return pow(7, 10 ** 6)\n", "huge_power"),
        ("def generate_problem_and_solution_code():\n    return [0] * (10 ** 9)\n", "memory_bomb"),
        ("def generate_problem_and_solution_code(x):\n    pass\n", "no_generator"),
        ("def generate_problem_and_solution_code(:\n", "syntax_error"),
        ("x = 1\n" * 20_000, "too_long"),
    ]:
        assert audit_source(src, _POLICY)[0] == reason, src


def test_is_legacy_and_ids():
    assert is_legacy(GOOD[0]) and not is_legacy({"template": "x = 1"}) and not is_legacy({"skill": "x"})
    v = verify_legacy([{"problem": "no template"}])[0]
    assert (v.accepted, v.reason) == (False, "not_legacy")
    assert legacy_template_id({"idx": 7, "template": "x"}) == "7"
    assert legacy_template_id({"template": "x"}) == legacy_template_id({"template": "x", "other": 1})
    with pytest.raises(LegacyError, match="forbidden_import"):
        instantiate_legacy(HOSTILE[0], 3)


# -- hostile templates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", HOSTILE, ids=[h["id"] for h in HOSTILE])
def test_hostile_rejected_with_reason_in_bounded_time(raw):
    t0 = time.monotonic()
    v = verify_legacy([raw], k=4, timeout_s=1.0)[0]
    elapsed = time.monotonic() - t0
    assert raw["expect"] in LEGACY_REASONS
    assert (v.accepted, v.reason) == (False, raw["expect"]), (raw["kind"], v.details)
    assert elapsed < 45, f"{raw['id']} took {elapsed:.1f}s"


def test_hostile_batch_leaves_the_host_unharmed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}  # a test session's engine is ours too
    temp_before = set(Path(tempfile.gettempdir()).glob("tdg-legacy-*"))
    rss_before = me.memory_info().rss
    assert pwned() == []
    t0 = time.monotonic()
    verdicts = verify_legacy(HOSTILE + GOOD, k=4, timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert [v.reason for v in verdicts] == [h["expect"] for h in HOSTILE] + [None] * len(GOOD)
    assert elapsed < 90
    assert pwned() == [] and list(tmp_path.iterdir()) == []
    assert {p.pid for p in me.children(recursive=True)} - children_before == set()
    assert set(Path(tempfile.gettempdir()).glob("tdg-legacy-*")) == temp_before
    assert me.memory_info().rss - rss_before < 100 * 2**20


ESCAPES = {  # what the static audit would reject, run straight in the sandbox to test its own layer
    "subclasses to os.system": ('for c in ().__class__.__bases__[0].__subclasses__():\n'
                                '    if c.__name__ == "_wrap_close":\n'
                                '        c.__init__.__globals__["system"]("touch /tmp/tdg_legacy_pwned_a")'),
    "__import__ of os": '__builtins__["__import__"]("os").system("touch /tmp/tdg_legacy_pwned_b")',
    "runner's real open": 'exec.__globals__["_b"].open("/tmp/tdg_legacy_pwned_c", "w").write("x")',
    "runner's sys to os": 'exec.__globals__["sys"].modules["os"].system("touch /tmp/tdg_legacy_pwned_d")',
    "posix fork": 'exec.__globals__["sys"].modules["posix"].fork()',
    "posix open": 'exec.__globals__["sys"].modules["posix"].open("/tmp/tdg_legacy_pwned_e", 65)',
    "ctypes": 'exec.__globals__["sys"].modules["ctypes"].CDLL(None).system(b"touch /tmp/tdg_legacy_pwned_f")',
    "open by name": 'open("/tmp/tdg_legacy_pwned_g", "w")',
    "real import of socket": 'exec.__globals__["_b"].__import__("socket").create_connection(("127.0.0.1", 9))',
    "real import of subprocess": 'exec.__globals__["_b"].__import__("subprocess").run(["true"])',
}


def test_sandbox_layer_contains_escapes_the_audit_would_catch():
    srcs = ["def generate_problem_and_solution_code():\n" + "".join(f"    {line}\n" for line in body.splitlines())
            + '    return "p 1", "result = 1", 1, "s"\n' for body in ESCAPES.values()]
    assert all(audit_source(s, _POLICY) is not None for s in srcs)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    out = _generate(srcs, [(i, f"t{i}", 0, 0) for i in range(len(srcs))], timeout_s=1.0, mem_mb=512)
    assert time.monotonic() - t0 < 45
    for name, inst in zip(ESCAPES, out):
        assert inst.error in ("blocked", "instance_error"), (name, inst)
    assert pwned() == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} - children_before == set()


def test_instantiate_of_a_runaway_template_stops():
    loop = next(h for h in HOSTILE if h["id"] == "h-infinite-loop")
    t0 = time.monotonic()
    rows = instantiate_legacy(loop, 4, timeout_s=0.5, extra=0)
    assert list(rows) == []
    assert rows.stats["dropped"] == {"timeout": 4} and rows.stats["aborted"]
    assert time.monotonic() - t0 < 45
