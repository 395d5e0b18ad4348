"""The pipeline core (engine.pipeline): declared stages, streaming between stages, attempts and seeds, stop
points for every method, `sdg generate` as a one-stage pipeline with replicas. Real engine and real store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.pipeline.core import Executor, StopAfterError, check_stop_after, seed_of
from engine.pipeline.run import load_run_config, run_method
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish, Whole
from engine.request import Request, Sampling
from engine.store import RunStore

from conftest import ROOT, committed_keys, sdg

ECHO = """\
method: echo
backend: vllm
seed: 4
store: {commit_rows: 1}
quality: {exact_dedup: false, near_dedup: false}
params:
  prompts: 200
  follow_ups: 1
  sampling: {max_tokens: 4, temperature: 0.0}
"""


def _shard_seqs(out: Path, stage: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "stages" / stage).glob("*.parquet"))


def test_streamed_stage_two_commits_before_stage_one_ends(tmp_path, vllm_backend):
    """Each child request enters the engine as soon as its parent row is committed: with commits of one row,
    stage-2 rows are on disk before stage 1's last row. With streaming off (a barrier after every stage),
    every stage-2 row comes after stage 1's last: the same keys either way."""
    config_path = tmp_path / "echo.yaml"
    config_path.write_text(ECHO)
    config = load_run_config(config_path)
    engines = {"main": lambda: vllm_backend}  # the session's engine keeps 128 requests in flight: fewer than stage 1 has
    streamed, _, _ = run_method(config, tmp_path / "streamed", progress=False, engines=engines)
    first, second = _shard_seqs(streamed, "first"), _shard_seqs(streamed, "second")
    assert len(first) == len(second) == 200
    assert second[0] < first[-1], "no stage-2 row was committed before stage 1 finished"
    barrier, _, _ = run_method(config, tmp_path / "barrier", progress=False, engines=engines, streaming=False)
    assert _shard_seqs(barrier, "second")[0] > _shard_seqs(barrier, "first")[-1]
    assert {s: sorted(k) for s, k in committed_keys(barrier).items()} == \
        {s: sorted(k) for s, k in committed_keys(streamed).items()}


def test_attempts_have_distinct_seeds_and_a_resume_asks_nothing(tmp_path, vllm_backend):
    """An item whose attempts are all rejected gets exactly `attempts` requests, each with its own seed from
    (run seed, stage, item, attempt); resumed, it is not asked again."""
    asked: list[Request] = []

    class Recording:
        def preflight(self, requests):
            vllm_backend.preflight(requests)

        def generate(self, requests):
            def record():
                for r in requests:
                    if r is not None:
                        asked.append(r)
                    yield r
            yield from vllm_backend.generate(record())

    def request(item, seed):
        return Request.build(stage="s", model="m", prompt=f"Item {item}:", seed=seed,
                             sampling=Sampling(max_tokens=2, temperature=0.0))

    def refuse(request, result):
        return {"key": result.key, "seed": request.seed}, "refused: by the test"

    pipeline = Pipeline([Generate("s", items=lambda: ["a", "b"], request=request, parse=refuse, attempts=3)],
                        Publish("s", ["key"]))
    with RunStore.open(tmp_path / "run", {"t": 1}) as store:
        Executor(pipeline, store, {"main": Recording}, seed=9, progress=False).run()
        assert sorted(r.seed for r in asked) == sorted(seed_of(9, "s", [i], a) for i in range(2) for a in range(3))
        assert len({r.seed for r in asked}) == 6
        assert len(store.rejects("s")) == 6
        before = len(asked)
        Executor(pipeline, store, {"main": Recording}, seed=9, progress=False).run()
        assert len(asked) == before


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="declared twice.*reads each row of 'z'.*not declared"):
        Pipeline([Compute("a", rows=list), Compute("a", rows=list, reads=Each("z"))], Publish("x", ["t"]))
    pipeline = Pipeline([Compute("a", rows=list), Compute("b", reads=Whole("a"), rows=list)], Publish("b", ["t"]))
    with pytest.raises(StopAfterError, match="did you mean 'b'"):
        check_stop_after(pipeline, "bb")


@pytest.mark.parametrize("config", ["echo.yaml", "tdg.yaml", "targen_copa.yaml", "targen_boolq.yaml", "glan.yaml"])
def test_unknown_stop_after_is_refused_for_every_method_before_a_model_loads(tmp_path, config):
    r = sdg("run", str(ROOT / "configs" / config), "--out", str(tmp_path / "o"), "--stop-after", "nowhere",
            env={"SDG_CACHE": str(tmp_path / "no-model-here")}, timeout=120)
    assert r.returncode == 2 and "--stop-after 'nowhere' is not a stage" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o").exists() and not (tmp_path / "no-model-here").exists()


def test_generate_with_two_replicas_gives_the_keys_of_one(tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": i, "prompt": f"Item {i}:" if i < 8 else "Say yes."} for i in range(10)]  # two equal prompts
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ("--prompts", str(prompts), "--backend", "transformers", "--max-tokens", "3", "--seed", "7",
              "--temperature", "0")
    one = sdg("generate", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = sdg("generate", *common, "--out", str(tmp_path / "two"), "--replicas", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(committed_keys(tmp_path / "two")["generate"]) == sorted(committed_keys(tmp_path / "one")["generate"])
    assert len(committed_keys(tmp_path / "one")["generate"]) == 10
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert {w for w, s in manifest["writers"].items() if s["commits"]} == {"r0", "r1"}
    # every line is published, the two equal (greedy, so equal outputs) ones included: generate does not dedup
    assert manifest["dataset"]["num_rows"] == manifest["stages"]["generate"]["rows"]
    assert manifest["dataset"]["quality"]["exact_duplicate"] == 0
