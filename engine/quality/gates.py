"""Quality gates: checks a generated row must pass before it is accepted. A row failing one is committed as a
reject whose reason starts with the gate's code, so every gate's count is in the manifest (`gates`: per stage,
every gate that ran, zeros included) and on the dataset card.

Generic gates, applied by the pipeline core (engine.pipeline.core) to every Generate stage's accepted parse,
switched off or tuned in the run config's `quality:` section (engine.quality.QualityConfig):

    cut_at_max_length  a string of a JSON output ends exactly at its schema's `maxLength`: the grammar closed it
                       there, so it was cut, not finished ("The best way to describe my go" at maxLength 30)
    repetition         more than `repetition_threshold` of the output's word n-grams (n = `repetition_ngram`)
                       repeat an earlier one: a degenerate loop ("the cat sat on the mat. the cat sat on ...")

Method gates are checks a method's parse function makes with the helpers below and declares on its stage
(`Generate(gates=...)`), so the core counts them: GLAN's questions (`no_content_words`, `not_a_question`,
`echoes_prompt`), GLAN's answers (`declined`, `repeats_question`), TarGEN's instances (`choices_not_distinct`),
and the optional judge stage (`judge_below_threshold`, engine.pipeline.run).

    >>> repeated_ngram_fraction("a b c d a b c d a b c d", 4)
    0.5556
    >>> cut_strings({"name": "Ada", "hobby": "The best way to describe my go"},
    ...             {"type": "object", "properties": {"hobby": {"type": "string", "maxLength": 30}}})
    ['hobby']
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from engine.quality.dedup import normalize

GENERIC = ("cut_at_max_length", "repetition")

# What each gate's reason code means, in one line (the dataset card's legend).
DESCRIPTIONS = {
    "cut_at_max_length": "a JSON string ends at its schema's maxLength (cut by the grammar, not finished)",
    "repetition": "too many repeated word n-grams (a degenerate loop)",
    "too_short": "the question has fewer than 20 characters",
    "no_content_words": "the question has fewer than 3 content words beyond the course's own names",
    "not_a_question": "the question reads neither as a question ('?', a wh-word) nor as a task (an instruction verb)",
    "echoes_prompt": "the question copies the prompt (most of its word 4-grams are in the prompt)",
    "declined": "the answer declines instead of answering",
    "repeats_question": "the answer repeats the question (starts with it, or is mostly its words)",
    "choices_not_distinct": "two of the choices (or a choice and the premise) are equal once normalized",
    "judge_below_threshold": "the judge model scored the row below the threshold",
}

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Casefolded words: `words("Don't stop, Ada!") -> ["don't", "stop", "ada"]`."""
    return _WORD.findall(text.casefold())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------------------------ generic gates

def json_strings(value: Any) -> Iterator[str]:
    """Every string value in a parsed JSON value (not its keys), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one, rounded to 4 places (0 for a text of
    fewer than n + 1 words): 0 for prose, near 1 for a loop."""
    grams = ngrams(words(text), n)
    if len(grams) < 2:
        return 0.0
    return round(1 - len(set(grams)) / len(grams), 4)


def repetition(text: str, parsed: Any = None, *, n: int = 4, threshold: float = 0.5,
               min_words: int = 16) -> str | None:
    """The `repetition` gate: None, or the reason ("repetition: 0.71 of 4-grams repeat"). A JSON output is read
    as its string values, one per line (its keys and punctuation repeat by design); texts of fewer than
    `min_words` words pass (too short to call a loop)."""
    text = "\n".join(json_strings(parsed)) if isinstance(parsed, (dict, list)) else text
    if len(words(text)) < min_words:
        return None
    fraction = repeated_ngram_fraction(text, n)
    return f"repetition: {fraction} of {n}-grams repeat" if fraction > threshold else None


