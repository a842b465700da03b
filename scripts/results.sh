#!/usr/bin/env bash
# Regenerate the result files that README.md and docs/ cite, into benchmarks/results/, on one machine.
#
#   bash scripts/results.sh              # 28 min on 2 idle CPU cores (+ ~5 min once: the main job builds data/corpus)
#   FULL=1 bash scripts/results.sh       # the settings the docs' tables name: ~110 min
#   MAIN_JOB=0 bash scripts/results.sh   # the benchmarks only
#
# The parts, with their wall time on the 2-core AMD EPYC machine class when it is otherwise idle: the default
# column measured end to end on ef71c79 (1,696 s in all; benchmarks/results/results_sh_times.tsv), the FULL=1
# column the seconds its result files recorded plus compilation, which they did not record (~5 s per inference
# shape, ~45 s per training-step shape: estimates). The machine class varies by ~20% between sittings; a
# busy machine takes longer. Each run appends its parts' measured seconds to results_sh_times.tsv.
#
#   part                  default                                 min   FULL=1                                min
#   bench_train.py        batch 1 2, 1 timed step                 3.1   batch 1 2 4, 3 steps                   ~7.5
#   bench_attention.py    512-4096, 2 layers, 1 step              2.3   512-8192, 2 steps, 30-layer memory     ~12
#   bench_decode.py       1k/4k, batch 1 16, no HF column         3.3   1k/4k/16k, batch 1 8 16, HF, 2 reps    ~30
#   bench_roofline.py     1k/4k, HF with 2 threads, 1 repeat      4.0   HF with 1 and 2 threads, 2 repeats     ~6
#   bench_policy_decode   -                                             1k, batch 1 16                         ~3
#   base-model evaluate   -                                             0-shot x 20 docs, 5-shot x 10 docs     ~22.5
#   main job              scripts/main_job.sh, 10 docs a task    15.6   50 docs a task (README's table)        ~29
#                         (train 7.6, base model 2.8, AnLLM 4.6)
#                                                                28.3                                        ~110
#
# The default writes the same files with fewer lengths, repeats and documents (each JSON's provenance names the
# command): the 16k-token and batch-8 rows of bench_decode, its HF column, the 8k and 30-layer columns of
# bench_attention, the main job's 50-document tables and the base-model evaluations (docs/results.md) come
# from FULL=1. Finished investigations are not rerun:
# benchmarks/investigations/*/NOTES.md. bench_roofline.py adds llama.cpp with requirements-bench.txt installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FULL=${FULL:-0}
MAIN_JOB=${MAIN_JOB:-1}
R=benchmarks/results
TIMES=$R/results_sh_times.tsv
TASKS=obqa,winogrande,arc_easy,arc_challenge,piqa,hellaswag,sciq,boolq
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

part() {  # part NAME COMMAND...: run it, record its wall seconds
    local name=$1 start=$SECONDS
    shift
    echo "=== $name ($(date +%H:%M:%S))"
    "$@"
    printf '%s\t%s\tFULL=%s\t%s\t%d\n' "$(date -u +%FT%TZ)" "$commit" "$FULL" "$name" $((SECONDS - start)) >> "$TIMES"
}

if [ "$FULL" = 1 ]; then
    part bench_train $PY benchmarks/bench_train.py --batch-sizes 1 2 4 --steps 3
    part bench_attention $PY benchmarks/bench_attention.py --lengths 512 2048 4096 8192 --layers 2 --steps 2 --max-gib 6
    part bench_decode $PY benchmarks/bench_decode.py --chunk-size 256
    part bench_roofline $PY benchmarks/bench_roofline.py --lengths 1024 4096 --hf-threads 1 2 --repeats 2 --new-tokens 32
    part bench_policy_decode $PY benchmarks/bench_policy_decode.py --lengths 1024
    part eval_base $PY -m anjax.evaluate --tasks $TASKS --shots 0 --cache full,anchor --anchor-mode ep --limit 20 \
        --out-dir $R --name eval_smollm2_base
    part eval_base_5shot $PY -m anjax.evaluate --tasks $TASKS --shots 5 --cache full,anchor --anchor-mode ep \
        --limit 10 --out-dir $R --name eval_smollm2_base_5shot
else
    part bench_train $PY benchmarks/bench_train.py --batch-sizes 1 2 --steps 1
    part bench_attention $PY benchmarks/bench_attention.py --lengths 512 2048 4096 --layers 2 --steps 1 \
        --memory-layers 0 --max-gib 6
    part bench_decode $PY benchmarks/bench_decode.py --lengths 1024 4096 --batches 1 16 --repeats 1 --chunk-size 256 \
        --hf-max-length 0
    part bench_roofline $PY benchmarks/bench_roofline.py --lengths 1024 4096 --hf-threads 2 --repeats 1 --new-tokens 32
fi

if [ "$MAIN_JOB" = 1 ]; then
    # the docs' main-job tables evaluate 50 documents per task; the default 10 (wider intervals, the same files)
    if [ "$FULL" = 1 ]; then limit=50; else limit=10; fi
    # a new run directory each time: an existing one would resume (train.py, evaluate) instead of rerunning
    run=runs/results-main-job-$(date -u +%Y%m%d-%H%M%S)
    part main_job env RUN=$run LIMIT=$limit bash scripts/main_job.sh
    mkdir -p $R/main_job
    cp $run/eval/before.md $run/eval/before.png $run/eval/after.md $run/eval/after.png $run/metrics.jsonl \
        $run/loss.png $run/demo.json $R/main_job/
fi
echo "results in $R/; seconds per part in $TIMES"
