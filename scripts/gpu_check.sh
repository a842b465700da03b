#!/usr/bin/env bash
# One prepared accelerator check (an H100/H200 with at most 15 minutes of device time):
#   1. training throughput and MFU in bf16 (SmolLM2-135M shape, seq 512; target MFU >= 40% on an H100)
#   2. decode throughput, anchor vs full cache (SmolLM2-135M; prompts 1k/4k, batch 1/16)
#   3. a 10-minute continued pre-training of SmolLM2-135M as AnLLM-AC in bf16
#   4. the train step with dense vs sparse attention (anjax.core.sparse_attention; its band on the Triton
#      Pallas flash kernel, anjax.core.flash_kernels), bf16, seq 4k/8k/16k,
#      the full 30 layers: step time and compiled memory (a dense step that cannot fit is compiled only)
# Outputs go to ${OUT:-gpu_results}/. Run from the repository root with a Python that has
# requirements.txt installed (PY=...) and the embedded model present (setup.sh; on a machine
# without PyPI, carry the wheels and the GGUF file). Each stage has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"

echo "=== [1/4] training MFU, bf16"
timeout 180 $PY benchmarks/bench_train.py --dtype bfloat16 --seq-len 512 --batch-sizes 8 16 32 --steps 5 --scan-layers \
    2>&1 | tee "$OUT/bench_train.txt"

echo "=== [2/4] decode, anchor vs full cache"
timeout 200 $PY benchmarks/bench_decode.py --quick --hf-max-length 0 --out "$OUT/bench_decode" 2>&1 | tee "$OUT/bench_decode.txt"

echo "=== [3/4] 10-minute continued pre-training, bf16"
timeout 600 $PY train.py --config configs/smollm2-135m-ac.yaml --set run.dir="$OUT/run" model.dtype=bfloat16 \
    data.seq_len=1024 data.batch_size=32 train.steps=100000 eval.every=100 checkpoint.every=200 \
    2>&1 | tail -n 40 | tee "$OUT/train.txt"
cp "$OUT/run/metrics.jsonl" "$OUT/run/loss.png" "$OUT/" 2>/dev/null || true

echo "=== [4/4] dense vs sparse attention, train step, bf16"
timeout 300 $PY benchmarks/bench_attention.py --dtype bfloat16 --lengths 4096 8192 16384 --layers 30 \
    --scan-layers --memory-layers 0 --steps 3 --tile 512 --max-gib 100 --out "$OUT" 2>&1 | tee "$OUT/bench_attention.txt"
echo "=== outputs in $OUT/"
