"""The pipeline core: runs a method's declared stages (engine.pipeline.stages) on one store, streaming.

Once, for every method:
  - phases: a stage reading `Whole(...)` starts a phase, every other stage joins the current one. Within a
    phase, requests of all its stages share one engine's batch: an accepted row's children are issued at once,
    deepest stage first, so memory follows the work in flight. Between phases: the only barriers;
  - resume: a request whose key the store holds as a row is never sent again; as a reject, its next attempt
    is; rows committed before this launch feed their children from a snapshot of the committed shards,
    read one shard at a time;
  - replicas: an item of a root or whole stage belongs to the replica owning the hash of (stage, item); a child
    goes with its parent (the replica that committed it in this launch; for parents committed earlier, the one
    owning the parent's key). No key is generated twice, and a resume with any number of replicas works;
  - retries (`attempts`) with one seed scheme, `seed_of(run seed, stage, item, attempt)`;
  - stats per stage in the manifest (engine.store records), progress, `--stop-after` checked against the
    declared names before anything runs, named engines started only when a stage has a request for them.

A crash loses only uncommitted rows: the store commits a parent's stage no later than its children's
(store.stage_order), and every key is recomputed the same way on resume.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from engine.config import ConfigError
from engine.pipeline.stages import Compute, Each, Generate, Pipeline, Rows, Stage, Whole
from engine.quality.gates import Gates
from engine.request import Request, Result, stable_hash

log = logging.getLogger(__name__)

END = object()  # the feed has nothing more, ever (a None from the feed means: nothing right now)


class StopAfterError(ConfigError):
    """`--stop-after` names no declared stage."""


def owns(key: str, replica: tuple[int, int]) -> bool:
    """Whether replica `index` of `count` generates `key`: a deterministic split by the key's hash,
    so any number of replicas partition a stage without talking to each other.

    >>> [owns(k, (0, 2)) for k in ("00000000aa", "00000001aa")]
    [True, False]

    Keys are hex digests (engine.request.stable_hash); any other string is split by its own sha256.
    """
    index, count = replica
    if count == 1:
        return True
    try:
        number = int(key[:8], 16)
    except ValueError:
        number = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return number % count == index


def seed_of(run_seed: int, stage: str, ident: Any, attempt: int) -> int:
    """The sampling seed of one attempt of one item: a 31-bit hash of (run seed, stage, item, attempt)."""
    blob = repr(("sdg-seed", run_seed, stage, ident, attempt)).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=4).digest(), "little") & 0x7FFFFFFF


class RejectItem(Exception):
    """Raised by a stage's `request` for an item that cannot become a request (`sdg generate --on-bad-line
    reject`: a bad line of the prompts file). The core commits it as a reject with `reason` ("code: detail")
    and `row`, keyed by the stage and the item's identity, and never sends anything for it."""

    def __init__(self, reason: str, row: dict) -> None:
        super().__init__(reason)
        self.reason, self.row = reason, row


def attempt_request(stage: Generate, item: Any, ident: Any, attempt: int, run_seed: int) -> Request:
    """The request of one attempt of one item, as the core sends it: the stage's request with the core's seed,
    keyed by its content and by the item's identity and attempt. (With 31-bit seeds, two items rendering the
    same prompt draw the same seed about n²/2^32 times among n items: 14 times in 250,000, measured. Without
    the identity in the key they would be one request, and one of them silently lost.)"""
    request = stage.request(item, seed_of(run_seed, stage.name, ident, attempt))
    blob = repr((request.key, ident, attempt)).encode()
    return dataclasses.replace(request, key=hashlib.blake2b(blob, digest_size=16).hexdigest())


def check_stop_after(pipeline: Pipeline, stop_after: str | None) -> None:
    """Refuse a `--stop-after` that names no declared stage, with a 'did you mean'."""
    if stop_after is None or stop_after in pipeline.names:
        return
    close = difflib.get_close_matches(stop_after, pipeline.names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise StopAfterError(f"--stop-after {stop_after!r} is not a stage of this method{hint} "
                         f"(stages: {', '.join(pipeline.names)})")


def result_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """A `parse` for plain generation: the request's meta, the output and its accounting; invalid results are
    rejects."""
    row = {**request.meta, "key": result.key, "output": result.text, "valid": result.valid,
           "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "output_tokens": result.output_tokens, "seed": request.seed,
           "sampling": request.sampling.model_dump()}
    return row, (None if result.valid else (result.reason or "invalid"))


@dataclass
class StageStats:
    """What one stage did in this launch (the manifest sums every launch and replica)."""

    stage: str
    skipped: int = 0
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    reject_reasons: dict = field(default_factory=dict)
    first: float | None = None  # perf_counter of the first request / row
    last: float | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Work:
    """One unit waiting in a stage's queue: an item of a Generate stage (and its attempt), or a row of a
    Compute stage."""

    item: Any
    ident: Any
    attempt: int = 0


class Reader:
    """What a whole-stage read sees: committed rows of any stage, and the publish filters' verdict."""

    def __init__(self, store, quality=None) -> None:
        self._store, self._quality = store, quality

    @property
    def out(self):
        return self._store.out

    def rows(self, stage: str) -> list[dict]:
        """Every committed row of `stage` (every writer's), one per key, sorted by key."""
        return self._store.rows(stage)

    def iter_rows(self, stage: str) -> Iterator[dict]:
        """Every committed row of `stage`, lazily, a shard at a time (a key committed by two writers comes
        twice): for figures over a stage too large to hold."""
        return self._store.iter_rows(stage)

    def iter_columns(self, stage: str, schema) -> Iterator:
        """The columns `schema` (a pyarrow schema) names of every committed row of `stage`, an Arrow table per
        shard (a key committed by two writers comes twice): figures over millions of rows, no dict per row."""
        return self._store.iter_columns(stage, schema)

    def rejects(self, stage: str) -> list[dict]:
        """Every committed reject of `stage`: dicts with key, reason and row (see RunStore.rejects)."""
        return self._store.rejects(stage)

    def survivors(self, rows: list[dict], text_fields: list[str]) -> list[dict]:
        """`rows` minus what publishing's quality filters (dedup, decontamination) would remove, in the order
        given: a method counting toward a target counts only rows that will be published."""
        from engine.quality import QualityConfig, apply_filters
        from engine.store.publish import row_text
        quality = self._quality or QualityConfig()
        ordered = sorted(rows, key=lambda r: r["key"])  # publishing's order: the first of a group by key is kept
        texts = [row_text(r, text_fields) for r in ordered]
        gone = {m.key for m in apply_filters(list(zip((r["key"] for r in ordered), texts)), quality)}
        return [r for r in rows if r["key"] not in gone]


class _StageRun:
    """One stage's state within a phase: queued sources of work, requests in flight, stats."""

    def __init__(self, stage: Stage, depth: int) -> None:
        self.stage, self.depth = stage, depth
        self.sources: deque[Iterator[_Work]] = deque()
        self.in_flight = 0
        self.stats = StageStats(stage=stage.name)

    @property
    def idle(self) -> bool:
        return not self.sources and not self.in_flight


class Executor:
    """Runs `pipeline` on `store` for replica (index, count); `engines` maps names to functions that start an
    engine (each called at most once, when its first request is ready); `sync` (engine.parallel.sync.ReplicaSync)
    holds the replicas' meetings. `streaming=False` puts a barrier after every stage (benchmarks compare)."""

    def __init__(self, pipeline: Pipeline, store, engines: dict[str, Callable[[], Any]], *, seed: int = 0,
                 replica: tuple[int, int] = (0, 1), sync=None, quality=None, progress: bool = True,
                 streaming: bool = True, checker=None) -> None:
        self.pipeline, self.store, self.seed, self.replica = pipeline, store, seed, replica
        self.checker = checker  # compiles each distinct constraint under a time limit first (validate.py)
        self.sync, self.streaming, self.progress = sync, streaming, progress
        self.reader = Reader(store, quality)
        self.gates = Gates(quality)  # generic quality gates, after a stage's parse accepts a row
        self._starters = {**pipeline.engines, **engines}  # engines lent by the caller win (tests, benchmarks)
        self._engines: dict[str, Any] = {}
        self._checked: set[int] = set()  # constraints already preflighted (by id, then by identity)
        self._checked_identities: set[str] = set()
        self.generating_seconds = 0.0  # wall time of the engines' generate loops
        self.stats: dict[str, StageStats] = {}
        store.stage_order = pipeline.names

    # ------------------------------------------------------------------------------------------ the phases
    def run(self, stop_after: str | None = None) -> bool:
        """Run every stage (up to `stop_after`); returns whether the whole pipeline ran (False: stopped)."""
        check_stop_after(self.pipeline, stop_after)
        names = self.pipeline.names
        stages = self.pipeline.stages[: names.index(stop_after) + 1] if stop_after else self.pipeline.stages
        phases: list[list[Stage]] = []
        for stage in stages:
            if not phases or isinstance(stage.reads, Whole):
                phases.append([stage])
            else:
                phases[-1].append(stage)
        try:
            for number, phase in enumerate(phases):
                # A phase cut by --stop-after runs one round: later rounds count on the stages cut off.
                cut = stop_after is not None and number == len(phases) - 1 and stop_after != names[-1] and \
                    not isinstance(self.pipeline.stages[names.index(stop_after) + 1].reads, Whole)
                self._run_phase(number, phase, one_round=cut)
        finally:
            self.store.commit()
        return stop_after is None or stop_after == names[-1]

    def close_engines(self) -> None:
        """Close the engines this executor started (the caller's to do: a test may lend a shared one)."""
        for engine in self._engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        self._engines = {}

    def _meet(self, name: str) -> None:
        """All replicas of this launch reach `name` (nothing with one replica)."""
        if self.sync is not None:
            self.store.commit()
            self.sync.barrier.wait(name)

    def _run_phase(self, number: int, phase: list[Stage], one_round: bool = False) -> None:
        first = phase[0]
        rounds = first.rounds if isinstance(first.reads, Whole) and not one_round else 1
        for round_ in range(1, rounds + 1):
            self._meet(f"phase{number}.r{round_}.start")  # every replica finished what came before
            snapshot = self.store.snapshot()
            self._meet(f"phase{number}.r{round_}.snapshot")  # nobody commits to this phase before all have looked
            runs = [_StageRun(stage, depth) for depth, stage in enumerate(phase)]
            if isinstance(first.reads, Whole):
                items = list(first.items(self.reader, round_) if isinstance(first, Generate)
                             else first.rows(self.reader, round_))
                if not items and round_ > 1:
                    break
                runs[0].sources.append(self._owned(first, (([round_, i], it) for i, it in enumerate(items))))
            for run in runs:
                self._open_sources(run, runs, snapshot)
            self._phase = runs
            self._snapshot = snapshot
            self._by_key: dict[str, tuple[_StageRun, _Work, Request]] = {}
            self._gated: set[tuple[str, str]] = set()
            started = time.perf_counter()
            self._drain()
            self.store.commit()
            for run in runs:
                self._finish_stage(run, time.perf_counter() - started)

    def _open_sources(self, run: _StageRun, runs: list[_StageRun], snapshot: frozenset) -> None:
        """A stage's work at the start of a phase: a root's items; for Each, the committed parent rows (of this
        snapshot) that this replica owns."""
        stage = run.stage
        if stage.reads is None:
            items = stage.items() if isinstance(stage, Generate) else stage.rows()
            run.sources.append(self._owned(stage, (([i], it) for i, it in enumerate(items))))
        elif isinstance(stage.reads, Each):
            for parent in stage.reads.stages:
                if self._persisted(parent):
                    rows = (row for row in self.store.iter_rows(parent, within=snapshot)
                            if owns(row["key"], self.replica))
                    run.sources.append(self._children_of_rows(stage, rows))

    def _persisted(self, name: str) -> bool:
        stage = self.pipeline.stage(name)
        return not isinstance(stage, Compute) or stage.persist

    def _owned(self, stage: Stage, numbered: Iterable[tuple[Any, Any]]) -> Iterator[_Work]:
        """Works of a root or whole stage that this replica owns (by the hash of stage and identity)."""
        for position, item in numbered:
            ident = self._ident(stage, item, position)
            if self.replica[1] == 1:
                yield _Work(item, ident)
            elif isinstance(stage, Compute) and isinstance(item, Rows):
                mine = [i for i, row in enumerate(item.rows) if owns(row["key"], self.replica)]
                if mine:
                    yield _Work(Rows([item.rows[i] for i in mine], [item.reasons[i] for i in mine]), ident)
            elif isinstance(stage, Compute):
                key = (item[0] if isinstance(item, tuple) else item)["key"]
                if owns(key, self.replica):
                    yield _Work(item, ident)
            elif owns(stable_hash([stage.name, ident]), self.replica):
                yield _Work(item, ident)

    @staticmethod
    def _ident(stage: Stage, item: Any, position: Any) -> Any:
        custom = getattr(stage, "ident", None)
        return custom(item) if custom is not None else position

    def _children_of_rows(self, stage: Stage, rows: Iterable[dict]) -> Iterator[_Work]:
        for row in rows:
            yield from self._children(stage, row)

    def _children(self, stage: Stage, parent: dict) -> Iterator[_Work]:
        """The works of `stage` for one parent row, lazily (items are asked for when first pulled)."""
        produce = stage.items if isinstance(stage, Generate) else stage.rows
        for i, item in enumerate(produce(parent)):
            yield _Work(item, self._ident(stage, item, [parent["key"], i]))

    # ------------------------------------------------------------------------------------------ the loop
    def _drain(self) -> None:
        """Serve every engine that has work until no stage has any (compute work is done inline)."""
        while True:
            worked = False
            for engine in self._engine_order():
                worked |= self._drive(engine)
            if not worked:
                return

    def _engine_order(self) -> list[str]:
        names = [s.engine for s in (r.stage for r in self._phase) if isinstance(s, Generate)]
        return list(dict.fromkeys(names)) or ["main"]

    def _drive(self, engine: str) -> bool:
        """Run `engine`'s generate loop over this phase's feed until nothing is left for it; returns whether
        anything (a request, or compute work) was done."""
        self._did = False
        first = self._next(engine)
        if first is END:
            return self._did
        fresh = engine not in self._engines
        backend = self._engine(engine)
        if fresh:  # the stages it serves start their clocks when it can serve them, not before its start-up
            ready = time.perf_counter()
            for run in self._phase:
                if isinstance(run.stage, Generate) and run.stage.engine == engine and run.stats.first is not None:
                    run.stats.first = max(run.stats.first, ready)
        by_key = self._by_key
        bar = _Progress(self._phase, enabled=self.progress)

        def feed() -> Iterator[Request | None]:
            request = first
            while request is not END:
                if request is None or request.constraint is None or self._enforceable(backend, request):
                    yield request
                request = self._next(engine)

        started = time.perf_counter()
        for result in backend.generate(feed()):
            run, work, request = by_key.pop(result.key)
            run.in_flight -= 1
            self._take(run, work, request, result)
            self.store.maybe_commit()
            bar.update()
        bar.update(final=True)
        self.generating_seconds += time.perf_counter() - started
        self.store.record_writer(generating_seconds=round(time.perf_counter() - started, 3))
        return True

    def _enforceable(self, backend, request: Request) -> bool:
        """Whether the backend takes the request's constraint. One the stage declares (its config fixes it) and
        cannot be enforced fails the run; one built from an item's content (TDG's per-template schemas) makes
        that request a reject ('constraint_refused'), and the run goes on."""
        from engine.constraints import ConstraintError
        try:
            self._preflight(backend, request)
            return True
        except ConstraintError as e:
            run, work, _ = self._by_key.pop(request.key)
            declared = {repr(c.identity()) for c in run.stage.constraints}
            if repr(request.constraint.identity()) in declared:
                raise
            run.in_flight -= 1
            self._take(run, work, request, Result(
                key=request.key, text="", parsed=None, prompt_tokens=0, output_tokens=0,
                finish_reason="constraint_refused", valid=False, reason=f"constraint_refused: {e}",
                meta=request.meta))
            return False

    def _preflight(self, backend, request: Request) -> None:
        """A constraint the backend cannot enforce fails before its first request runs (once per constraint)."""
        if id(request.constraint) in self._checked:
            return
        identity = repr(request.constraint.identity())
        if identity not in self._checked_identities:
            if self.checker is not None:  # bounded: vLLM has no compile timeout of its own
                from engine.constraints import ConstraintError
                verdict = self.checker.check(request.constraint.kind, request.constraint.spec)
                if verdict is not None:
                    raise ConstraintError(f"{verdict[0]}: {verdict[1]}")
            backend.preflight([request])
            self._checked_identities.add(identity)
        self._checked.add(id(request.constraint))

    def _engine(self, name: str):
        if name not in self._engines:
            if name not in self._starters:
                raise ValueError(f"no engine named {name!r} (engines: {', '.join(self._starters)})")
            started = time.perf_counter()
            self._engines[name] = engine = self._starters[name]()
            if self.progress:
                _engine_line(name, engine, getattr(engine, "start_seconds", None) or time.perf_counter() - started)
        return self._engines[name]

    def _next(self, engine: str) -> Request | None | object:
        """The next request for `engine`: deepest stage first; None while the ready queues are empty but
        requests are in flight; END when nothing is left for this engine. Compute work met on the way is done
        here."""
        while True:
            for run in reversed(self._phase):
                if not run.sources:
                    continue
                if isinstance(run.stage, Generate) and run.stage.engine != engine:
                    continue
                work = next(run.sources[0], None)
                if work is None:
                    run.sources.popleft()
                    break  # rescan: a finished source may open a gate
                self._did = True
                if isinstance(run.stage, Compute):
                    self._compute(run, work)
                    break  # its rows may have queued children deeper down
                request = self._request(run, work)
                if request is not None:
                    return request
                break
            else:
                if any(r.in_flight for r in self._phase if isinstance(r.stage, Generate) and r.stage.engine == engine):
                    return None
                if self._open_gates():
                    continue
                return END

    def _request(self, run: _StageRun, work: _Work) -> Request | None:
        """The request of one attempt, or None when its key is done (a reject: its next attempt is queued)."""
        stage = run.stage
        try:
            request = attempt_request(stage, work.item, work.ident, work.attempt, self.seed)
        except RejectItem as e:
            self._reject_item(run, work, e)
            return None
        if request.key in self._by_key:
            return None  # the same request twice in flight (two equal items)
        state = self.store.key_state(stage.name, request.key)
        if state is None:
            run.in_flight += 1
            run.stats.first = run.stats.first or time.perf_counter()
            self._by_key[request.key] = (run, work, request)
            return request
        run.stats.skipped += 1
        if state == "reject" and work.attempt + 1 < stage.attempts:
            run.sources.appendleft(iter([_Work(work.item, work.ident, work.attempt + 1)]))
        return None

    def _reject_item(self, run: _StageRun, work: _Work, e: RejectItem) -> None:
        """An item its stage refused to make a request of: one reject (once per run), counted like the others."""
        key = hashlib.blake2b(repr(("rejected item", run.stage.name, work.ident)).encode(), digest_size=16).hexdigest()
        if self.store.key_state(run.stage.name, key) is not None:
            run.stats.skipped += 1
            return
        self.store.reject(run.stage.name, {**e.row, "key": key}, e.reason)
        self.store.record(run.stage.name, generated=1, rejected=1)
        run.stats.generated += 1
        run.stats.rejected += 1
        kind = e.reason.split(":")[0]
        run.stats.reject_reasons[kind] = run.stats.reject_reasons.get(kind, 0) + 1
        self.store.maybe_commit()

    def _take(self, run: _StageRun, work: _Work, request: Request, result: Result) -> None:
        """A result: parse it, commit the row or the reject, count it, queue children or the next attempt."""
        stage, stats = run.stage, run.stats
        row, reason = stage.parse(request, result)
        if reason is None:
            reason = self.gates.check(request, result)  # a row failing a gate is a reject with its code
        row.setdefault("key", result.key)
        stats.generated += 1
        stats.prompt_tokens += result.prompt_tokens
        stats.output_tokens += result.output_tokens
        stats.last = time.perf_counter()
        self.store.record(stage.name, generated=1, accepted=int(reason is None), rejected=int(reason is not None),
                          prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens)
        if reason is None:
            self.store.add(stage.name, row)
            stats.accepted += 1
            self._deliver(run, row)
            return
        self.store.reject(stage.name, row, reason)
        stats.rejected += 1
        kind = reason.split(":")[0]
        stats.reject_reasons[kind] = stats.reject_reasons.get(kind, 0) + 1
        if work.attempt + 1 < stage.attempts:
            run.sources.appendleft(iter([_Work(work.item, work.ident, work.attempt + 1)]))

    def _compute(self, run: _StageRun, work: _Work) -> None:
        """One row of a Compute stage: committed (unless done or not persisted) and handed to its children."""
        if isinstance(work.item, Rows):
            self._compute_rows(run, work.item)
            return
        stage = run.stage
        row, reason = work.item if isinstance(work.item, tuple) else (work.item, None)
        run.stats.first = run.stats.first or time.perf_counter()
        if stage.persist:
            if not self.store.add_new(stage.name, row, reason):  # committed before (a resumed run)
                run.stats.skipped += 1
                return
            self.store.record(stage.name, generated=1, accepted=int(reason is None), rejected=int(reason is not None))
            self.store.maybe_commit()
        run.stats.generated += 1
        run.stats.last = time.perf_counter()
        if reason is None:
            run.stats.accepted += 1
            self._deliver(run, row)
        else:
            run.stats.rejected += 1

    def _compute_rows(self, run: _StageRun, batch: Rows) -> None:
        """A batch of a Compute stage's rows, as _compute would take them one by one: the store looks up and
        queues the batch at once, the stats and the commit check are updated once."""
        stage, stats = run.stage, run.stats
        stats.first = stats.first or time.perf_counter()
        if stage.persist:
            fresh = self.store.add_rows(stage.name, batch.rows, batch.reasons)
        else:
            fresh = [True] * len(batch.rows)
        new = [(row, reason) for row, reason, f in zip(batch.rows, batch.reasons, fresh) if f]
        rejected = sum(reason is not None for _, reason in new)
        stats.skipped += len(batch.rows) - len(new)
        if stage.persist and new:
            self.store.record(stage.name, generated=len(new), accepted=len(new) - rejected, rejected=rejected)
            self.store.maybe_commit()
        stats.generated += len(new)
        stats.accepted += len(new) - rejected
        stats.rejected += rejected
        if new:
            stats.last = time.perf_counter()
        if any(isinstance(r.stage.reads, Each) and stage.name in r.stage.reads.stages for r in self._phase):
            for row, reason in new:
                if reason is None:
                    self._deliver(run, row)

    def _deliver(self, parent: _StageRun, row: dict) -> None:
        """Queue the children of a fresh row: at once where the edge streams; otherwise they are read back from
        the store when the parent stage is done (_open_gates)."""
        for run in self._phase:
            reads = run.stage.reads
            if isinstance(reads, Each) and parent.stage.name in reads.stages and self._streams(parent, run):
                run.sources.append(self._children(run.stage, row))

    def _streams(self, parent: _StageRun, child: _StageRun) -> bool:
        """Whether children go straight to their queue: streaming on (or the parent not stored), and both
        stages served by one engine (or either computed)."""
        if isinstance(parent.stage, Compute) and not parent.stage.persist:
            return True
        if not self.streaming:
            return False
        engines = {s.engine for s in (parent.stage, child.stage) if isinstance(s, Generate)}
        return len(engines) <= 1

    def _open_gates(self) -> bool:
        """For edges that do not stream: once a parent stage and everything above it in the phase are idle,
        queue the children of the rows this replica committed to it in this phase. Returns whether any opened."""
        opened = False
        for child in self._phase:
            reads = child.stage.reads
            if not isinstance(reads, Each):
                continue
            for parent in self._phase[: child.depth]:
                edge = (parent.stage.name, child.stage.name)
                if parent.stage.name not in reads.stages or edge in self._gated or self._streams(parent, child):
                    continue
                if all(r.idle for r in self._phase[: parent.depth + 1]):
                    self._gated.add(edge)
                    self.store.commit()
                    rows = self.store.iter_rows(parent.stage.name, mine_after=self._snapshot)
                    child.sources.append(self._children_of_rows(child.stage, rows))
                    opened = True
        return opened

    def _finish_stage(self, run: _StageRun, phase_seconds: float) -> None:
        stats = run.stats
        if isinstance(run.stage, Generate) and (stats.generated or stats.skipped):  # the gates that ran: counted
            self.store.record(run.stage.name, **{f"gate:{g}": 0 for g in self.gates.names(run.stage)})
        if stats.first is not None and stats.last is not None and self._persisted(run.stage.name):
            stats.seconds = stats.last - stats.first
            self.store.record(run.stage.name, seconds=round(stats.seconds, 3))
        total = self.stats.setdefault(run.stage.name, StageStats(stage=run.stage.name))
        for name in ("skipped", "generated", "accepted", "rejected", "prompt_tokens", "output_tokens", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        for reason, n in stats.reject_reasons.items():
            total.reject_reasons[reason] = total.reject_reasons.get(reason, 0) + n
        figures = getattr(run.stage, "figures", None)
        if figures is not None and self.replica[0] == 0 and not self.store.own_stats(run.stage.name).get("figures"):
            # once per run (a crash before this commit records them on resume), by replica 0 only
            self.store.record(run.stage.name, figures=1, **figures(self.reader))
        self.store.commit()

    def generated(self) -> StageStats:
        """The model stages' stats of this launch, summed, over the engines' generate time (stages overlap when
        they stream, so their own seconds do not add up): what `sdg` prints at the end."""
        total = StageStats(stage="all", seconds=self.generating_seconds)
        for name, s in self.stats.items():
            if isinstance(self.pipeline.stage(name), Generate):
                for f in ("generated", "accepted", "rejected", "prompt_tokens", "output_tokens"):
                    setattr(total, f, getattr(total, f) + getattr(s, f))
        return total


def _engine_line(name: str, engine, seconds: float) -> None:
    """One line per engine start: model, device, grammar backend, seconds."""
    try:
        ident = engine.identity()
    except Exception:  # noqa: BLE001 - the line is informative only
        ident = {}
    model = ident.get("model") if isinstance(ident.get("model"), dict) else {}
    print(f"engine {name}: {model.get('name', '?')} on {ident.get('device', '?')} "
          f"({ident.get('backend', '?')}, grammar backend {ident.get('grammar_backend', '?')}), "
          f"started in {seconds:.0f} s", file=sys.stderr, flush=True)


class _Progress:
    """One progress bar per phase (tqdm, on stderr): the stages with work, results done / total where the total
    is known (root stages of sized items), accepted and rejected per stage, output tok/s and an ETA, both from a
    moving window of the last `window` seconds (not from the first request). On a terminal the bar is redrawn
    in place; in CI or a pipe it is one plain line every `every` seconds (and one at the end)."""

    def __init__(self, runs: list[_StageRun], enabled: bool = True, every: float = 10.0,
                 window: float = 30.0) -> None:
        self.runs, self.enabled, self.every, self.window = runs, enabled, every, window
        self.model_runs = [r for r in runs if isinstance(r.stage, Generate)]
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.samples: deque[tuple[float, int, int]] = deque()  # (time, done, output tokens)
        self.bar = None
        if not enabled or not self.model_runs:
            self.enabled = False
            return
        self.total = self._total()
        self.samples.append((self.start, *self._done()))
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, file=sys.stderr, dynamic_ncols=True, leave=True, mininterval=0.5,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}"
                            if self.total else "{desc}: {n_fmt} [{elapsed}]{postfix}")

    def _total(self) -> int | None:
        """Requests this phase will make, where every model stage's count is known before it runs: root stages
        whose items can be counted (every attempt after the first adds to it); None otherwise."""
        total = 0
        for run in self.model_runs:
            if run.stage.reads is not None:
                return None
            try:
                total += sum(1 for _ in run.stage.items())
            except Exception:  # noqa: BLE001 - a count is only a display nicety
                return None
        return total

    def _done(self) -> tuple[int, int]:
        done = sum(r.stats.generated + r.stats.skipped for r in self.model_runs)
        return done, sum(r.stats.output_tokens for r in self.model_runs)

    def _figures(self, now: float) -> tuple[int, float, float | None]:
        """(done, output tok/s, seconds left or None) over the moving window."""
        done, tokens = self._done()
        self.samples.append((now, done, tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, done0, tokens0 = self.samples[0]
        span = now - t0
        rate_tokens = (tokens - tokens0) / span if span > 0 else 0.0
        rate_done = (done - done0) / span if span > 0 else 0.0
        eta = (self.total - done) / rate_done if self.total and rate_done > 0 and done < self.total else None
        return done, rate_tokens, eta

    def _describe(self) -> str:
        names = [r.stage.name for r in self.model_runs if r.stats.generated or r.in_flight or r.sources]
        return "+".join(names or [r.stage.name for r in self.model_runs])

    def _postfix(self, rate: float, eta: float | None) -> str:
        parts = [f"{r.stage.name} {r.stats.accepted} ok {r.stats.rejected} rej" for r in self.model_runs
                 if r.stats.generated]
        text = " | ".join(parts) + f" | {rate:,.0f} output tok/s"
        if eta is not None:
            from tqdm import tqdm
            text += f" | ETA {tqdm.format_interval(eta)}"
        return text

    def update(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        done, rate, eta = self._figures(now)
        if final:  # the whole drive's mean: the window may hold only its last moments
            rate = self._done()[1] / max(now - self.start, 1e-9)
            eta = None
        if self.bar is not None:
            if self.total is not None and done > self.bar.total:
                self.bar.total = done
            self.bar.set_description_str(self._describe(), refresh=False)
            self.bar.set_postfix_str(self._postfix(rate, eta), refresh=False)
            self.bar.update(done - self.bar.n)
            if final:
                self.bar.close()
        else:
            total = f"/{self.total}" if self.total else ""
            print(f"{self._describe()}: {done}{total} [{time.strftime('%H:%M:%S', time.gmtime(now - self.start))}] "
                  f"{self._postfix(rate, eta)}", file=sys.stderr, flush=True)
