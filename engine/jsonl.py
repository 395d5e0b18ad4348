"""JSON Lines input: one JSON object per line, blank lines skipped, the first bad line one clear error."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_objects(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path`; raises `error` naming file and line.

    >>> # {"a": 1}\\n\\n[1]  ->  (1, {"a": 1}), then error("f.jsonl:3: each line must be a JSON object")
    """
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{number}: malformed JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise error(f"{path}:{number}: each line must be a JSON object")
            yield number, value
