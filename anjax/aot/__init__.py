"""Ahead-of-time compilation for a TPU or GPU topology that is not attached: memory and FLOPs per device.

    python -m anjax.aot --config configs/llama2-7b-ac.yaml --topology v5p:4x4x4 [--set key=value ...] [--json]
    python -m anjax.aot --config ... --topology v5e:2x2 --step prefill --step decode \\
        --batch 8 --capacity 2048 --chunk 256

Needs libtpu, or jax's CUDA plugin for `h100:N` (`bash scripts/setup_tpu_aot.sh`, then run with
`.venv-tpu/bin/python`); no TPU or GPU.

- `target`: the topology's compile-only devices and what one device has (HBM, bf16 peak, bandwidth).
- `shapes`: model shapes without weights (`--model-shape`, model.path's config.json) and FLOP/byte counting.
- `report`: compile a lowered program, report per-device memory (the compiler's `memory_analysis`), fit and
  the roofline time.
- `train`: the train step, `anjax.train.trainer.Trainer`'s, built exactly as train.py builds it (mesh,
  sharding rules, remat, optimizer, gradient accumulation) from abstract parameters and batches.
- `serve`: the engine's prefill chunk and decode loop, the server's decode step, and the most server slots
  that fit, placed over a (data, tensor) mesh as the engine places them.

Weights are never read: the model's shape comes from `--model-shape NAME` (`shapes.MODEL_SHAPES`), else
from model.path (a known hub name, null = the embedded SmolLM2, or a local HF directory's config.json), then
`model.arch` overrides as in train.py; AC mode adds the `<AC>` row. Anchor ids are placeholders (they change
neither shapes nor cost).

`model.attention=kernel` compiles the Pallas kernel of the target (Mosaic for TPU, Triton for h100), not
the host's: the report's `attention_path` says which path each program compiled.
FLOPs are counted from the shapes: XLA's `cost_analysis` counts a loop body once (scanned layers,
micro-batches), so its numbers are reported beside them but not used. The step-time estimate is the larger of
the compute-bound time (hardware FLOPs, remat recomputation included, at the chip's bf16 peak) and the
memory-bound time (HBM traffic at the chip's bandwidth); MFU is model FLOPs over that time.
"""