def _resolve(schema: Any, root: dict) -> Any:
    """Follow a local `$ref` ("#/$defs/x"); other references are left alone (nothing to check there)."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#"):
        node: Any = root
        for part in schema["$ref"][1:].strip("/").split("/"):
            if not part:
                continue
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        if node is None or seen > 32:
            return {}
        schema, seen = node, seen + 1
    return schema


def cut_strings(value: Any, schema: Any, root: dict | None = None, path: str = "") -> list[str]:
    """Paths of the strings in `value` whose length is at least their schema's `maxLength`, walking the value
    along its schema (properties, additionalProperties, patternProperties, items, prefixItems, $ref, allOf /
    anyOf / oneOf branches): `cut_strings({"a": ["xy"]}, {"properties": {"a": {"items": {"maxLength": 2}}}})
    -> ["a[0]"]`."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return []
    out: list[str] = []
    for combinator in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(combinator) or []:
            out += [p for p in cut_strings(value, branch, root, path) if p not in out]
    if isinstance(value, str):
        limit = schema.get("maxLength")
        if isinstance(limit, int) and limit > 0 and len(value) >= limit and path not in out:
            out.append(path or "$")
    elif isinstance(value, dict):
        props = schema.get("properties") or {}
        patterns = schema.get("patternProperties") or {}
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            where = f"{path}.{k}" if path else k
            if k in props:
                sub = [props[k]]
            else:
                sub = [s for p, s in patterns.items() if re.search(p, k)]
                if not sub and isinstance(extra, dict):
                    sub = [extra]
            for s in sub:
                out += [p for p in cut_strings(v, s, root, where) if p not in out]
    elif isinstance(value, list):
        prefix = schema.get("prefixItems") or (schema.get("items") if isinstance(schema.get("items"), list) else [])
        rest = schema.get("items") if isinstance(schema.get("items"), dict) else None
        for i, v in enumerate(value):
            s = prefix[i] if i < len(prefix) else rest
            if s is not None:
                out += cut_strings(v, s, root, f"{path}[{i}]")
    return out


def cut_at_max_length(parsed: Any, schema: dict | None) -> str | None:
    """The `cut_at_max_length` gate for a JSON-constrained output: None, or the reason naming the cut strings
    ("cut_at_max_length: hobbies[0]")."""
    if schema is None or parsed is None:
        return None
    cut = cut_strings(parsed, schema)
    return f"cut_at_max_length: {', '.join(cut[:5])}" if cut else None


# ------------------------------------------------------------------------------------------ method helpers

