"""Engine processes die with the process that started them, however it dies (SIGKILL included).

vLLM starts its engine core and workers as child processes that do not watch their parent (vLLM issue #55510,
open): when `sdg` is SIGKILLed or OOM-killed they live on, keep their memory (on a GPU: the KV cache), and a
resume then fails for lack of it. `watch(before)` starts one small process that polls its parent and, when the
parent is gone, terminates the processes that appeared since `before` (checked by pid and start time, so a
reused pid is never hit). It exits by itself once they are all gone.

    before = reaper.children()
    llm = vllm.LLM(...)          # starts EngineCore and its workers
    reaper.watch(before)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 5.0  # SIGTERM first (vLLM shuts down cleanly on it), SIGKILL after this


def children() -> dict[int, float]:
    """This process's descendants now: pid -> start time."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def watch(before: dict[int, float]) -> subprocess.Popen | None:
    """Start the reaper for the descendants that appeared since `before`; None when there are none."""
    new = {pid: t for pid, t in children().items() if before.get(pid) != t}
    if not new:
        return None
    # Its own session and no inherited descriptors: it outlives the parent without holding its pipes open.
    return subprocess.Popen([sys.executable, "-m", "engine.backends.reaper", str(os.getpid()), json.dumps(new)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)


def _alive(watched: dict[int, float]) -> list[psutil.Process]:
    procs = []
    for pid, started in watched.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs


def main(parent: int, watched: dict[int, float]) -> None:
    """Wait for `parent` to die (while any watched process lives), then end the watched processes."""
    while os.getppid() == parent:  # reparented: the parent is gone
        if not _alive(watched):
            return
        time.sleep(POLL_S)
    procs = _alive(watched)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]), {int(k): v for k, v in json.loads(sys.argv[2]).items()})
