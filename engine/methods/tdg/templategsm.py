"""`sdg export RUN --format templategsm`: a TDG run's published rows in TemplateGSM's layout (math-ai/TemplateGSM).

TemplateGSM rows hold seven fields, and a user of that dataset reads them as such:

    problem          str  the word problem
    solution_code    str  commented Python, module-level, that leaves the answer in a variable named `result`
    result           str  the answer
    solution_wocode  str  the natural-language solution
    source           str  where the template's idea came from (a GSM8K problem, a topic, our seed library)
    template_id      int
    problem_id       int

Our native rows keep `solution_code` as a function `solution()` (the sandbox calls it); the export rewrites it
as module-level code with each step's explanation as a comment above its line. It parses our own compiled code
(ast, never exec); a legacy template's code is module-level already and is written as it is.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from engine.request import stable_hash
from engine.store.files import atomic_text

FIELDS = {"problem": "string", "solution_code": "string", "result": "string", "solution_wocode": "string",
          "source": "string", "template_id": "int64", "problem_id": "int64"}
"""The published fields and their types, in TemplateGSM's order."""


def template_number(template_id: str) -> int:
    """A template id as TemplateGSM's int: an integer id as it is, our 'tdg-<hex>' ids as the hex number, any
    other id as a 60-bit hash (stable across runs and exports).

    >>> template_number("17"), template_number("tdg-00000000002a")
    (17, 42)
    """
    text = str(template_id)
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"tdg-([0-9a-f]{1,15})", text)
    return int(m[1], 16) if m else int(stable_hash(["template-number", text])[:15], 16)


def module_code(solution_code: str, solution_wocode: str) -> str:
    """Our `def solution(): ... return result` as module-level code leaving `result`, each step commented with
    its line of the natural-language solution (code that is not ours is returned unchanged).

    >>> print(module_code("def solution():\\n    a = 2\\n    b = a * 3\\n    result = b\\n    return result\\n",
    ...                   "Three times 2 is 6.\\nThe answer is 6."))
    # Given quantities
    a = 2
    <BLANKLINE>
    # Three times 2 is 6.
    b = a * 3
    <BLANKLINE>
    # The answer
    result = b
    <BLANKLINE>
    """
    tree = ast.parse(solution_code)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solution"]
    if not functions:
        return solution_code
    body = functions[0].body
    if body and isinstance(body[-1], ast.Return):
        body = body[:-1]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # a docstring
    assigns = [n for n in body if isinstance(n, ast.Assign)]
    final = assigns[-1] if assigns and _target(assigns[-1]) == "result" else None
    steps = [n for n in assigns if n is not final]
    explained = [line for line in solution_wocode.splitlines() if line.strip()
                 and not line.lower().startswith("the answer is")]
    given = steps[: max(0, len(steps) - len(explained))]  # the first assignments are the problem's values
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    lines = imports + ([""] if imports else []) + ["# Given quantities"] + [ast.unparse(n) for n in given]
    for node, text in zip(steps[len(given):], explained):
        lines += ["", f"# {' '.join(text.split())}", ast.unparse(node)]
    if final is not None:
        lines += ["", "# The answer", ast.unparse(final)]
    return "\n".join(lines) + "\n"


def _target(node: ast.Assign) -> str | None:
    return node.targets[0].id if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) else None


def templategsm_row(row: dict) -> dict:
    """One published TDG row in TemplateGSM's fields and types."""
    code = row["solution_code"]
    if row.get("format") != "legacy":
        code = module_code(code, row["solution_wocode"])
    return {"problem": row["problem"], "solution_code": code, "result": str(row["result"]),
            "solution_wocode": row["solution_wocode"], "source": row.get("origin") or row.get("source") or "",
            "template_id": template_number(row["template_id"]), "problem_id": int(row["problem_id"])}


def rows_of(out: Path) -> Iterator[dict]:
    """The run's published rows, file by file, batch by batch (never the whole dataset in memory)."""
    for f in sorted((Path(out) / "data").glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches():
            yield from batch.to_pylist()


CARD = """# TemplateGSM-format export

Exported by `sdg export {run} --format templategsm` from a TDG run of sdg ({rows} rows, {templates} templates).
One JSON object a line in `{data}`, with TemplateGSM's fields and types:

| field | type | meaning |
|---|---|---|
| problem | string | the word problem |
| solution_code | string | commented module-level Python that leaves the answer in `result` |
| result | string | the answer |
| solution_wocode | string | the natural-language solution |
| source | string | where the template's idea came from |
| template_id | int64 | the template (stable across exports of the same templates) |
| problem_id | int64 | the instance of its template |

Every row was checked twice before publishing: its answer computed exactly from the template, and its
solution_code run in a sandbox, which gave the same answer.
"""


def export(out: Path, to: Path) -> int:
    """Write `out`'s published rows to directory `to` as templategsm.jsonl plus README.md (the card listing the
    fields and types); returns the number of rows. Each file is written atomically."""
    out, to = Path(out), Path(to)
    to.mkdir(parents=True, exist_ok=True)
    data = to / "templategsm.jsonl"
    n, templates = 0, set()
    with atomic_text(data) as fh:
        for row in map(templategsm_row, rows_of(out)):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            templates.add(row["template_id"])
    with atomic_text(to / "README.md") as fh:
        fh.write(CARD.format(run=out.name, rows=n, templates=len(templates), data=data.name))
    return n

