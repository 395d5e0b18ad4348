"""The dataset card (README.md) of a published run, rendered from its manifest alone, so every number on
the card is the manifest's number.

The YAML header follows the Hugging Face dataset card format (`configs` pointing at data/*.parquet,
`dataset_info` with features, split sizes), so the Hub viewer and `load_dataset(OUT)` read it.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import yaml

# arrow type -> Hugging Face `datasets` dtype name, where the two differ
_DTYPE_NAMES = {pa.float64(): "float64", pa.float32(): "float32", pa.float16(): "float16", pa.bool_(): "bool",
                pa.string(): "string", pa.large_string(): "large_string", pa.null(): "null"}


def _feature_type(t: pa.DataType) -> tuple[str, Any]:
    """("dtype", "int64") | ("list", ...) | ("struct", [...]) as `datasets` writes it in a card."""
    if pa.types.is_struct(t):
        return "struct", [feature(t.field(i)) for i in range(t.num_fields)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_type
        if pa.types.is_struct(inner):
            return "list", [feature(inner.field(i)) for i in range(inner.num_fields)]
        kind, spec = _feature_type(inner)
        return "list", spec if kind == "dtype" else {kind: spec}
    return "dtype", _DTYPE_NAMES.get(t, str(t))


def feature(f: pa.Field) -> dict:
    """`feature(pa.field("n", pa.int64())) -> {'name': 'n', 'dtype': 'int64'}`."""
    kind, spec = _feature_type(f.type)
    return {"name": f.name, kind: spec}


def features(schema: pa.Schema) -> list[dict]:
    """The `dataset_info.features` list of a card for an arrow schema."""
    return [feature(schema.field(i)) for i in range(len(schema))]


def front_matter(manifest: dict) -> dict:
    """The YAML header as a dict (the card test reads it back to compare with the shards)."""
    ds = manifest["dataset"]
    return {
        "pretty_name": manifest.get("name") or "synthetic dataset",
        "tags": ["synthetic"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "dataset_info": {
            "features": ds["features"],
            "splits": [{"name": "train", "num_bytes": ds["num_bytes"], "num_examples": ds["num_rows"]}],
            "download_size": ds["download_size"],
            "dataset_size": ds["num_bytes"],
        },
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _config_summary(config: dict) -> str:
    """Top-level scalar settings; nested sections are only named (they are in manifest.json)."""
    rows = [[f"`{k}`", f"`{v}`" if not isinstance(v, (dict, list)) else "(see manifest.json)"]
            for k, v in config.items()]
    return _table(["setting", "value"], rows) if rows else "(empty config)"


def _stages(manifest: dict) -> str:
    stat_names = sorted({k for s in manifest["stages"].values() for k in s["stats"]})
    rows = [[name, s["rows"], s["rejects"]] + [s["stats"].get(k) for k in stat_names]
            for name, s in manifest["stages"].items()]
    out = [_table(["stage", "rows", "rejects"] + stat_names, rows), ""]
    for name, s in manifest["stages"].items():
        if s["rejects_by_reason"]:
            reasons = ", ".join(f"{r}: {n}" for r, n in s["rejects_by_reason"].items())
            out.append(f"- rejects of `{name}` by reason: {reasons}")
    return "\n".join(out)


def _gates(manifest: dict) -> str:
    """Every quality gate that ran, per stage, with its rejects (zeros included) and what it checks."""
    from engine.quality.gates import DESCRIPTIONS
    gates = manifest.get("gates") or {}
    if not gates:
        return "No quality gate ran."
    rows = [[f"`{stage}`", f"`{gate}`", n, DESCRIPTIONS.get(gate, "")]
            for stage, counts in gates.items() for gate, n in counts.items()]
    c = ((manifest.get("dataset") or {}).get("quality") or {}).get("config") or {}
    settings = (f" Settings: `cut_at_max_length` {'on' if c['max_length_gate'] else 'off'}; `repetition` "
                f"{'on' if c['repetition_gate'] else 'off'} (rejects above {c['repetition_threshold']} repeated "
                f"{c['repetition_ngram']}-grams)." if "repetition_gate" in c else "")
    return ("Checks a generated row had to pass before it was accepted (engine/quality/gates.py); a row failing "
            "one is a reject of its stage, in `rejects/<stage>/` with the gate's code as its reason. A count of 0: "
            "the gate ran and rejected nothing." + settings + "\n\n"
            + _table(["stage", "gate", "rejects", "what it rejects"], rows))


def _quality(q: dict) -> str:
    c = q["config"]
    settings = (f"Exact dedup on normalized text: {'on' if c['exact_dedup'] else 'off'}. "
                f"Near dedup (MinHash LSH, {c['num_perm']} permutations, {c['shingle']}-word shingles, "
                f"Jaccard >= {c['near_threshold']}): {'on' if c['near_dedup'] else 'off'}. "
                f"Decontamination ({c['decontam_ngram']}-gram overlap) against: "
                + (", ".join(f"`{f['path']}` ({', '.join(f['columns'])})" for f in c["decontam_files"]) or "none")
                + ". Removed rows are in `rejects/_quality/` with their reason and `duplicate_of`.")
    table = _table(["input rows", "contaminated", "exact duplicates", "near duplicates", "published"],
                   [[q["input_rows"], q["contaminated"], q["exact_duplicate"], q["near_duplicate"], q["kept_rows"]]])
    return settings + "\n\n" + table


def _diversity(d: dict) -> str:
    ln = d["length_words"]
    return (_table(["distinct-1", "distinct-2", "distinct-3", "Self-BLEU", "words: mean", "p50", "p90", "min", "max"],
                   [[d["distinct_1"], d["distinct_2"], d["distinct_3"], d["self_bleu"], ln["mean"], ln["p50"],
                     ln["p90"], ln["min"], ln["max"]]])
            + f"\n\ndistinct-n over {d['distinct_rows']} rows, Self-BLEU (BLEU-4, 0-1) over a seeded sample of "
              f"{d['self_bleu_rows']} rows, lengths in words over all rows.")


def render(manifest: dict) -> str:
    """The whole README.md for a finalized manifest."""
    ds = manifest["dataset"]
    identity = manifest.get("identity") or {}
    ident = "\n".join(f"- {k}: `{v}`" for k, v in identity.items()) or "- (no identity recorded)"
    parts = [
        "---\n" + yaml.safe_dump(front_matter(manifest), sort_keys=False, allow_unicode=True) + "---",
        f"# {manifest.get('name') or 'Synthetic dataset'}",
        f"{ds['num_rows']} rows generated by the `sdg` synthetic-data engine, published from stage "
        f"`{ds['final_stage']}` (text fields: {', '.join(ds['text_fields'])}).",
        "## How it was generated",
        f"Config hash `{manifest['config_hash']}`, seed `{manifest.get('seed')}`, created {manifest['created']}, "
        f"last commit {manifest['updated']}. The full config is in `manifest.json`.",
        _config_summary(manifest["config"]),
        "Engine and model:\n\n" + ident,
        "## Stages",
        _stages(manifest),
        "## Quality gates",
        _gates(manifest),
        "## Quality filters",
        _quality(ds["quality"]),
        "## Diversity",
        _diversity(ds["diversity"]),
        "## Files",
        "- `data/*.parquet`: the dataset\n- `rejects/<stage>/`: rows rejected during generation, with reasons\n"
        "- `rejects/_quality/`: rows removed by the quality filters\n- `manifest.json`: config, counts, "
        "checksums, statistics\n- `stages/`: the run's committed shards (used to resume)",
        "```python\nfrom datasets import load_dataset\nds = load_dataset(\"parquet\", data_files=\"data/*.parquet\")\n```",
    ]
    if manifest["quarantined"]:
        parts.insert(-2, f"{len(manifest['quarantined'])} corrupted shard(s) were quarantined and their rows "
                         "regenerated (see `quarantine/`).")
    return "\n\n".join(parts) + "\n"
