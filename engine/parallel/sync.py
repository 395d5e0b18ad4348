"""Inside a replica: named meetings of the N replicas of one launch (Barrier, marker files on the shared run
directory) and serialized engine start-ups on a shared GPU (ReplicaSync)."""
from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

from engine.parallel.placement import ReplicaError

_SESSION = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class Barrier:
    """Named meeting points of the N replicas of one launch, as marker files on the shared run directory:
    `<root>/<name>.<k>/r<i>` for the k-th meeting of that name. `wait` returns once all N markers exist."""

    def __init__(self, root: Path, replica: tuple[int, int], poll: float = 0.02) -> None:
        self.root, (self.index, self.count), self.poll = Path(root), replica, poll
        self._seen: dict[str, int] = {}
        driver = os.environ.get("SDG_DRIVER_PID")
        self._driver = int(driver) if driver and driver.isdigit() else None

    def arrive(self, name: str) -> Path:
        k = self._seen.get(name, 0)
        self._seen[name] = k + 1
        d = self.root / f"{name}.{k}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"r{self.index}").write_text(str(os.getpid()))
        return d

    def wait(self, name: str) -> None:
        d = self.arrive(name)
        delay, started, told = self.poll, time.monotonic(), False
        while len(os.listdir(d)) < self.count:
            if self._driver is not None and os.getppid() != self._driver:
                raise ReplicaError(f"replica {self.index}: the driver (pid {self._driver}) is gone; stopping. "
                                   "Committed work is kept; rerun to resume")
            if not told and time.monotonic() - started > 2:
                log.info("replica %d waits at %s for %d replica(s)", self.index, d.name,
                         self.count - len(os.listdir(d)))
                told = True
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


class ReplicaSync:
    """What run_method adds for replica (i, N), N > 1, of the launch `session`: the meetings (barrier), serialized
    engine start-ups on a shared GPU, and the final meeting before replica 0 publishes."""

    def __init__(self, store, replica: tuple[int, int], session: str | None) -> None:
        index, count = replica
        if not 0 <= index < count:
            raise ValueError(f"replica index must be in [0, {count}), got {index}")
        if not session or not _SESSION.match(session):
            raise ValueError(f"replica {index}/{count} needs a session name (letters, digits, _.-), the same for all "
                             f"replicas of one launch and new for each launch; got {session!r}")
        self.replica = replica
        self.barrier = Barrier(store.out / "parallel" / session / "barriers", replica)
        self._raw = store

    def serialized(self, start: Callable[[], Any]) -> Callable[[], Any]:
        """`start` (an engine start-up) under a lock per GPU and host when a GPU is in use, so that engines
        sharing a GPU start one at a time (vLLM sizes its KV cache from the memory it sees free)."""
        def wrapped():
            tag = _gpu_tag()
            if tag is None:
                return start()
            path = Path(tempfile.gettempdir()) / f"sdg-engine-start-{tag}.lock"
            with open(path, "a") as f:
                t = time.monotonic()
                fcntl.flock(f, fcntl.LOCK_EX)
                log.info("replica %d: engine start lock %s after %.1fs", self.replica[0], path, time.monotonic() - t)
                try:
                    return start()
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return wrapped

    def finish(self) -> None:
        """Every replica commits and arrives at "end"; replica 0 waits for all of them, then publishes."""
        self._raw.commit()
        if self.replica[0] == 0:
            self.barrier.wait("end")
        else:
            self.barrier.arrive("end")


def _gpu_tag() -> str | None:
    """'<host>-gpu<CUDA_VISIBLE_DEVICES>' when this process uses a GPU, else None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "":
        return None
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-gpu{visible or 'all'}")


