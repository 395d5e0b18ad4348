"""Per-commit timings of a run directory (written by the store at every commit, stats/<writer>.commits.jsonl):
what each writer committed when, and its cumulative token counts then, for throughput over time.

    >>> commits("runs/demo")  # doctest: +SKIP
    [{'writer': 'r0', 'commit': 1, 'time': 1764490000.0, 'rows': {'gen': 40}, 'rejects': {}, 'stages': {...}}, ...]
"""
from __future__ import annotations

import json
from pathlib import Path


def commits(out: str | Path) -> list[dict]:
    """Every writer's commit lines, sorted by time, each with its `writer`; torn or foreign lines skipped."""
    lines = []
    for path in sorted((Path(out) / "stats").glob("*.commits.jsonl")):
        writer = path.name[: -len(".commits.jsonl")]
        for text in path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(text)
            except ValueError:
                continue  # the last line of a writer killed mid-write
            if isinstance(line, dict) and isinstance(line.get("time"), (int, float)):
                lines.append({"writer": writer, **line})
    return sorted(lines, key=lambda line: (line["time"], line["writer"]))
