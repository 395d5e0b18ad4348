"""The shipped full GLAN taxonomy (data/glan/taxonomy_full.yaml): it loads, has the paper's breadth with no
discipline named twice, the seven fields in order, at least two disciplines per sub-field, and
configs/glan_full.yaml points at it. No model is needed."""
from __future__ import annotations

from collections import Counter

import pytest
import yaml

from engine.methods.glan import load_taxonomy
from tests.conftest import ROOT

FULL = ROOT / "data" / "glan" / "taxonomy_full.yaml"
FIELDS = ["Humanities", "Social Sciences", "Natural Sciences", "Formal Sciences", "Engineering and Technology",
          "Medicine and Health", "Professions and Arts"]


def test_full_taxonomy_loads_broad_and_unique():
    ds = load_taxonomy(FULL)
    assert len(ds) >= 100
    twice = [n for n, c in Counter(d.name.casefold() for d in ds).items() if c > 1]
    assert not twice, f"disciplines named more than once: {twice}"
    assert list(dict.fromkeys(d.field for d in ds)) == FIELDS


def test_full_taxonomy_subfields_have_two_disciplines():
    sizes = Counter((d.field, d.subfield) for d in load_taxonomy(FULL))
    small = [f"{f} / {s}" for (f, s), n in sizes.items() if n < 2]
    assert not small, f"sub-fields with fewer than 2 disciplines: {small}"


def test_glan_full_config_uses_full_taxonomy():
    config = ROOT / "configs" / "glan_full.yaml"
    if not config.is_file():
        pytest.skip("configs/glan_full.yaml does not exist")
    params = (yaml.safe_load(config.read_text()) or {}).get("params") or {}
    assert str(params.get("taxonomy_file", "")).endswith("taxonomy_full.yaml")
    assert (config.parent / params["taxonomy_file"]).resolve() == FULL.resolve()
