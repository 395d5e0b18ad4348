"""Quality gates (engine/quality/gates.py): each gate fires on a planted bad case and not on a good row; the core
commits a row failing one as a reject with the gate's code; the manifest and the card count every gate that ran,
zeros included. The judge stage (engine.pipeline.run.add_judge) scores rows under a choice constraint.

Pure-Python tests first (a scripted backend stands in for the model where the core is exercised); the last two
use the session's real vLLM engine on the embedded model."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.config import JudgeSettings, RunConfig
from engine.constraints import Constraint
from engine.methods import glan, targen
from engine.pipeline.core import Executor, result_row
from engine.pipeline.stages import Generate, Pipeline, Publish
from engine.quality import QualityConfig, gates
from engine.quality.card import render
from engine.request import Request, Result, Sampling
from engine.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
PERSON = json.loads((ROOT / "grammars" / "examples" / "person.schema.json").read_text())


def result_of(request: Request, text: str, finish_reason: str = "stop") -> Result:
    """The Result a backend would return for `text` (checked against the request's constraint, as backends do)."""
    valid, parsed, reason = (request.constraint.check(text, finish_reason) if request.constraint is not None
                             else (True, text, None))
    return Result(key=request.key, text=text, parsed=parsed, prompt_tokens=3, output_tokens=len(text.split()),
                  finish_reason=finish_reason, valid=valid, reason=reason, meta=request.meta)


def chat(text: str, constraint: Constraint | None = None, **meta) -> Request:
    return Request.build(stage="t", model="m", messages=[{"role": "user", "content": text}], constraint=constraint,
                         meta=meta)


# ------------------------------------------------------------------------------------------ a. cut at maxLength

def test_cut_at_max_length_fires_on_a_string_at_its_limit_only():
    cut = {"name": "Savon", "age": 40, "occupation": "Baker", "hobbies": ["Bread", "The best way to describe my go"]}
    good = {**cut, "hobbies": ["Bread", "Long walks by the sea"]}
    assert len(cut["hobbies"][1]) == 30  # the schema's items maxLength: the grammar closed the string there
    assert gates.cut_at_max_length(cut, PERSON) == "cut_at_max_length: hobbies[1]"
    assert gates.cut_at_max_length(good, PERSON) is None
    # found through $ref, anyOf and prefixItems too
    schema = {"$defs": {"s": {"type": "string", "maxLength": 5}},
              "type": "object", "properties": {"a": {"$ref": "#/$defs/s"},
                                               "b": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
                                               "c": {"type": "array", "prefixItems": [{"maxLength": 3}]}}}
    assert gates.cut_strings({"a": "abcde", "b": "abcd", "c": ["abc"]}, schema) == ["a", "b", "c[0]"]
    assert gates.cut_strings({"a": "abcd", "b": None, "c": ["ab"]}, schema) == []


def test_the_core_applies_cut_at_max_length_to_json_requests():
    g = gates.Gates(QualityConfig())
    request = chat("Describe a baker.", Constraint.json_schema(PERSON))
    bad = json.dumps({"name": "Savon", "age": 40, "occupation": "Baker", "hobbies": ["The best way to describe my go"]})
    good = json.dumps({"name": "Savon", "age": 40, "occupation": "Baker", "hobbies": ["Bread"]})
    assert g.check(request, result_of(request, bad)) == "cut_at_max_length: hobbies[0]"
    assert g.check(request, result_of(request, good)) is None
    assert gates.Gates(QualityConfig(max_length_gate=False)).check(request, result_of(request, bad)) is None
    assert gates.Gates(QualityConfig(max_length_gate=False)).generic == ("repetition",)


# ------------------------------------------------------------------------------------------ e. repetition

LOOP = "The baker bakes bread every day. " * 5
PROSE = ("The baker wakes before dawn, kneads the dough for the morning loaves, and opens the shop at seven, "
         "when the first customers arrive for warm rolls and coffee.")


def test_repetition_fires_on_a_loop_and_not_on_prose():
    assert gates.repeated_ngram_fraction(LOOP) > 0.6 and gates.repeated_ngram_fraction(PROSE) == 0.0
    assert gates.repetition(LOOP).startswith("repetition: ")
    assert gates.repetition(PROSE) is None
    assert gates.repetition("la la la la la") is None  # too short to call a loop
    # a JSON output is read as its string values: keys repeated by design do not count
    rows = [{"title": f"Session {i}", "description": d} for i, d in enumerate(PROSE.split(", "))]
    assert gates.repetition(json.dumps(rows), rows) is None
    assert gates.repetition("", {"story": LOOP}) is not None


def test_repetition_threshold_and_switch_come_from_the_quality_config():
    request = chat("Tell me about bakers.")
    two = "The baker bakes bread every day and sells it at the market. " * 2  # said twice: ~0.43 repeated
    assert gates.Gates(QualityConfig()).check(request, result_of(request, two)) is not None
    assert gates.Gates(QualityConfig(repetition_threshold=0.6)).check(request, result_of(request, two)) is None
    assert gates.Gates(QualityConfig(repetition_gate=False)).check(request, result_of(request, LOOP)) is None
    with pytest.raises(ValueError, match=r"repetition_threshold must be in \(0, 1\], got 0"):
        QualityConfig(repetition_threshold=0)


# ------------------------------------------------------------------------------------------ b, c. GLAN

QUESTION_META = {"field": "Science & Engineering", "subfield": "Physical Sciences", "discipline": "Physics",
                 "subject": "Classical Mechanics", "level": "undergraduate"}
QUESTION_PROMPT = ("Course: Classical Mechanics (undergraduate, Physics).\nThe student has learned up to session 2 "
                   "of the syllabus:\n1. Kinematics: motion of a point in one and two dimensions, velocity and "
                   "acceleration as derivatives of position.\n2. Newton's laws: force, mass and acceleration, free "
                   "body diagrams and the net force on a body.\nWrite one homework question on session 2 (Newton's "
                   "laws).\nIt must test these key concepts: net force; free body diagrams.")


def question(text: str) -> tuple[dict, str | None]:
    constraint = glan.SCHEMAS["question"]
    request = chat(QUESTION_PROMPT, constraint, **QUESTION_META)
    return glan.question_row(request, result_of(request, json.dumps({"question": text})))


def test_glan_question_gates():
    assert question("A: 3: Physics: Science & Engineering")[1].startswith("no_content_words")  # the demo's row
    assert question("A box rests on a ramp and friction holds it in place.")[1].startswith("not_a_question")
    echo = "Newton's laws: force, mass and acceleration, free body diagrams and the net force on a body."
    assert question(echo)[1].startswith("echoes_prompt")  # the syllabus, copied
    echo = "Write one homework question on session 2 (Newton's laws). It must test net force."
    assert question(echo)[1].startswith("echoes_prompt")  # the instruction, copied
    assert question("What   is        F?          ")[1] == "too_short"  # 10 characters once spaces collapse
    for good in ("A 2 kg box rests on a 30 degree ramp. Draw its free body diagram and find the net force on it.",
                 "Why does a box on a frictionless ramp accelerate even though the normal force acts on it?",
                 "Given a 5 kg cart pushed with 20 N against 4 N of friction, calculate its acceleration."):
        row, reason = question(good)
        assert reason is None, (good, reason)
        assert row["question"] == good
    assert glan.QUESTION_GATES == ("too_short", "no_content_words", "echoes_prompt", "not_a_question")


def answer(text: str, asked: str) -> str | None:
    request = chat(asked, None, question_key="q", question_index=0, model="m")
    return glan.answer_row(request, result_of(request, text))[1]


def test_glan_answer_gates():
    asked = "What is the net force on a 2 kg block that accelerates at 3 m/s^2?"
    assert answer("I'm sorry, but I cannot answer that question.", asked) == "declined"
    assert answer(asked + " It is a good question.", asked).startswith("repeats_question")
    assert answer("The net force on a 2 kg block that accelerates at 3 m/s^2 is asked.", asked) \
        .startswith("repeats_question")
    assert answer("By Newton's second law F = ma = 2 kg x 3 m/s^2 = 6 N. The net force is 6 N.", asked) is None


# ------------------------------------------------------------------------------------------ d. TarGEN choices

def test_targen_choices_must_differ_from_each_other_and_the_premise():
    spec = targen.load_task(ROOT / "configs" / "targen" / "copa.yaml")
    assert targen.choice_groups(spec) == [["premise", "choice1", "choice2"]]
    parse = targen.instance_row(spec)
    # As step 3 asks it: the seed is the premise and the question is drawn; the model writes the choices
    given = {"premise": "The smoke alarm started to beep.", "question": "cause"}
    request = chat("instance", spec.generation_constraint(True, given), target_label="choice1", given=given)

    def reason(**fields) -> str | None:
        written = {"choice1": "The water in it came to a boil.", "choice2": "Someone painted the kitchen.",
                   "explanation": "Boiling water makes steam."}
        return parse(request, result_of(request, json.dumps({**written, **fields})))[1]

    assert reason() is None
    assert reason(choice2="the water in it came to a BOIL") == "choices_not_distinct: choice1 = choice2"
    assert reason(choice1="the smoke alarm started to beep!") == "choices_not_distinct: premise = choice1"
    # multiple-choice fields found by name when no `distinct` group holds them
    mc = spec.model_copy(update={"fields": {"question": {"type": "string"}, "option_a": {"type": "string"},
                                            "option_b": {"type": "string"}}, "distinct": []})
    assert targen.choice_groups(mc) == [["option_a", "option_b"]]


# ------------------------------------------------------------------------------------------ counts: core, manifest, card

class Scripted:
    """A backend whose output for a request is `script(request)` (no model): the core's path, nothing else."""

    def __init__(self, script) -> None:
        self.script = script

    def preflight(self, requests) -> None:
        pass

    def generate(self, requests):
        for request in requests:
            if request is not None:
                yield result_of(request, self.script(request))

    def identity(self) -> dict:
        return {"backend": "scripted"}


def test_gate_rejects_are_committed_and_counted_in_manifest_and_card(tmp_path):
    outputs = {0: json.dumps({"name": "Ada", "age": 30, "occupation": "Baker", "hobbies": ["Bread"]}),
               1: json.dumps({"name": "Ada", "age": 30, "occupation": "Baker",
                              "hobbies": ["The best way to describe my go"]}),
               2: json.dumps({"name": "Ada", "age": 30, "occupation": LOOP[:40], "hobbies": [LOOP[:30]]})}
    person = Constraint.json_schema(PERSON)

    def request(i: int, seed: int) -> Request:
        return Request.build(stage="people", model="m", prompt=f"Person {i}:", constraint=person, seed=seed,
                             sampling=Sampling(max_tokens=64), meta={"i": i})

    pipeline = Pipeline([Generate("people", items=lambda: [0, 1, 2], request=request, parse=result_row,
                                  gates=("custom",))], Publish("people", ["output"]))
    quality = QualityConfig(exact_dedup=False, near_dedup=False)
    with RunStore.open(tmp_path / "run", {"t": 1}) as store:
        Executor(pipeline, store, {"main": lambda: Scripted(lambda r: outputs[r.meta["i"]])}, quality=quality,
                 progress=False).run()
        manifest = store.finalize("people", quality=quality, text_fields=["output"])
        rejects = {r["row"]["i"]: r["reason"] for r in store.rejects("people")}
    assert rejects == {1: "cut_at_max_length: hobbies[0]", 2: "cut_at_max_length: occupation, hobbies[0]"}
    assert manifest["dataset"]["num_rows"] == 1
    assert manifest["gates"] == {"people": {"cut_at_max_length": 2, "repetition": 0, "custom": 0}}
    assert manifest["stages"]["people"]["gates"] == manifest["gates"]["people"]
    assert not any(k.startswith("gate:") for k in manifest["stages"]["people"]["stats"])
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Quality gates" in card
    assert "| `people` | `cut_at_max_length` | 2 |" in card and "| `people` | `repetition` | 0 |" in card


# ------------------------------------------------------------------------------------------ f. the judge: config

def test_judge_settings_are_checked():
    assert JudgeSettings().threshold == 3 and JudgeSettings(threshold=6).threshold == 6
    with pytest.raises(ValueError, match=r"threshold must be in \[1, scale \+ 1\] = \[1, 6\], got 7"):
        JudgeSettings(threshold=7)
    with pytest.raises(ValueError, match="is not a file under"):
        JudgeSettings(prompt="judge/none.jinja")
    from engine.pipeline.run import build_pipeline, run_payload
    config = RunConfig(method="echo", judge={"threshold": 2})
    pipeline = build_pipeline(config)
    assert pipeline.names == ["first", "second", "judge"] and pipeline.publish.stage == "judge"
    judge = pipeline.stage("judge")
    assert judge.gates == ("judge_below_threshold",) and judge.constraints[0].spec == ("1", "2", "3", "4", "5")
    assert "output: hello" in judge.request({"key": "k", "output": "hello"}, 1).messages[0]["content"]
    # a run without a judge keeps its identity
    model_id = {"fingerprint": "f"}
    assert "judge" not in run_payload(RunConfig(method="echo"), model_id=model_id)
    assert run_payload(config, model_id=model_id)["judge"]["threshold"] == 2


# ------------------------------------------------------------------------------------------ the real engine

def test_real_engine_gate_rejects_in_manifest_and_card(tmp_path, vllm_backend):
    """`sdg generate`'s one-stage pipeline on the real engine: a schema whose string is too short for the
    asked story (cut_at_max_length), a regex that forces a loop (repetition), choices that pass both."""
    from engine.pipeline.run import run_method
    story = {"type": "object", "properties": {"story": {"type": "string", "maxLength": 12}}, "required": ["story"]}
    lines = [{"id": "cut", "prompt": "Write a long story about a dragon who bakes bread.", "schema": story},
             {"id": "loop", "prompt": "Sing.", "regex": "(la la la la ){6}"},
             {"id": "ok", "prompt": "Is bread food? Answer yes or no.", "choices": ["yes", "no"]}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = RunConfig(method="generate", quality={"exact_dedup": False, "near_dedup": False},
                       params={"prompts": str(prompts), "sampling": {"max_tokens": 40, "temperature": 0.0}})
    out, manifest, _ = run_method(config, tmp_path / "run", progress=False, engines={"main": lambda: vllm_backend})
    with _reopen(out) as store:
        rejects = {r["row"]["id"]: r["reason"] for r in store.rejects("generate")}
    assert rejects["cut"] == "cut_at_max_length: story"
    assert rejects["loop"].startswith("repetition: ")
    assert "ok" not in rejects and manifest["dataset"]["num_rows"] == 1
    assert manifest["gates"] == {"generate": {"cut_at_max_length": 1, "repetition": 1}}
    card = (out / "README.md").read_text()
    assert "| `generate` | `cut_at_max_length` | 1 |" in card and "| `generate` | `repetition` | 1 |" in card


def _reopen(out: Path) -> RunStore:
    """A finished run's store, opened again with its own config."""
    return RunStore.open(out, json.loads((out / "config.json").read_text())["config"])


def test_real_engine_judge_scores_rows_and_rejects_below_the_threshold(tmp_path, vllm_backend):
    """Echo's 3 + 3 rows judged by the run's own model: at threshold 1 every row is published with its score
    (a column); at scale + 1 every row is a reject `judge_below_threshold` (so nothing is left to publish),
    counted in the manifest; the card counts the judge's gate."""
    from engine.pipeline.run import run_method
    from engine.store.runs import StoreError

    def config(threshold: int) -> RunConfig:
        return RunConfig(method="echo", params={"prompts": 3}, quality={"exact_dedup": False, "near_dedup": False},
                         judge={"threshold": threshold, "rubric": "a good example is a complete English sentence"})

    out, manifest, _ = run_method(config(1), tmp_path / "t1", progress=False, engines={"main": lambda: vllm_backend})
    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 3 and all(1 <= r["judge_score"] <= 5 for r in rows)
    with _reopen(out) as store:
        assert {r["judged_key"] for r in rows} == {r["key"] for r in store.rows("second")}
    assert manifest["gates"]["judge"] == {"cut_at_max_length": 0, "repetition": 0, "judge_below_threshold": 0}
    assert "| `judge` | `judge_below_threshold` | 0 |" in (out / "README.md").read_text()

    with pytest.raises(StoreError, match=r"nothing to publish: stage 'judge'.*\(3 rejects\)"):
        run_method(config(6), tmp_path / "t6", progress=False, engines={"main": lambda: vllm_backend})
    manifest = json.loads((tmp_path / "t6" / "manifest.json").read_text())  # written at the last commit
    assert manifest["gates"]["judge"]["judge_below_threshold"] == 3
    rejects = [r for f in sorted((tmp_path / "t6" / "rejects" / "judge").glob("*.parquet"))
               for r in pq.read_table(f).to_pylist()]  # read from disk: the failed publish left its store open
    assert len(rejects) == 3 and all(r["reason"].startswith("judge_below_threshold: ") for r in rejects)
    assert all(1 <= json.loads(r["row"])["judge_score"] <= 5 for r in rejects)
