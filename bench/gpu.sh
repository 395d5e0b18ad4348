#!/usr/bin/env bash
# Every GPU figure of this engine in one command (bench/all.py says what it runs), within 8 minutes on one
# H100/H200 with SmolLM2-135M. Results: bench/results/all-gpu/summary.json and .png, and each step's own files.
#
#   bench/gpu.sh [--out DIR] [--budget SECONDS] [--steps throughput-guidance,engines,...] [--model PATH]
#   bench/gpu.sh --cpu        # the same steps at a tiny size (what the test suite runs; SDG_BENCH_SIZE=tiny too)
#
# Python: $PYTHON, else this checkout's .venv (make demo EXTRA=gpu), else ../venv (an `sdg bundle` install puts
# the project in DEST/project and the venv in DEST/venv), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  for candidate in .venv/bin/python ../venv/bin/python; do
    if [ -x "$candidate" ]; then PYTHON=$candidate; break; fi
  done
fi
exec "${PYTHON:-python3}" bench/all.py "$@"
