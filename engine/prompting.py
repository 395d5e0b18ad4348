"""Prompt rendering: every method's prompts are Jinja files under the repo's prompts/ folder, rendered through
ONE environment with StrictUndefined, so a variable missing from `render(...)` is an error, never "".

    >>> render("glan/answer.jinja", question="What is 2 + 2?")  # doctest: +SKIP
    'Answer the homework question ...'
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one Jinja environment: templates from prompts/, StrictUndefined, no autoescaping (prompts are not HTML)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(PROMPTS_DIR), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)


def render(template_path: str, **variables) -> str:
    """Render prompts/<template_path> (e.g. "glan/question.jinja") with `variables`; surrounding whitespace is
    stripped. A missing template or variable raises jinja2's TemplateNotFound / UndefinedError."""
    return environment().get_template(template_path).render(**variables).strip()
