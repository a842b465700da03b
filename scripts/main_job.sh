#!/usr/bin/env bash
# The main job, end to end: make an AnLLM-AC from the embedded SmolLM2-135M and use it.
#   1. continued pre-training with the anchor mask (train.py; validation loss in both modes), first, so that
#      RUN is the run directory anjax made (train.py refuses a folder holding files it did not write)
#   2. zero-shot slice of the eight tasks on the base model (full cache, and EP anchor cache; Acc and C↓)
#   3. export to Hugging Face format (python -m anjax.export)
#   4. the same zero-shot slice on the AnLLM-AC (full and anchor cache: Acc, C↓, T↑)
#   5. a generation demo with cache statistics (infer.py)
# Every knob is an environment variable (the test suite runs a tiny version through here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/smollm2-135m-ac.yaml}
RUN=${RUN:-runs/main-job}
BASE_MODEL=${BASE_MODEL:-}            # empty = the embedded SmolLM2-135M-Instruct
TASKS=${TASKS:-obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq}
LIMIT=${LIMIT:-50}                    # documents per task (95% intervals: about ±14 points a task, ±5 on the average)
TRAIN_SET=${TRAIN_SET:-}              # extra train.py overrides, e.g. "train.steps=10"
DATA=${DATA:-auto}                    # auto = data/corpus, built first when missing (python -m anjax.corpus); embedded = the small corpus
PROMPT=${PROMPT:-"The Python interpreter reads a program. It parses the text into tokens. Then"}
base_arg=(); [ -n "$BASE_MODEL" ] && base_arg=(--model "$BASE_MODEL")
stage() { echo; echo "=== [$1/5] $2 ($(date +%H:%M:%S))"; }

if [ "$DATA" = auto ]; then
    # the README's main-job table trained on the offline corpus: build it when missing (~5 min)
    [ -f data/corpus/dataset_dict.json ] || $PY -m anjax.corpus \
        || echo "note: the offline corpus could not be built (above); training on the embedded corpus"
    if [ -f data/corpus/dataset_dict.json ]; then DATA=data/corpus; else DATA=embedded; fi
fi
data_arg=(); [ "$DATA" != embedded ] && data_arg=("data.path=$DATA")
stage 1 "continued pre-training as AnLLM-AC ($CONFIG, data: $DATA)"
# shellcheck disable=SC2086
$PY train.py --config "$CONFIG" --set run.dir="$RUN" checkpoint.export_hf=false "${data_arg[@]}" $TRAIN_SET

stage 2 "evaluate the base model: $TASKS, $LIMIT docs each, zero-shot"
# accuracy and C↓ only: the base model is the reference, and T↑'s extra paths (recomputation) would add ~40%
$PY -m anjax.evaluate "${base_arg[@]}" --tasks "$TASKS" --limit "$LIMIT" --shots 0 --cache full,anchor \
    --anchor-mode ep --no-timing --out-dir "$RUN/eval" --name before

stage 3 "export to Hugging Face format"
$PY -m anjax.export --model "$RUN" --out "$RUN/hf"

stage 4 "evaluate the AnLLM-AC: full and anchor cache"
$PY -m anjax.evaluate --model "$RUN/hf" --tasks "$TASKS" --limit "$LIMIT" --shots 0 --cache full,anchor \
    --out-dir "$RUN/eval" --name after

stage 5 "generate with the anchor cache"
$PY infer.py --model "$RUN/hf" --prompt "$PROMPT" --max-new-tokens 32 --json | tee "$RUN/demo.json"

echo
echo "=== done. Written:"
echo "  $RUN/metrics.jsonl, $RUN/loss.png, $RUN/tb/   training metrics (validation loss in full and anchor mode)"
echo "  $RUN/checkpoints/                            orbax checkpoints (resumable)"
echo "  $RUN/hf/                                     Hugging Face export (loads with transformers; anchor settings kept)"
echo "  $RUN/eval/before.md, $RUN/eval/after.md      Acc / C↓ / T↑ tables (+ .json, .png)"
echo "  $RUN/demo.json                               generation demo with cache statistics"
