"""`sdg report RUN_DIR [--out FILE.html]`: one self-contained HTML page about a run, finished or in progress.

    path = write_report(Path("runs/tdg-demo"))        # runs/tdg-demo.report.html

What it shows (engine/report/data.py reads it, committed shards only, writing nothing into the run directory):
the acceptance funnel per stage (accepted, rejected by reason, then published after dedup and decontamination),
throughput over time per commit and replica (stats/<writer>.commits.jsonl), output-length histograms and
truncation rates per model stage, the method's own figures (engine/report/methods.py), diversity and
decontamination hits by source file, and sample rows, accepted and rejected with their reasons.

Figures are matplotlib SVGs embedded as data: URIs; the page has no script and loads nothing (page.py).
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from pathlib import Path

import engine.report.plots as plots
from engine.report.data import ReportError, RunData, read_run
from engine.report.methods import section, wanted

__all__ = ["ReportError", "build_html", "write_report", "default_path"]

SAMPLE_CHARS = 4000  # characters of one sample row shown (the rest is elided, with a count)


def default_path(run_dir: Path) -> Path:
    """Beside the run directory, not inside it: a report of a run in progress adds nothing to the run."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.report.html"


def write_report(run_dir: Path, dest: Path | None = None) -> Path:
    dest = Path(dest) if dest is not None else default_path(run_dir)
    html = build_html(run_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(dest)
    return dest


def _n(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def build_html(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    method = _method(run_dir)
    run = read_run(run_dir, wanted=wanted(method))
    return _render(run)


def _method(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "config.json").read_text())["config"].get("method") or "")
    except (OSError, ValueError, KeyError, AttributeError):
        raise ReportError(f"{run_dir} is not a run directory (no readable config.json)") from None


MIN_INTERVAL = 2.0
"""Seconds a throughput point spans at least: commits closer together (a stage's last rows, then its stats)
are merged into one interval, so that a rate is not a count divided by a few milliseconds."""


def _throughput_series(run: RunData) -> dict[str, list[tuple[float, float, float]]]:
    """Per writer: (t since the run's first commit, output tok/s, rows/s) over each interval between its
    commits (intervals shorter than MIN_INTERVAL merged with the next). A writer's first commit starts its
    first interval (what came before it, an engine start included, is not a rate)."""
    if not run.commits:
        return {}
    t0 = run.commits[0]["time"]
    start: dict[str, tuple[float, float, int]] = {}  # writer -> (time, cumulative tokens, rows since then)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for c in run.commits:
        w = c["writer"]
        tokens = sum(float(s.get("output_tokens", 0)) for s in (c.get("stages") or {}).values()
                     if isinstance(s, dict))
        rows = sum((c.get("rows") or {}).values()) + sum((c.get("rejects") or {}).values())
        if w not in start:
            start[w] = (c["time"], tokens, 0)
            continue
        t_prev, tok_prev, rows_prev = start[w]
        dt = c["time"] - t_prev
        if dt < MIN_INTERVAL:
            start[w] = (t_prev, tok_prev, rows_prev + rows)
            continue
        series.setdefault(w, []).append((c["time"] - t0, max(tokens - tok_prev, 0) / dt, (rows_prev + rows) / dt))
        start[w] = (c["time"], tokens, 0)
    return series


def _render(run: RunData) -> str:
    from engine.report.page import render
    manifest = run.manifest or {}
    dataset = manifest.get("dataset") or {}
    quality = dataset.get("quality") or {}
    model_stages = [s for s in run.stages.values() if s.model]
    gen_out = sum(s.stats.get("output_tokens", 0) for s in model_stages)
    # the engines' generate loops, per writer (stages streaming together overlap: their seconds do not add up)
    generating = sum(float(t.get("generating_seconds", 0)) for t in run.writer_totals.values())

    # -- overview
    identity = manifest.get("identity") or {}
    model = (identity.get("model") or {}).get("name") if isinstance(identity.get("model"), dict) else None
    model = model or run.config.get("model") or "the embedded model"
    cards = [("published rows", _n(dataset.get("num_rows")) if run.published else "not yet"),
             ("stages", len(run.stages)),
             ("model requests", _n(sum(int(s.stats.get("generated", 0)) for s in model_stages))),
             ("output tokens", _n(int(gen_out))),
             ("output tok/s", _n(round(gen_out / generating, 1)) if generating else "-"),
             ("commits", _n(len(run.commits))),
             ("replicas (writers)", len({c["writer"] for c in run.commits}) or "-")]
    stage_rows = []
    for s in run.stages.values():
        st = s.stats
        seconds = st.get("seconds") or 0
        stage_rows.append((s.name, "model" if s.model else "computed", _n(s.rows), _n(s.rejects),
                           _pct(s.rows, s.settled), _n(int(st.get("prompt_tokens", 0))) if s.model else "-",
                           _n(int(st.get("output_tokens", 0))) if s.model else "-",
                           (_n(round(seconds, 1)) if seconds >= 0.05 else "< 0.1") if seconds else "-",
                           _n(round(st.get("output_tokens", 0) / seconds, 1)) if s.model and seconds else "-"))
    stage_table = ("Stages", ["stage", "kind", "accepted", "rejected", "acceptance", "prompt tokens",
                              "output tokens", "seconds", "output tok/s"], stage_rows)

    # -- funnel
    publish_stage = dataset.get("final_stage")
    removed = Counter(r["reason"] for r in run.removals)
    published = None
    if run.published and publish_stage:
        published = (int(dataset.get("num_rows") or 0), dict(removed))
    funnel = plots.funnel([(s.name, s.rows, dict(s.reasons)) for s in run.stages.values()], published)
    reason_rows = [(s.name, reason, _n(n), _pct(n, s.settled))
                   for s in run.stages.values() for reason, n in s.reasons.most_common()]
    reason_table = ("Rejects by reason", ["stage", "reason", "rejects", "share of the stage"], reason_rows) \
        if reason_rows else None
    publish_table = None
    if run.published:
        inputs = quality.get("input_rows", run.stages[publish_stage].rows if publish_stage in run.stages else None)
        publish_table = (f"Publishing (stage {publish_stage})", ["step", "rows"],
                         [("accepted rows", _n(inputs))]
                         + [(f"removed: {k.replace('_', ' ')}", _n(quality.get(k, removed.get(k, 0))))
                            for k in ("contaminated", "exact_duplicate", "near_duplicate")]
                         + [("published", _n(dataset.get("num_rows")))])

    # -- throughput
    series = _throughput_series(run)
    throughput = plots.throughput(series)
    writers = {}
    for c in run.commits:
        w = writers.setdefault(c["writer"], {"commits": 0, "first": c["time"], "last": c["time"], "rows": 0})
        w["commits"] += 1
        w["last"] = c["time"]
        w["rows"] += sum((c.get("rows") or {}).values()) + sum((c.get("rejects") or {}).values())
    writer_table = ("Commits per replica", ["writer", "commits", "rows and rejects committed", "first", "last"],
                    [(w, v["commits"], _n(v["rows"]), _time(v["first"]), _time(v["last"]))
                     for w, v in sorted(writers.items())]) if writers else None
    throughput_note = ("No commit recorded yet." if not run.commits else
                       "Each replica committed once: a rate needs two commits (commits come every "
                       "commit_rows rows or commit_seconds seconds).")

    # -- lengths and truncation
    length_plots, trunc_rows, no_lengths = [], [], []
    for s in model_stages:
        p = plots.histogram(f"lengths-{s.name}", f"Output tokens: {s.name}", s.lengths, s.reject_lengths,
                            xlabel="output tokens")
        if p:
            length_plots.append(p)
        elif s.settled:
            no_lengths.append(s.name)
        lengths = s.lengths + s.reject_lengths
        generated = s.stats.get("generated") or 0
        mean = (sum(lengths) / len(lengths) if lengths else
                s.stats.get("output_tokens", 0) / generated if generated else None)
        truncated = _n(s.truncated) + ("" if s.finish_known or not s.rows_read else " (rejects only)")
        trunc_rows.append((s.name, _n(s.settled), truncated, _pct(s.truncated, s.settled),
                           _n(round(mean, 1)) if mean is not None else "-", _n(max(lengths)) if lengths else "-"))
    truncation_table = ("Truncation (cut off by max_tokens: rejects 'truncated' and rows with finish_reason "
                        "'length')", ["stage", "outputs", "truncated", "rate", "mean output tokens", "max"],
                        trunc_rows) if trunc_rows else None
    length_note = (f"Rows of {', '.join(no_lengths)} record no output_tokens: no histogram (mean output tokens "
                   "from the stage's stats; truncation from rejects only where rows record no finish_reason)."
                   if no_lengths else "")

    # -- diversity, decontamination
    diversity = dataset.get("diversity") or {}
    diversity_table = None
    if run.published:
        inputs = quality.get("input_rows") or 0
        lengths = diversity.get("length_words") or {}
        diversity_table = ("Diversity of the published rows", ["figure", "value"], [
            ("distinct-1", _n(diversity.get("distinct_1"))), ("distinct-2", _n(diversity.get("distinct_2"))),
            ("distinct-3", _n(diversity.get("distinct_3"))),
            ("Self-BLEU (0-1, lower is more diverse)", _n(diversity.get("self_bleu"))),
            ("near-duplicate rate", _pct(int(quality.get("near_duplicate", 0)), inputs)),
            ("exact-duplicate rate", _pct(int(quality.get("exact_duplicate", 0)), inputs)),
            ("words per row: mean / p50 / p90", " / ".join(_n(lengths.get(k)) for k in ("mean", "p50", "p90")))])
    files = [f.get("path") for f in ((quality.get("config") or {}).get("decontam_files") or [])
             if isinstance(f, dict)]
    hits = Counter(str(r["duplicate_of"] or "?").rsplit("#", 1)[0] for r in run.removals
                   if r["reason"] == "contaminated")
    decontam_counts = {str(f): hits.get(str(f), 0) for f in files}
    for source, n in hits.items():
        decontam_counts.setdefault(source, n)
    decontam_plot = plots.bars("decontam", "Decontamination hits by source file", decontam_counts,
                               xlabel="rows removed")
    decontam_table = ("Decontamination hits by source file", ["source file", "rows removed"],
                      [(f, _n(n)) for f, n in sorted(decontam_counts.items())]) if decontam_counts else None
    quality_notes = []
    if run.published and not files:
        quality_notes.append("No decontamination file is configured (quality.decontam_files).")
    elif run.published and not hits:
        quality_notes.append("No row matched a decontamination file.")

    # -- samples
    samples = []
    for s in run.stages.values():
        if s.samples or s.reject_samples:
            samples.append({"name": s.name, "rows": [_show(r) for r in s.samples],
                            "rejects": [{"reason": r["reason"], "row": _show(r["row"])} for r in s.reject_samples]})

    name = manifest.get("name") or run.out.name
    return render(
        name=name, method=run.method, out=str(run.out), generated_at=_dt.datetime.now().isoformat(timespec="seconds"),
        cards=cards, in_progress=run.in_progress, published=run.published, model=model, stage_table=stage_table,
        funnel=funnel, reason_table=reason_table, publish_table=publish_table, throughput=throughput,
        throughput_note=throughput_note, writer_table=writer_table, length_plots=length_plots,
        truncation_table=truncation_table, length_note=length_note, method_section=section(run), diversity_table=diversity_table,
        decontam_plot=decontam_plot, decontam_table=decontam_table, quality_notes=quality_notes, samples=samples)


def _time(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _show(row) -> str:
    """A row as indented JSON, long ones elided; autoescaping makes it text in the page."""
    text = json.dumps(row, ensure_ascii=False, indent=1, default=str)
    if len(text) > SAMPLE_CHARS:
        text = text[:SAMPLE_CHARS] + f"\n… ({len(text) - SAMPLE_CHARS:,} more characters)"
    return text