# English function words: what a text has beyond them (and beyond its labels) is its content.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each either etc few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just let me might more most must my
myself neither no nor not of off on once only or other our ours ourselves out over own per same shall she should
so some such than that the their theirs them themselves then there these they this those through thus to too
under until up upon us very via was we were what when where which while who whom whose why will with within
without would yet you your yours yourself yourselves one two three four five six seven eight nine ten first
second third given using use used following question questions answer answers task student students session
sessions course homework
""".split())


def content_words(text: str, labels: Iterable[str] = ()) -> list[str]:
    """Words of `text` with a letter, at least 3 characters, that are no function word and no word of `labels`
    (the course's own names): `content_words("A: 3: Physics: Science & Engineering", ["Physics", "Science &
    Engineering"]) -> []`."""
    skip = STOPWORDS | {w for label in labels for w in words(label)}
    return [w for w in words(text) if len(w) >= 3 and any(c.isalpha() for c in w) and w not in skip]


# Verbs that open a task ("Calculate ...", "Given X, explain ..."), and openers of a question without '?'.
INSTRUCTION_VERBS = frozenset("""
analyze analyse apply argue assess calculate characterize choose classify compare compose compute consider
construct contrast convert create critique decide define demonstrate derive describe design determine develop
diagram discuss distinguish draft draw estimate evaluate examine explain explore express find formulate give
graph identify illustrate imagine implement interpret investigate justify label list model name outline plan
plot predict propose prove provide rank rewrite select show simplify sketch solve state suggest summarize
summarise suppose assume translate use verify write
""".split())
QUESTION_OPENERS = frozenset("""
what why how which who whom whose when where whether is are was were do does did can could should would will
shall may might has have had
""".split())
_CLAUSE = re.compile(r"(?:^|[.!;:,\n]|\b(?:then|and)\b)\s*(?:\(?[a-z0-9]\)|\d+[.)])?\s*(?:please\s+)?([a-z]+)", re.I)


def reads_as_question(text: str) -> bool:
    """Whether `text` reads as a question or a task: it holds a '?', or a sentence or clause opens with a
    question word ("How does ...") or an instruction verb ("Given a mass of 2 kg, calculate ...").

    >>> reads_as_question("Why is the sky blue"), reads_as_question("Explain Ohm's law."), \
reads_as_question("A: 3: Physics: Science & Engineering")
    (True, True, False)
    """
    if "?" in text:
        return True
    return any(m.group(1).casefold() in INSTRUCTION_VERBS | QUESTION_OPENERS for m in _CLAUSE.finditer(text))


def containment(a: str, b: str, n: int = 4) -> float:
    """Share of the word n-grams of `a` that occur in `b` (0 when `a` has none): how much of `a` copies `b`."""
    grams = set(ngrams(words(a), n))
    if not grams:
        return 0.0
    return len(grams & set(ngrams(words(b), n))) / len(grams)


ECHO_THRESHOLD = 0.6
"""A question whose word 4-grams are at least this share in its prompt copies the prompt (`echoes_prompt`)."""


def question_problem(question: str, prompt: str, labels: Iterable[str] = ()) -> str | None:
    """GLAN's question gates, in order: `no_content_words` (fewer than 3 content words beyond `labels`, the
    course's names), `echoes_prompt` (containment in the prompt >= ECHO_THRESHOLD), `not_a_question`
    (reads_as_question). Returns the first failing reason ("code: detail") or None."""
    content = content_words(question, labels)
    if len(content) < 3:
        return f"no_content_words: {len(content)} content word(s)"
    share = containment(question, prompt)
    if share >= ECHO_THRESHOLD:
        return f"echoes_prompt: {share:.2f} of its 4-grams are in the prompt"
    if not reads_as_question(question):
        return "not_a_question: no '?', question word or instruction verb"
    return None


REPEAT_THRESHOLD = 0.5
"""An answer whose word 4-grams are at least this share in the question is mostly the question."""


def answer_repeats(answer: str, question: str) -> str | None:
    """GLAN's `repeats_question` gate: the answer starts with the question (normalized, a question of 5 words
    or more), or at least REPEAT_THRESHOLD of its word 4-grams are the question's. None when it does not."""
    a, q = normalize(answer), normalize(question)
    if q and len(q.split()) >= 5 and a.startswith(q):
        return "repeats_question: starts with the question"
    share = containment(answer, question)
    if share >= REPEAT_THRESHOLD:
        return f"repeats_question: {share:.2f} of its 4-grams are the question's"
    return None


def not_distinct(fields: dict, groups: Iterable[Iterable[str]]) -> str | None:
    """TarGEN's `choices_not_distinct` gate: the first group of fields (choices, premise) two of whose values
    are equal once normalized (casefolded, punctuation removed, whitespace collapsed), or None.

    >>> not_distinct({"premise": "It rained.", "choice1": "it rained", "choice2": "x"}, [["premise", "choice1"]])
    'choices_not_distinct: premise = choice1'
    """
    for group in groups:
        seen: dict[str, str] = {}
        for f in group:
            if not isinstance(fields.get(f), str):
                continue
            v = normalize(fields[f])
            if v in seen:
                return f"choices_not_distinct: {seen[v]} = {f}"
            seen[v] = f
    return None


# ------------------------------------------------------------------------------------------ the core's view

class Gates:
    """The gates the pipeline core applies to one run (from its QualityConfig): `names(stage)` are the codes
    counted for a Generate stage (the generic gates switched on, then the stage's own `gates`); `check(request,
    result)` is the generic gates' verdict on a result its stage's parse accepted."""

    def __init__(self, quality=None) -> None:
        from engine.quality import QualityConfig
        self.quality = quality or QualityConfig()

    @property
    def generic(self) -> tuple[str, ...]:
        q = self.quality
        return tuple(g for g, on in zip(GENERIC, (q.max_length_gate, q.repetition_gate)) if on)

    def names(self, stage) -> tuple[str, ...]:
        return self.generic + tuple(g for g in getattr(stage, "gates", ()) if g not in GENERIC)

    def check(self, request, result) -> str | None:
        """None, or the reason of the first generic gate `result` fails."""
        q = self.quality
        constraint = request.constraint
        if q.max_length_gate and constraint is not None and constraint.kind == "json":
            reason = cut_at_max_length(result.parsed, constraint.spec)
            if reason:
                return reason
        if q.repetition_gate:
            parsed = result.parsed if constraint is not None and constraint.kind == "json" else None
            return repetition(result.text, parsed, n=q.repetition_ngram, threshold=q.repetition_threshold)
        return None
