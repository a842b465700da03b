#!/usr/bin/env bash
# Regenerate every number and plot of the README's Results section on this machine
# (about 140 minutes on 2 CPU cores): the training and decode benchmarks, where decode time goes,
# the base-model evaluation, and the main job (train, export, evaluate, generate), copied into
# benchmarks/results/. bench_roofline.py adds llama.cpp with requirements-bench.txt installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
$PY benchmarks/bench_train.py --batch-sizes 1 2 4 --steps 3
$PY benchmarks/bench_decode.py --chunk-size 256
$PY benchmarks/bench_attention.py --lengths 512 2048 4096 8192 --layers 2 --steps 2 --max-gib 6
$PY benchmarks/bench_roofline.py --lengths 1024 4096 --hf-threads 1 2 --repeats 2 --new-tokens 32
$PY benchmarks/bench_decode_layout.py
$PY benchmarks/bench_decode_layers.py --repeats 2
$PY benchmarks/profile_decode.py
$PY benchmarks/bench_matvec.py --rounds 3
$PY benchmarks/bench_decode_attention.py --repeats 5
$PY -m anjax.evaluate --tasks obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq --shots 0 \
    --cache full,anchor --anchor-mode ep --limit 20 --out-dir $R --name eval_smollm2_base
$PY -m anjax.evaluate --tasks obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq --shots 5 \
    --cache full,anchor --anchor-mode ep --limit 10 --out-dir $R --name eval_smollm2_base_5shot
RUN=runs/main-job bash scripts/main_job.sh
mkdir -p $R/main_job
cp runs/main-job/eval/before.md runs/main-job/eval/before.png runs/main-job/eval/after.md runs/main-job/eval/after.png \
   runs/main-job/metrics.jsonl runs/main-job/loss.png runs/main-job/demo.json $R/main_job/
echo "results in $R/"
