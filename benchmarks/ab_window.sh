#!/usr/bin/env bash
# Issue #35's A/B at equal wall-clock: does local context (a window of n neighbouring tokens, SepLLM's
# rule) make AnLLM training worth it? Five arms continue SmolLM2-135M-Instruct on the offline corpus
# (`python -m anjax.corpus`) one after another from the long recipe (configs/smollm2-135m-ac-long.yaml):
#   ac         AnLLM-AC as today (window 0, AnSAN, cosine to lr/10)
#   ac-w64     + every token sees its last 64 positions (anchors.window=64)
#   sepllm-w64 SepLLM post-training: EP anchors at SepLLM's separators, every token sees earlier
#              separators (anchors.rule=sepllm), a window of 64 (the training mask has no sinks)
#   ac-w16     + its last 16 positions
#   ac-const   AnLLM-AC with a constant learning rate (the plateau met the cosine floor)
# Chosen by held-out perplexity in each arm's own anchor cache on text tokens (the validation loss also
# counts <AC> targets, which the EP arm lacks; --ppl: the first 16 documents of the corpus' validation split,
# ~20k tokens in rows of 512, ~5 min an arm alone), the validation losses and KV kept beside it, never by
# the tasks; benchmarks/ab_objectives.py --sequential runs the arms in turn (the order above: the baseline
# and the likeliest winners first), each to its last step or SECONDS_BUDGET (train.py saves and exits),
# skips finished arms and resumes on a rerun, and writes OUT/ab.{md,json,png} at equal steps. A screening
# A/B: the cosine arms decay over STEPS=100 (200k tokens each), held-out loss at steps 0, 50 and 100 (16k
# tokens in each mask: ~2 min); ~40 min an arm, ~3.3 h in all on 2 idle cores, across sittings; the winner
# then runs the long recipe's full budget. The arms cost the same per step
# (the window only changes the mask), so the budget is their steps; one at a time they hold ~3-5 GB (side
# by side five held ~14 GB). Launched with setsid, nice alone does not yield (its own autogroup):
# `echo 19 > /proc/$PID/autogroup` does; SIGSTOP/SIGCONT pause it around timed runs.
#   benchmarks/ab_window.sh                                  # the full A/B (resumable: rerun it)
#   SECONDS_BUDGET=300 STEPS=3 OUT=/tmp/ab-smoke benchmarks/ab_window.sh   # wiring smoke test
#   benchmarks/ab_window.sh --report-only                    # the table of what ran so far
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET=${SECONDS_BUDGET:-100000}
STEPS=${STEPS:-100}
OUT=${OUT:-runs/ab-window}
CONFIG=${CONFIG:-configs/smollm2-135m-ac-long.yaml}
SEPARATORS='[".", ",", "?", "!", ";", ":"]'
exec .venv/bin/python benchmarks/ab_objectives.py --config "$CONFIG" --seconds "$SECONDS_BUDGET" --out "$OUT" \
  --sequential \
  --arm ac= \
  --arm ac-w64=anchors.window=64 \
  --arm "sepllm-w64=anchors.mode=ep,anchors.tokens=$SEPARATORS,anchors.rule=sepllm,anchors.window=64" \
  --arm ac-w16=anchors.window=16 \
  --arm ac-const=train.schedule=constant \
  --ppl "--ppl-data data/corpus/validation --limit 16 --seq-len 512 --chunk-size 512 --batch-size 16" \
  --set "train.steps=$STEPS" eval.every=50 eval.batches=8 checkpoint.every=25 checkpoint.keep=1 \
  log.tensorboard=false checkpoint.export_hf=false "$@"
