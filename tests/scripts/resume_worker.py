"""A generation run for the crash tests: real model (transformers backend), real store, and a log of every
key the model generated, appended and fsynced as each result comes out of the backend.

usage: resume_worker.py OUT LOG N   (SDG_KILL_AT in the environment picks where the store kills it)
"""
import os
import sys

from engine.backends.loader import load_backend
from engine.request import Request, Sampling
from engine.runner import run_stage
from engine.store import RunStore


class LoggingBackend:
    """The real backend, with each generated key appended to a log before the runner sees it."""

    def __init__(self, backend, log_path):
        self.backend, self.log = backend, open(log_path, "a")

    def preflight(self, requests):
        self.backend.preflight(requests)

    def generate(self, requests):
        for result in self.backend.generate(requests):
            self.log.write(result.key + "\n")
            self.log.flush()
            os.fsync(self.log.fileno())
            yield result


def main(out, log, n):
    requests = [Request.build(stage="crash", model="smollm2", prompt=f"Item {i}:", seed=i,
                              sampling=Sampling(max_tokens=3, temperature=0.9)) for i in range(n)]
    store = RunStore.open(out, {"test": "crash", "n": n}, commit_rows=3, commit_seconds=60)
    backend = LoggingBackend(load_backend("transformers"), log)
    run_stage(backend, store, "crash", requests, progress=False)
    store.finalize("crash", text_fields=["output"])
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
