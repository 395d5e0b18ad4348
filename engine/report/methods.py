"""Per-method sections of a report, read from the stored rows (not from the methods' code, which may change):

- TDG: templates by verdict and reason (seed library and model-written), rows per template;
- TarGEN: label balance (label asked for vs final label of the published rows) and flip rate per label;
- GLAN: coverage by discipline and by subject, key concepts per question.

A section whose fields are absent from the rows says so instead of drawing an empty figure.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import engine.report.plots as plots
from engine.report.data import RunData

# stage -> row fields each method's figures read (collected by engine.report.data.read_run)
WANTED = {
    "tdg": {"problems": ["template_id"], "templates": ["source"], "seed_templates": ["source"]},
    "targen": {"dataset": ["key", "label", "target_label", "corrected_label", "disagreement"]},
    "glan": {"rows": ["key", "discipline", "subject", "key_concepts"]},
}


@dataclass
class Section:
    title: str
    plots: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    """(caption, headers, rows) triples."""
    notes: list = field(default_factory=list)


def wanted(method: str) -> dict[str, list[str]]:
    return WANTED.get(method, {})


def section(run: RunData) -> Section | None:
    builder = {"tdg": _tdg, "targen": _targen, "glan": _glan}.get(run.method)
    return builder(run) if builder else None


def _published_mask(run: RunData, stage: str) -> list[bool]:
    """Per row read of `stage`: whether it is published (not removed by a quality filter)."""
    removed = {r["key"] for r in run.removals}
    return [k not in removed for k in run.fields.get(stage, {}).get("key", [])]


# --------------------------------------------------------------------------------------------------- TDG
def _tdg(run: RunData) -> Section:
    s = Section("TDG: templates and problems")
    verdicts: dict[str, dict[str, int]] = {}
    rows = []
    for stage, label in (("seed_templates", "seed library"), ("templates", "model-written")):
        data = run.stages.get(stage)
        if data is None:
            continue
        counts = {"accepted": data.rows, **dict(data.reasons)}
        verdicts[label] = counts
        rows += [(label, verdict, n) for verdict, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    plot = plots.grouped("tdg-verdicts", "Templates by verdict and reason", verdicts, xlabel="templates")
    if plot:
        s.plots.append(plot)
    if rows:
        s.tables.append(("Templates by verdict and reason", ["templates", "verdict", "count"], rows))
    else:
        s.notes.append("No template has been committed yet.")
    ids = [t for t in run.fields.get("problems", {}).get("template_id", []) if t is not None]
    if ids:
        per = Counter(map(str, ids))
        s.plots.append(plots.bars("tdg-rows-per-template", "Problem rows per template", per, xlabel="rows"))
        sizes = sorted(per.values())
        s.tables.append(("Problem rows per template", ["templates", "rows", "min", "median", "max"],
                         [(len(per), sum(sizes), sizes[0], sizes[len(sizes) // 2], sizes[-1])]))
    else:
        s.notes.append("No problem row (with a template_id) has been committed yet.")
    return s


# ------------------------------------------------------------------------------------------------ TarGEN
def _targen(run: RunData) -> Section:
    s = Section("TarGEN: labels")
    f = run.fields.get("dataset", {})
    labels, targets = f.get("label", []), f.get("target_label", [])
    if not labels:
        s.notes.append("The dataset stage has no rows yet.")
        return s
    published = _published_mask(run, "dataset") or [True] * len(labels)
    final = Counter(str(l) for l, p in zip(labels, published) if p and l is not None)
    asked = Counter(str(t) for t, p in zip(targets, published) if p and t is not None)
    groups = {"final label (published rows)": dict(final)}
    if asked:
        groups["label asked for"] = dict(asked)
    plot = plots.grouped("targen-balance", "Label balance", groups, xlabel="rows")
    if plot:
        s.plots.append(plot)
    # flip rate: rows whose self-correction disagreed with the label asked for, per label asked for
    flips: dict[str, list[int]] = {}
    corrected, disagreement = f.get("corrected_label", []), f.get("disagreement", [])
    for i, target in enumerate(targets):
        if target is None:
            continue
        flag = disagreement[i] if i < len(disagreement) else None
        if flag is None and i < len(corrected) and corrected[i] is not None:
            flag = str(corrected[i]) != str(target)
        if flag is not None:
            flips.setdefault(str(target), [0, 0])
            flips[str(target)][0] += bool(flag)
            flips[str(target)][1] += 1
    if flips:
        rates = {label: n / total for label, (n, total) in flips.items()}
        plot = plots.bars("targen-flips", "Flip rate per label (self-correction disagreed)", rates,
                          xlabel="share of rows", percent=True, sort=False)
        if plot:
            s.plots.append(plot)
        else:
            s.notes.append("Self-correction agreed with every label asked for: flip rate 0 for every label.")
        s.tables.append(("Flip rate per label asked for (all dataset rows)", ["label", "rows", "flipped", "rate"],
                         [(label, total, n, f"{n / total:.1%}") for label, (n, total) in sorted(flips.items())]))
    s.tables.append(("Label balance (published rows)", ["label", "asked for", "final"],
                     [(label, asked.get(label, 0), final.get(label, 0)) for label in sorted(set(asked) | set(final))]))
    return s


# -------------------------------------------------------------------------------------------------- GLAN
def _glan(run: RunData) -> Section:
    s = Section("GLAN: coverage")
    f = run.fields.get("rows", {})
    disciplines = f.get("discipline", [])
    if not disciplines:
        s.notes.append("The rows stage has no rows yet.")
        return s
    by_discipline = Counter(str(d) for d in disciplines if d is not None)
    by_subject = Counter(str(x) for x in f.get("subject", []) if x is not None)
    concepts = [len(c) for c in f.get("key_concepts", []) if isinstance(c, list)]
    for plot in (plots.bars("glan-disciplines", "Rows per discipline", by_discipline, xlabel="rows"),
                 plots.bars("glan-subjects", "Rows per subject", by_subject, xlabel="rows"),
                 plots.histogram("glan-concepts", "Key concepts per question", concepts, xlabel="key concepts")):
        if plot:
            s.plots.append(plot)
    s.tables.append(("Coverage", ["disciplines", "subjects", "rows", "mean key concepts per question"],
                     [(len(by_discipline), len(by_subject), len(disciplines),
                       f"{sum(concepts) / len(concepts):.2f}" if concepts else "-")]))
    return s
