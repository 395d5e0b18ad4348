"""The report's figures: matplotlib (Agg) drawn to SVG and embedded as data: URIs, so the page needs no file and
no network. An SVG shown through <img> runs no script and its ids cannot clash with the page's.

Every function returns a Plot, or None when there is nothing to draw (the page then says so in words). Labels
come from the data (stage names, reject reasons, model-written disciplines): matplotlib's math text is off, so
a `$` in them is a dollar sign, and the SVG writer escapes them as XML.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

plt.rcParams.update({
    "svg.fonttype": "none",  # text stays text (small, selectable); the browser's sans-serif draws it
    "svg.hashsalt": "sdg-report",  # the same run gives the same bytes
    "text.parse_math": False,  # model text with "$" is text, not math
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
})

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]
ACCEPTED = "#55a868"
MAX_BARS = 30


@dataclass
class Plot:
    name: str
    """A stable id (tests and anchors): e.g. "funnel", "lengths-templates"."""
    title: str
    uri: str
    points: int
    """Data points drawn (bars with a value, line points, histogram entries): never 0."""
    note: str = ""


def _label(text: object, width: int = 38) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def _finish(fig, name: str, title: str, points: int, note: str = "") -> Plot:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    uri = "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Plot(name, title, uri, points, note)


def funnel(stages: list[tuple[str, int, dict[str, int]]], published: tuple[int, dict[str, int]] | None) -> Plot | None:
    """Per stage a bar: accepted rows, then rejects stacked by reason; then the published stage's accepted rows
    split into published and removed by each quality filter."""
    bars = [(name, accepted, reasons) for name, accepted, reasons in stages if accepted or reasons]
    if published is not None:
        kept, removed = published
        bars.append(("published", kept, removed))
    if not bars:
        return None
    reasons = sorted({r for _, _, rs in bars for r in rs})
    others = [c for c in PALETTE if c != ACCEPTED]
    colors = {r: others[i % len(others)] for i, r in enumerate(reasons)}
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(bars) + 1.4))
    ys = list(range(len(bars)))[::-1]
    points = 0
    for y, (name, accepted, rs) in zip(ys, bars):
        ax.barh(y, accepted, color=ACCEPTED)
        left = accepted
        points += accepted > 0
        for r in reasons:
            n = rs.get(r, 0)
            if n:
                ax.barh(y, n, left=left, color=colors[r])
                left += n
                points += 1
        ax.text(left, y, f"  {accepted:,} / {left:,}", va="center", fontsize=8)
    handles = [Patch(color=ACCEPTED, label="accepted (published)")]
    handles += [Patch(color=colors[r], label=_label(r, 30)) for r in reasons]
    ax.set_yticks(ys, [_label(n, 24) for n, _, _ in bars])
    ax.set_xlabel("rows: accepted, then rejected by reason")
    ax.set_xlim(0, max(a + sum(rs.values()) for _, a, rs in bars) * 1.18 or 1)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _finish(fig, "funnel", "Acceptance funnel", points)


def throughput(series: dict[str, list[tuple[float, float, float]]]) -> Plot | None:
    """Per writer (replica): (seconds since the run's first commit, output tok/s, rows/s) per commit interval."""
    series = {w: pts for w, pts in series.items() if pts}
    if not series:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True)
    points = 0
    for i, (writer, pts) in enumerate(sorted(series.items())):
        t = [p[0] for p in pts]
        color = PALETTE[i % len(PALETTE)]
        top.plot(t, [p[1] for p in pts], marker="o", ms=3, color=color, label=f"replica {writer}")
        bottom.plot(t, [p[2] for p in pts], marker="o", ms=3, color=color)
        points += len(pts)
    top.set_ylabel("output tok/s")
    bottom.set_ylabel("rows/s")
    bottom.set_xlabel("seconds since the first commit (each point: the interval since the writer's previous commit)")
    top.legend(fontsize=7, frameon=False)
    return _finish(fig, "throughput", "Throughput over time, per commit and replica", points)


def histogram(name: str, title: str, values: list[int], rejected: list[int] | None = None, xlabel: str = "",
              bins: int = 30) -> Plot | None:
    values = [v for v in values if isinstance(v, (int, float))]
    rejected = [v for v in (rejected or []) if isinstance(v, (int, float))]
    if not values and not rejected:
        return None
    fig, ax = plt.subplots(figsize=(4.4, 2.6))
    lo, hi = min(values + rejected), max(values + rejected)
    edges = _edges(lo, hi, bins)
    data, labels, colors = [], [], []
    if values:
        data.append(values), labels.append("accepted"), colors.append(ACCEPTED)
    if rejected:
        data.append(rejected), labels.append("rejected"), colors.append(PALETTE[3])
    ax.hist(data, bins=edges, stacked=True, color=colors, label=labels)
    if all(float(v).is_integer() for v in values + rejected) and hi - lo < 20:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    if len(data) > 1:
        ax.legend(fontsize=7, frameon=False)
    return _finish(fig, name, title, len(values) + len(rejected))


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if hi == lo:
        return [lo - 0.5, hi + 0.5]
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo + 1 <= bins:
        return [x - 0.5 for x in range(lo, hi + 2)]
    step = (hi - lo) / bins
    return [lo + i * step for i in range(bins + 1)]


def bars(name: str, title: str, counts: dict[str, float], xlabel: str = "", sort: bool = True,
         percent: bool = False, note: str = "") -> Plot | None:
    """Horizontal bars of `counts` (the MAX_BARS largest when sorted); a count of 0 is drawn as no bar."""
    items = list(counts.items())
    if not items or not any(v for _, v in items):
        return None
    if sort:
        items.sort(key=lambda kv: (-kv[1], str(kv[0])))
    if len(items) > MAX_BARS:
        note = (note + " " if note else "") + f"The {MAX_BARS} largest of {len(items)}."
        items = items[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(4.8, 0.28 * len(items) + 1.1))
    ys = list(range(len(items)))[::-1]
    ax.barh(ys, [v for _, v in items], color=PALETTE[0])
    for y, (_, v) in zip(ys, items):
        ax.text(v, y, f" {v:.0%}" if percent else f" {v:,.0f}", va="center", fontsize=7)
    ax.set_yticks(ys, [_label(k) for k, _ in items])
    ax.set_xlabel(xlabel)
    top = max(v for _, v in items)
    ax.set_xlim(0, (1.0 if percent else top) * 1.2 or 1)
    return _finish(fig, name, title, sum(1 for _, v in items if v), note)


def grouped(name: str, title: str, groups: dict[str, dict[str, float]], xlabel: str = "") -> Plot | None:
    """Horizontal bars per category, one colour per series (e.g. target vs published count per label)."""
    cats = sorted({c for g in groups.values() for c in g})
    if not cats or not any(v for g in groups.values() for v in g.values()):
        return None
    fig, ax = plt.subplots(figsize=(4.8, 0.45 * len(cats) * max(1, len(groups)) / 1.5 + 1.2))
    height = 0.8 / len(groups)
    points = 0
    for i, (series, values) in enumerate(groups.items()):
        ys = [len(cats) - 1 - j + (len(groups) / 2 - i - 0.5) * height for j in range(len(cats))]
        vals = [values.get(c, 0) for c in cats]
        ax.barh(ys, vals, height=height, color=PALETTE[i % len(PALETTE)], label=series)
        points += sum(1 for v in vals if v)
    ax.set_yticks(range(len(cats))[::-1], [_label(c) for c in cats])
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, frameon=False)
    return _finish(fig, name, title, points)
