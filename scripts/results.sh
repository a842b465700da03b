#!/usr/bin/env bash
# Regenerate every number and plot of the README's Results section on this machine
# (about 100 minutes on 2 CPU cores): the training and decode benchmarks, the base-model
# evaluation, and the main job (train, export, evaluate, generate), copied into benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
$PY benchmarks/bench_train.py --batch-sizes 1 2 4 --steps 3
$PY benchmarks/bench_decode.py
$PY benchmarks/bench_attention.py --lengths 512 2048 4096 8192 --layers 2 --steps 2 --max-gib 6
$PY -m anjax.evaluate --tasks obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq --shots 0 \
    --cache full,anchor --anchor-mode ep --limit 20 --out-dir $R --name eval_smollm2_base
$PY -m anjax.evaluate --tasks obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq --shots 5 \
    --cache full,anchor --anchor-mode ep --limit 10 --out-dir $R --name eval_smollm2_base_5shot
RUN=runs/main-job bash scripts/main_job.sh
mkdir -p $R/main_job
cp runs/main-job/eval/before.md runs/main-job/eval/before.png runs/main-job/eval/after.md runs/main-job/eval/after.png \
   runs/main-job/metrics.jsonl runs/main-job/loss.png runs/main-job/demo.json $R/main_job/
echo "results in $R/"
