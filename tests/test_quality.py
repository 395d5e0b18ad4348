"""Quality filters: dedup, decontamination, diversity, card features. No model needed."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from engine.quality import DecontamFile, QualityConfig, QualityError, apply_filters
from engine.quality.card import features
from engine.quality.decontam import build_index
from engine.quality.dedup import exact_duplicates, near_duplicates, normalize, shingles
from engine.quality.diversity import distinct_n, length_stats, self_bleu

VOCAB = [f"w{i}" for i in range(800)]


def random_text(seed: int, n_words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n_words)) + "."


def test_normalize_and_shingles():
    assert normalize("  Hello,   World!! Don't\n") == "hello world dont"
    assert shingles("a b c d", 3) == {"a b c", "b c d"}
    assert shingles("A b", 3) == {"a b"}
    assert shingles("!!", 3) == set()


def test_normalize_is_idempotent_and_its_ascii_path_is_the_regex_one():
    """Publishing normalizes each text once and hands the result to every filter and to the diversity
    figures: that is the same only if normalizing twice changes nothing. And ASCII text takes str.translate,
    which must give what the regex does."""
    import re
    from engine.quality import dedup
    pieces = ["a", "Z", "9", "_", " ", "\t", "\n", "\r", "\x0b", "\x0c", ",", ".", "'", "-", "$", "%", "(", "~",
              "\u00e9", "\u00df", "\u0130", "\u0301", "\u00a0", "\u2003", "\u3000", "\u2028", "\u00bd", "\u2160",
              "\u03a3", "\u0640", "\u200b", "\ufb03", "\u1e9e", "\U0001d400", "\u2014", "\u00ad"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(20_000)]
    texts += ["".join(chr(rng.randrange(0x3000)) for _ in range(20)) for _ in range(5_000)]
    regex = re.compile(r"[^\w\s]")
    for text in texts:
        once = normalize(text)
        assert normalize(once) == once, (text, once)
        if text.isascii():
            assert once == " ".join(regex.sub("", text.casefold()).split()), text
    assert dedup.words("A cat, a hat.") == normalize("A cat, a hat.").split()


def test_filters_of_normalized_texts_remove_what_they_do_of_raw_ones(tmp_path):
    from engine.quality import Filters
    bench, brows = write_bench(tmp_path)
    near = random_text(20).split()
    near[-2] = "other"
    items = sorted([("a", random_text(20)), ("b", "  " + random_text(20).upper() + "!!"), ("c", " ".join(near)),
                    ("d", random_text(21) + " " + brows[0]["question"]), ("e", random_text(22))])
    cfg = QualityConfig(decontam_files=[DecontamFile(path=str(bench), columns=["question"])])
    raw = Filters(cfg)(items)
    normalized = Filters(cfg)([(k, normalize(t)) for k, t in items], normalized=True)
    assert [(r.key, r.reason) for r in raw] == [("b", "exact_duplicate"), ("c", "near_duplicate"),
                                                 ("d", "contaminated")]
    assert raw == normalized


def test_exact_duplicates_keep_first_key():
    items = [("a", "Hi there!"), ("b", "hi   THERE"), ("c", "bye"), ("d", "HI, there")]
    assert exact_duplicates(items) == {"b": "a", "d": "a"}


def test_near_duplicate_one_word_changed():
    base = random_text(1)
    words = base.split()
    words[60] = "CHANGED"
    items = sorted([("k1", base), ("k2", " ".join(words)), ("k3", random_text(2)), ("k4", random_text(3))])
    removed = near_duplicates(items, threshold=0.85, num_perm=128, shingle=5, seed=0)
    assert list(removed) == ["k2"]
    kept, jaccard = removed["k2"]
    assert kept == "k1" and 0.85 <= jaccard <= 1.0


def write_bench(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"question": random_text(100, 20), "answer": "4"},
            {"question": random_text(101, 20), "answer": "yes"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path, rows


def test_filters_planted_cases(tmp_path):
    bench, brows = write_bench(tmp_path)
    leaked = " ".join(brows[1]["question"].split()[3:16])  # 13 consecutive benchmark words
    near = random_text(10).split()
    near[50] = "different"
    items = sorted([
        ("a1", random_text(10)),
        ("a2", random_text(10).upper()),            # exact duplicate of a1 after normalization
        ("a3", " ".join(near)),                      # near duplicate of a1
        ("b1", random_text(11) + " " + leaked),      # contaminated
        ("c1", random_text(12)), ("c2", random_text(13)),  # distinct: kept
    ])
    cfg = QualityConfig(decontam_files=[DecontamFile(path=str(bench), columns=["question", "answer"])])
    got = {r.key: r for r in apply_filters(items, cfg)}
    assert set(got) == {"a2", "a3", "b1"}
    assert (got["a2"].reason, got["a2"].duplicate_of) == ("exact_duplicate", "a1")
    assert (got["a3"].reason, got["a3"].duplicate_of) == ("near_duplicate", "a1")
    assert got["a3"].detail.startswith("jaccard=")
    assert (got["b1"].reason, got["b1"].duplicate_of) == ("contaminated", f"{bench}#1")
    assert got["b1"].detail == f"question: {normalize(leaked)}"


def test_duplicate_of_always_names_a_kept_row(tmp_path):
    bench, brows = write_bench(tmp_path)
    text = random_text(5) + " " + brows[0]["question"]
    items = [("a", text), ("b", text)]  # both contaminated: neither may point at the other
    cfg = QualityConfig(decontam_files=[DecontamFile(path=str(bench), columns=["question"])])
    assert [(r.key, r.reason) for r in apply_filters(items, cfg)] == [("a", "contaminated"), ("b", "contaminated")]


def test_decontam_parquet_small_ngram_and_short_texts(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"q": ["the quick brown fox jumps", "no"], "choices": [["x y", "z"], ["a"]]}), path)
    index = build_index([(str(path), ["q", "choices"])], n=3)
    assert index.rows == 4 and index.too_short == 2  # "no" and "a" have fewer than 3 words; "x y z" has 3
    m = index.find("Look: THE quick, brown dog")
    assert (m.source, m.column, m.ngram) == (f"{path}#0", "q", "the quick brown")
    assert index.find("quick brown dog") is None


def test_decontam_errors_are_clear(tmp_path):
    bench, _ = write_bench(tmp_path)
    missing = QualityConfig(decontam_files=[{"path": str(tmp_path / "nope.jsonl"), "columns": ["q"]}])
    with pytest.raises(QualityError, match="decontam file not found: .*nope.jsonl"):
        missing.check_files()
    bad_col = QualityConfig(decontam_files=[{"path": str(bench), "columns": ["prompt"]}])
    with pytest.raises(QualityError, match="no column 'prompt' \\(its columns: question, answer\\)"):
        apply_filters([("a", "x")], bad_col)
    csv = tmp_path / "b.csv"
    csv.write_text("q\n")
    with pytest.raises(QualityError, match="unsupported format"):
        QualityConfig(decontam_files=[{"path": str(csv), "columns": ["q"]}]).check_files()


def test_quality_config_validation():
    with pytest.raises(ValidationError, match=r"near_threshold must be in \(0, 1\], got 0"):
        QualityConfig(near_threshold=0)
    with pytest.raises(ValidationError, match="shingle must be > 0, got 0"):
        QualityConfig(shingle=0)
    with pytest.raises(ValidationError, match="extra"):
        QualityConfig(near_treshold=0.9)
    with pytest.raises(ValidationError, match="at least one column"):
        DecontamFile(path="x.jsonl", columns=[])


def test_diversity_figures():
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert distinct_n([["a", "b"], ["a", "b"]], 1) == 0.5
    assert distinct_n([[]], 1) == 0.0
    same = [["the", "cat", "sat", "on", "the", "mat"]] * 4
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = [[f"d{i}w{j}" for j in range(10)] for i in range(5)]
    assert self_bleu(disjoint) < 0.05
    assert self_bleu([["only"]]) is None
    assert length_stats([5, 1, 3, 2, 4]) == {"mean": 3.0, "p50": 3, "p90": 5, "min": 1, "max": 5}


def test_diversity_of_normalized_texts_is_that_of_raw_ones():
    """Publishing hands the diversity figures normalized texts and lets unsampled ones be counted, not split:
    the report must be the one of the raw texts, sampled or not, empty texts included."""
    from engine.quality.diversity import Diversity
    rng = random.Random(3)
    texts = [" ".join(rng.choice(["A", "b,", "c!", "d", "  e", "\tF."]) for _ in range(rng.randint(0, 12)))
             for _ in range(3000)] + ["", "!!", "   "]
    for sample, distinct_sample in ((50, 400), (5000, 5000)):
        raw = Diversity(len(texts), sample=sample, distinct_sample=distinct_sample, seed=1)
        norm = Diversity(len(texts), sample=sample, distinct_sample=distinct_sample, seed=1)
        for text in texts:
            raw.add(text)
            norm.add(normalize(text), normalized=True)
        assert norm.report() == raw.report()


def test_card_features_match_datasets():
    datasets = pytest.importorskip("datasets")
    schema = pa.schema([("key", pa.string()), ("n", pa.int64()), ("x", pa.float64()), ("ok", pa.bool_()),
                        ("tags", pa.list_(pa.string())),
                        ("obj", pa.struct([("a", pa.int64()), ("b", pa.list_(pa.struct([("c", pa.string())])))]))])
    assert features(schema) == datasets.Features.from_arrow_schema(schema)._to_yaml_list()
