#!/usr/bin/env bash
# The first check on a borrowed GPU or TPU, at most ~8 minutes (benchmarks/device_check.py):
#   stage 1 (<= 3 min): the Pallas kernel vs dense at 4k (fp32, bf16: output, LSE, gradients), the engine's
#     exactness tests on the device, a 3-step training loss with attention=kernel equal to dense;
#   stage 2: prefill and train step dense vs kernel at 4k/16k, decode b1/b16 anchor vs full cache.
# Result: ${OUT:-device_results}/device_check.json (rewritten after every check); exit 0 iff stage 1 passed.
# `--dry-run` rehearses every stage at tiny sizes on the CPU (the kernel in Pallas interpret mode).
# Run from anywhere with a Python that has requirements.txt installed (PY=...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET=${BUDGET:-450}  # the checks start only before it; `timeout` stops a last one that overruns
export PYTHONUNBUFFERED=1
timeout --signal=INT --kill-after=10 $((BUDGET + 30)) \
    "$PY" benchmarks/device_check.py --budget "$BUDGET" --out "${OUT:-device_results}" "$@"
