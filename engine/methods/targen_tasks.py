"""TarGEN task shapes beyond "fields + one label": spans located in the text, and answer lists.

Offsets are computed here from the generated text, never taken from the model: a span that is not found in the
text it names is a reject with a reason. Two kinds of position, as in SuperGLUE:

  - characters (WiC start1/end1, ReCoRD entities/answers): `text[start:end]` is the span, end exclusive;
      locate("bank", "The Bank closed.") -> (4, 8)
  - words (WSC span1_index): the index in `text.split()` of the span's first word; the span is a run of those
    words exactly as written (the SuperGLUE format), so "the dog" is not found in "the dog, tired":
      word_index("the dog", "Yesterday the dog slept.") -> 1

A task spec declares its spans (`spans:`, `Span`) and, where one label covers several answers, a named
derivation (`derive:`, `DERIVE`) that builds the answer list from the published label.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class Span(BaseModel):
    """A field whose value must occur in another field; the columns that give where it occurs."""

    model_config = ConfigDict(extra="forbid")
    field: str
    """The field holding the span text: a string, or an array of strings (each located)."""
    within: str
    """The field (a string) the span must occur in."""
    word_forms: bool = False
    """The span may run on into a longer word (bank -> banks); the offsets then cover the word as written."""
    start: str | None = None
    """Column for the character offset of the first occurrence (a string `field` only)."""
    end: str | None = None
    """Column for the character offset just after it (exclusive)."""
    index: str | None = None
    """Column for the word index of the first occurrence in `within.split()` (WSC)."""
    mentions: str | None = None
    """Column for a list of {"text", "start", "end"}: every occurrence of each value (ReCoRD); may be `field`."""
    choose: int = Field(0, ge=0, le=8)
    """When `within` is given before step 3 (the seed): restrict the span to runs of 1..choose words of that
    text that hold the field's schema (an enum), so the model picks a span rather than spelling one; 0: no."""

    @model_validator(mode="after")
    def _some_column(self) -> "Span":
        if not (self.start or self.end or self.index or self.mentions):
            raise PydanticCustomError("span", f"span of {self.field!r} names no column (start/end, index or mentions)")
        if bool(self.start) != bool(self.end):
            raise PydanticCustomError("span", f"span of {self.field!r}: give both `start` and `end`, or neither")
        return self

    def columns(self) -> list[str]:
        return [c for c in (self.start, self.end, self.index, self.mentions) if c]

    def locate(self, fields: dict) -> tuple[dict, str | None]:
        """(columns -> values, None) or ({}, reason) when a span is not in its text."""
        text, values = fields[self.within], fields[self.field]
        values = values if isinstance(values, list) else [values]
        out: dict[str, Any] = {}
        found = [_occurrences(v, text, self.word_forms) for v in values]
        missing = [v for v, spots in zip(values, found) if not spots]
        if missing:
            return {}, f"span: {self.within} does not contain {self.field} {missing[0]!r}"
        if self.start:
            out[self.start], out[self.end] = found[0][0]
        if self.index:
            at = word_index(values[0], text)
            if at is None:
                return {}, f"span: {self.field} {values[0]!r} is not a run of words of {self.within} as written"
            out[self.index] = at
        if self.mentions:
            spots = dict.fromkeys(spot for spots in found for spot in spots)  # a value listed twice: once
            out[self.mentions] = [{"text": text[s:e], "start": s, "end": e} for s, e in spots]
        return out, None


def candidates(text: str, most_words: int, schema: dict, as_written: bool = False) -> list[str]:
    """Runs of 1..most_words words of `text`, punctuation at their edges removed, that hold `schema`, first
    occurrence order: ("The cat saw it.", 2, {"pattern": "^[A-Z]"}) -> ["The", "The cat"]. `as_written`: only
    runs of words that have no punctuation at their edges (a word index span: "it." is not "it")."""
    import jsonschema
    valid = jsonschema.validators.validator_for(schema)(schema).is_valid
    words = [_EDGE.sub("", w) for w in text.split()]
    if as_written:
        words = [w if w == raw else "" for w, raw in zip(words, text.split())]
    out: list[str] = []
    for i in range(len(words)):
        for n in range(1, most_words + 1):
            run = " ".join(words[i:i + n])
            if (i + n <= len(words) and all(words[i:i + n]) and run not in out and valid(run)
                    and _occurrences(run, text, False)):  # "London, England" offers no "London England"
                out.append(run)
    return out


def _occurrences(span: str, text: str, word_forms: bool) -> list[tuple[int, int]]:
    """(start, end) of each occurrence of `span` in `text` as whole words, ignoring case."""
    if not span.strip():
        return []
    tail = r"\w*" if word_forms else r"(?!\w)"
    pattern = re.compile(r"(?<!\w)" + re.escape(span.strip()) + tail, re.IGNORECASE)
    return [m.span() for m in pattern.finditer(text)]


def locate(span: str, text: str) -> tuple[int, int] | None:
    """The first (start, end) of `span` in `text` as whole words, ignoring case; None if absent."""
    spots = _occurrences(span, text, False)
    return spots[0] if spots else None


_EDGE = re.compile(r"^\W+|\W+$")


def word_index(span: str, text: str) -> int | None:
    """Index in `text.split()` where the words of `span` start, as written; None if absent."""
    tokens, wanted = text.split(), span.split()
    if not wanted:
        return None
    return next((i for i in range(len(tokens) - len(wanted) + 1) if tokens[i:i + len(wanted)] == wanted), None)


# ------------------------------------------------------------------------------- answer lists from the label

def multirc_answers(fields: dict, label: str, initial_label: str) -> dict:
    """MultiRC: `answer` was written to be correct when the label is "true" (incorrect when "false") and
    `other_answer` to be the opposite of the label it was written for. The published label (corrected) labels
    `answer`; `other_answer` keeps the opposite of the initial label, as written.
    {"answer": "a", "other_answer": "b"}, "true", "true" -> {"answers": [{"text": "a", "label": 1},
    {"text": "b", "label": 0}]}"""
    return {"answers": [{"text": fields["answer"], "label": int(label == "true")},
                        {"text": fields["other_answer"], "label": int(initial_label != "true")}]}


# name in a spec's `derive:` -> (fields, published label, initial label) -> extra columns
DERIVE: dict[str, Callable[[dict, str, str], dict]] = {"multirc_answers": multirc_answers}
