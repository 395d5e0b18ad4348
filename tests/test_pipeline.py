"""The pipeline core (engine.pipeline): declared stages, streaming between stages, attempts and seeds, stop
points for every method, `sdg generate` as a one-stage pipeline with replicas. Real engine and real store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.pipeline.core import Executor, StopAfterError, check_stop_after, seed_of
from engine.pipeline.run import load_run_config, run_method
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Publish, Rows, Whole
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


def _pairs(parent: dict) -> list[tuple[dict, str | None]]:
    """Seven rows of a parent, every third a reject, then a key met before (skipped, not committed twice)."""
    key = parent["key"]
    return [({"key": f"{key}-{j}", "n": j}, None if j % 3 else "too_small") for j in range(7)] \
        + [({"key": f"{key}-1", "n": 99}, None)]


def _batched(parent: dict):
    pairs = _pairs(parent)
    for part in (pairs[:3], pairs[3:]):  # the repeat comes in a later batch than its first copy
        yield Rows([row for row, _ in part], [reason for _, reason in part])


def _run_compute(out: Path, rows, replica=(0, 1)) -> tuple[RunStore, Executor]:
    pipeline = Pipeline([Compute("a", rows=lambda: [{"key": f"p{i}"} for i in range(3)]),
                         Compute("b", reads=Each("a"), rows=rows),
                         Compute("c", reads=Each("b"), rows=lambda row: [{"key": "c" + row["key"]}])],
                        Publish("b", ["key"]))
    store = RunStore.open(out, {"method": "t"}, writer=f"r{replica[0]}")
    executor = Executor(pipeline, store, {}, replica=replica, progress=False)
    executor.run()
    store.commit()
    return store, executor


def test_compute_rows_in_batches_commit_what_rows_one_by_one_do(tmp_path):
    """A Compute stage may yield Rows batches (TDG's problems do): the committed rows, rejects, stats and
    children are those of the same rows yielded one by one; a key met twice is committed once; a resumed run
    commits nothing again."""
    one, one_ex = _run_compute(tmp_path / "one", _pairs)
    batch, batch_ex = _run_compute(tmp_path / "batch", _batched)
    for stage in ("b", "c"):
        assert batch.rows(stage) == one.rows(stage) and len(one.rows(stage)) == 12
        assert batch.rejects(stage) == one.rejects(stage)
    assert [r["reason"] for r in batch.rejects("b")] == ["too_small"] * 9
    assert {r["key"]: r["n"] for r in batch.rows("b")}["p0-1"] == 1  # the first copy of a key is the one kept
    counts = [{k: v for k, v in store.own_stats("b").items() if k != "seconds"} for store in (batch, one)]
    assert counts[0] == counts[1] == {"generated": 21, "accepted": 12, "rejected": 9}
    stats = {run.stage.name: run.stats for run in batch_ex._phase}
    assert (stats["b"].generated, stats["b"].accepted, stats["b"].rejected, stats["b"].skipped) == (21, 12, 9, 3)
    one.close()
    batch.close()
    again, again_ex = _run_compute(tmp_path / "batch", _batched)  # resumed: every key is committed
    stats = {run.stage.name: run.stats for run in again_ex._phase}
    assert (stats["b"].generated, stats["b"].skipped) == (0, 24)
    assert committed_keys(tmp_path / "batch") == committed_keys(tmp_path / "one") != {}
    again.close()


def test_rows_batches_at_a_root_stage_are_split_between_replicas(tmp_path):
    """Two replicas of a root Compute stage yielding Rows commit every row once between them, each the keys
    it owns, as with rows yielded one by one."""
    from engine.pipeline.core import owns
    rows = [{"key": f"k{i}"} for i in range(40)]
    pipeline = Pipeline([Compute("a", rows=lambda: [Rows(rows[:25], [None] * 25), Rows(rows[25:], [None] * 15)])],
                        Publish("a", ["key"]))
    kept = []
    for i in range(2):
        store = RunStore.open(tmp_path / "run", {"method": "t"}, writer=f"r{i}")
        Executor(pipeline, store, {}, replica=(i, 2), progress=False).run()
        store.close()
        mine = committed_keys(tmp_path / "run")["a"]
        kept.append(sorted(set(mine) - set(sum(kept, []))))
        assert kept[i] == sorted(r["key"] for r in rows if owns(r["key"], (i, 2)))
    assert sorted(kept[0] + kept[1]) == sorted(r["key"] for r in rows) and kept[0] and kept[1]
