"""The runner: feeds one stage's Requests to one backend and commits every Result to the run store.

It skips keys the store already holds (resume), keeps only the keys this replica owns (scale-out), streams
Results as the backend finishes them, turns each into a row or a reject through the stage's `to_row`, and
reports progress (done/total, output tokens/s, ETA). Methods call `run_stage` once per stage.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from engine.backends.base import Backend
from engine.request import Request, Result

log = logging.getLogger(__name__)

# (request, result) -> (row, reject reason or None)
ToRow = Callable[[Request, Result], tuple[dict, "str | None"]]


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


def result_row(request: Request, result: Result) -> tuple[dict, str | None]:
    """The default `to_row`: the request's meta, the output and its accounting; invalid results are rejects."""
    row = {**request.meta, "key": result.key, "output": result.text, "valid": result.valid,
           "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "output_tokens": result.output_tokens, "seed": request.seed,
           "sampling": request.sampling.model_dump()}
    return row, (None if result.valid else (result.reason or "invalid"))


@dataclass
class StageStats:
    """What one run_stage call did; also recorded in the store's manifest."""

    stage: str
    total: int = 0
    skipped: int = 0
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    reject_reasons: dict = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


class Progress:
    """One status line: done/total, output tokens/s, ETA. Redrawn in place on a terminal, logged every
    `every` seconds otherwise (CI logs, files)."""

    def __init__(self, stage: str, total: int, enabled: bool = True, every: float = 10.0) -> None:
        self.stage, self.total, self.enabled, self.every = stage, total, enabled, every
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else self.every)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"[{self.stage}] {done}/{self.total} requests  {tokens / elapsed:,.0f} output tok/s  "
                f"ETA {eta:,.0f}s" if eta != float("inf") else f"[{self.stage}] {done}/{self.total} requests")
        if self.tty:
            print("\r" + line.ljust(80), end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def run_stage(backend: Backend | Callable[[], Backend], store, stage: str, requests: Iterable[Request],
              to_row: ToRow = result_row, *,
              replica: tuple[int, int] = (0, 1), progress: bool = True,
              group: Callable[[Request], str] | None = None) -> StageStats:
    """Generate every request of `stage` not yet committed, committing rows and rejects as they finish.

    Returns the stage's StageStats; the same figures are added to the manifest through `store.record`.
    A request whose key is already committed (as a row or a reject) is never sent to the model again.
    With replicas, a request goes to the replica that owns its key, or, with `group` (request -> hex digest),
    the one that owns its group: requests of one group (GLAN: one discipline) then stay on one replica.
    `backend` may be a function returning it, called only when this replica has something left to generate
    (a fully resumed stage never loads a model).
    """
    requests = list(requests)
    stats = StageStats(stage=stage, total=len(requests))
    done = store.done_keys(stage)
    todo: list[Request] = []
    seen: set[str] = set()
    for request in requests:
        if request.key in done:
            stats.skipped += 1
        elif owns(group(request) if group else request.key, replica) and request.key not in seen:
            seen.add(request.key)
            todo.append(request)
    if not todo:
        return stats
    if group is not None and hasattr(store, "claim"):
        store.claim(r.key for r in todo)  # a replica's store commits keys it generated, whoever owns them by hash
    if not hasattr(backend, "generate"):
        backend = backend()
    backend.preflight(todo)
    by_key = {r.key: r for r in todo}
    bar = Progress(stage, len(todo), enabled=progress)
    started = time.perf_counter()
    try:
        for result in backend.generate(todo):
            request = by_key[result.key]
            row, reason = to_row(request, result)
            row.setdefault("key", result.key)
            if reason is None:
                store.add(stage, row)
                stats.accepted += 1
            else:
                store.reject(stage, row, reason)
                stats.rejected += 1
                stats.reject_reasons[reason.split(":")[0]] = stats.reject_reasons.get(reason.split(":")[0], 0) + 1
            stats.generated += 1
            stats.prompt_tokens += result.prompt_tokens
            stats.output_tokens += result.output_tokens
            store.maybe_commit()
            bar.update(stats.generated, stats.output_tokens)
    finally:
        # Stats first: the commit then makes rows and their accounting durable together.
        stats.seconds = time.perf_counter() - started
        store.record(stage, generated=stats.generated, accepted=stats.accepted, rejected=stats.rejected,
                     prompt_tokens=stats.prompt_tokens, output_tokens=stats.output_tokens,
                     seconds=round(stats.seconds, 3))
        store.commit()
    bar.update(stats.generated, stats.output_tokens, final=True)
    return stats
