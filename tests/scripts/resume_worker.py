"""A run for the crash tests: a method config run through the pipeline with the real model (the config's
backend) and the real store, and a log of every key the model generated, appended and fsynced as each result
comes out of the backend.

usage: resume_worker.py CONFIG.yaml OUT LOG   (SDG_KILL_AT in the environment picks where the store kills it)
"""
import os
import sys
from pathlib import Path

from engine.backends.loader import load_backend
from engine.pipeline.run import load_run_config, run_method


class LoggingBackend:
    """The real backend, with each generated key appended to a log before the pipeline sees it."""

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


def main(config_path, out, log):
    config = load_run_config(Path(config_path))
    engine = lambda: LoggingBackend(load_backend(config.backend, grammar_backend=config.grammar_backend,  # noqa: E731
                                                 seed=config.seed, **config.engine), log)
    run_method(config, Path(out), progress=False, engines={"main": engine})


if __name__ == "__main__":
    main(*sys.argv[1:4])
