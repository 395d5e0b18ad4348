"""TemplateMath / TemplateGSM-style baseline generator, for the instantiation benchmark only.

TemplateGSM keeps each template as free Python and, for every problem, re-executes the template's code
(`exec`), which draws values, formats the problem and the solution code, and `exec`s that solution code to get
the result, all on one core. To compare like with like we translate each of OUR checked templates into such a
Python source (this translation is our code, from whitelisted expressions; exec is allowed here, in bench only)
and time `exec(source)` + `generate(...)` per problem.

    python -m bench.tdg_baseline        # prints ours vs baseline rows/s on the seed library, one core
"""
from __future__ import annotations

import hashlib
import json
import time

from engine.methods.tdg import expr as X
from engine.methods.tdg.compile import ROUND_HALF_UP_SRC
from engine.methods.tdg.template import CheckedTemplate, Word


def _text(parts, places: dict[str, int]) -> str:
    """Python expression building a text from parts (float semantics like TemplateGSM's f-strings)."""
    items = []
    for p in parts:
        if isinstance(p, str):
            items.append(repr(p))
        elif isinstance(p, Word):
            items.append(p.name)
        else:
            items.append(f"fmt({X.float_source(p)})")
    return " + ".join(items) or "''"


def baseline_source(ct: CheckedTemplate) -> str:
    """A TemplateGSM-like Python template: `generate(seed) -> dict` drawing values with random.Random."""
    places = {v.name: v.places for v in ct.numeric}
    L = ["import random", "import math", "", ROUND_HALF_UP_SRC,
         "def fmt(x):",
         "    return str(int(x)) if float(x).is_integer() else str(round(x, 6))",
         "", "def generate(seed):", "    rng = random.Random(seed)"]
    for w in ct.words:
        L.append(f"    {w.name} = rng.choice({list(w.words)!r})")
    L.append("    while True:")
    for v in ct.numeric:
        lo, step = (v.lo, v.step) if v.places == 0 else (float(v.lo), float(v.step))
        L.append(f"        {v.name} = {lo!r} + {step!r} * rng.randrange({v.count})")
    cond = " and ".join(f"({X.float_source(c)})" for c in ct.constraints) or "True"
    L.append(f"        if {cond}:\n            break")
    L.append(f"    problem = {_text(ct.problem, places)}")
    code_lines = ["import math", "", "def solution():"]
    L.append("    solution_code = 'import math\\n\\n' + " + repr(ROUND_HALF_UP_SRC) + " + '\\ndef solution():\\n'")
    for v in ct.numeric:
        L.append(f"    solution_code += '    {v.name} = ' + repr({v.name}) + '\\n'")
    for s in ct.steps:
        L.append(f"    solution_code += {repr(f'    {s.name} = {X.float_source(s.expr)}' + chr(10))}")
    L.append(f"    solution_code += {repr(f'    result = {X.float_source(ct.answer)}' + chr(10) + '    return result' + chr(10))}")
    L.append("    ns = {}")
    L.append("    exec(solution_code, ns)")
    L.append("    result = ns['solution']()")
    for s in ct.steps:
        L.append(f"    {s.name} = {X.float_source(s.expr)}")
    sol = [_text(s.text, places) for s in ct.steps]
    L.append("    solution_wocode = '\\n'.join([" + ", ".join(sol) + "]) + '\\nThe answer is ' + fmt(result) + '.'")
    L.append("    return {'problem': problem, 'solution_code': solution_code, 'result': fmt(result), "
             "'solution_wocode': solution_wocode}")
    del code_lines
    return "\n".join(L) + "\n"


def baseline_rows_per_s(templates: list[CheckedTemplate], *, n_per_template: int = 200, seed: int = 0) -> float:
    """Rows/s of exec-per-problem generation on one core (the TemplateMath way)."""
    sources = [(ct.template_id, baseline_source(ct)) for ct in templates]
    t0 = time.perf_counter()
    n = 0
    for tid, src in sources:
        for pid in range(n_per_template):
            ns: dict = {}
            exec(src, ns)  # noqa: S102 - bench-only, our own generated source (see module docstring)
            row = ns["generate"](int.from_bytes(hashlib.blake2b(f"{seed}:{tid}:{pid}".encode(),
                                                                 digest_size=8).digest(), "little"))
            n += bool(row)
    return n / (time.perf_counter() - t0)


def baseline_cpu_rows_per_s(templates: list[CheckedTemplate], *, n_per_template: int = 200, seed: int = 0) -> float:
    """The exec loop's rows per CPU-second of this process (one core): comparable with a multi-process run's
    rows per CPU-second summed over its processes."""
    t0 = time.process_time()
    baseline_rows_per_s(templates, n_per_template=n_per_template, seed=seed)
    return n_per_template * len(templates) / (time.process_time() - t0)


def bench_rows_per_s(templates: list, *, n_per_template: int = 2000, seed: int = 0, baseline_n: int = 200) -> dict:
    """Rows/s on ONE core of our compiled instantiation (engine.methods.tdg.instantiate, workers=1, compile time
    included) vs exec-per-problem on the same templates. `templates`: engine.methods.tdg.instantiate.TemplateSpec."""
    from engine.methods.tdg.instantiate import instantiate
    from engine.methods.tdg.template import check_template
    t0 = time.perf_counter()
    n = sum(1 for _ in instantiate(templates, n_per_template=n_per_template, seed=seed, workers=1))
    ours = n / (time.perf_counter() - t0)
    base = baseline_rows_per_s([check_template(s.raw, source=s.source) for s in templates],
                               n_per_template=baseline_n, seed=seed)
    return {"ours_rows_per_s": round(ours), "baseline_rows_per_s": round(base), "speedup": round(ours / base, 1),
            "templates": len(templates), "rows_ours": n, "rows_baseline": baseline_n * len(templates), "cores": 1}


if __name__ == "__main__":
    import platform
    from pathlib import Path

    from engine.methods.tdg.instantiate import TemplateSpec
    from engine.methods.tdg.template import DATA_DIR
    raws = [json.loads(l) for l in (DATA_DIR / "seed_templates.jsonl").read_text().splitlines() if l.strip()]
    result = bench_rows_per_s([TemplateSpec(r, "seed", {"verified": True}) for r in raws])
    result["machine"] = platform.processor() or platform.machine()
    out = Path(__file__).resolve().parent / "results" / "tdg_instantiate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
