"""Ahead-of-time compilation for a TPU topology that is not attached: memory and FLOPs per device.

    python -m anjax.aot --config configs/llama2-7b-ac.yaml --topology v5p:4x4x4 [--set key=value ...] [--json]
    python -m anjax.aot --config ... --topology v5e:2x2 --step prefill --step decode \\
        --batch 8 --capacity 2048 --chunk 256

Needs libtpu, or jax's CUDA plugin for `h100:N` (`bash scripts/setup_tpu_aot.sh`, then run with
`.venv-tpu/bin/python`); no TPU or GPU.
The train step is `anjax.train.trainer.Trainer`'s, built exactly as train.py builds it (mesh, sharding
rules, remat, optimizer, gradient accumulation) from abstract parameters and batches
(`jax.eval_shape`; nothing is materialised) and compiled by libtpu for the topology's devices.
Prefill and decode are the engine's own functions (`anjax.inference.engine`), on one device as the engine runs.

Weights are never read: the model's shape comes from `--model-shape NAME` (`MODEL_SHAPES`), else
from model.path (a known hub name, null = the embedded SmolLM2, or a local HF directory's
config.json), then `model.arch` overrides as in train.py; AC mode adds the `<AC>` row. Anchor ids
are placeholders (they change neither shapes nor cost).

`model.attention=kernel` compiles the Pallas kernel of the target (Mosaic for TPU, Triton for h100), not
the host's: the report's `attention_path` says which path each program compiled.
Memory is the compiler's (`memory_analysis`, per device). FLOPs are counted from the shapes
(`step_flops`): XLA's `cost_analysis` counts a loop body once (scanned layers, micro-batches), so
its numbers are reported beside them but not used. The step-time estimate is the larger of the
compute-bound time (hardware FLOPs, remat recomputation included, at the chip's bf16 peak) and the
memory-bound time (`step_hbm_bytes` at the chip's HBM bandwidth); MFU is model FLOPs over that time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from anjax.core import sharding
from anjax.core.config import AC_TOKEN, ModelConfig
from anjax.io.hf import config_from_hf
from anjax.train import run_config
from anjax.train.trainer import BATCH_KEYS, Trainer

GiB = 1 << 30
PALLAS_CUSTOM_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton")  # custom-call targets of Mosaic / Triton kernels


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip; a device of the topology may be a part of it (v4: one TensorCore of two)."""

    hbm_bytes: int
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    cores: int  # TensorCores per chip


# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), per chip.
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9, 2),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 1),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 2),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, 1),
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 (here the device_memory_size of specs/h100_sxm.txtpb), 989 TFLOP/s
    # dense bf16, 3.35 TB/s.
    "h100": Chip(84987740160, 989e12, 3.35e12, 1),
}
GPU_SPECS = {"h100": Path(__file__).parent / "specs" / "h100_sxm.txtpb"}  # XLA GpuTargetConfigProto text

# Shapes of models whose weights are not needed to size a job (HF config.json values).
MODEL_SHAPES = {
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "smollm2-135m": ModelConfig(),  # the defaults are SmolLM2-135M's
}
KNOWN_PATHS = {"meta-llama/Llama-2-7b-hf": "llama2-7b", None: "smollm2-135m"}


@dataclasses.dataclass(frozen=True)
class Target:
    """The topology's devices and what one device has (its share of a chip)."""

    name: str
    platform: str  # "tpu" | "gpu": picks the attention kernel (`target_attention`), never the host's backend
    devices: tuple
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float


def tpu_target(name: str) -> Target:
    """`gen:AxB[xC]` (e.g. v5e:16x16) -> compile-only devices from libtpu."""
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # no libtpu: jax cannot make a TPU topology
        raise ValueError(
            f"no TPU compiler here ({str(e).splitlines()[0]}): run `bash scripts/setup_tpu_aot.sh` "
            "and use .venv-tpu/bin/python"
        ) from None
    chip = CHIPS[name.split(":")[0]]
    share = getattr(devices[0], "num_cores", chip.cores) / chip.cores
    return Target(
        name,
        "tpu",
        tuple(devices),
        int(chip.hbm_bytes * share),
        chip.peak_bf16_flops * share,
        chip.hbm_bytes_per_s * share,
    )


def gpu_target(name: str) -> Target:
    """`h100:N` -> N compile-only GPUs on one host, described by anjax/train/specs/h100_sxm.txtpb (CUDA plugin)."""
    from jax.experimental import topologies

    gen, n = name.split(":")
    plugin_dir = Path(sys.prefix) / "aot-cuda"  # apart from site-packages: loaded, it logs on every jax start
    if plugin_dir.is_dir() and str(plugin_dir) not in sys.path:
        sys.path.append(str(plugin_dir))
    try:
        devices = topologies.get_topology_desc(
            platform="cuda", topology_name=gen, topology=f"1x1x{n}", target_config=GPU_SPECS[gen].read_text()
        ).devices
    except (NotImplementedError, RuntimeError) as e:  # no CUDA plugin, or it failed to register
        raise ValueError(
            f"no CUDA compiler here ({str(e).splitlines()[0]}): run `bash scripts/setup_tpu_aot.sh` "
            "and use .venv-tpu/bin/python"
        ) from None
    chip = CHIPS[gen]
    return Target(name, "gpu", tuple(devices), chip.hbm_bytes, chip.peak_bf16_flops, chip.hbm_bytes_per_s)


def make_target(name: str) -> Target:
    """Compile-only devices of a TPU topology (`v5e:16x16`) or of N GPUs on one host (`h100:8`)."""
    gen = name.split(":")[0]
    if gen in GPU_SPECS and re.fullmatch(r"[a-z0-9]+:[1-8]", name):
        return gpu_target(name)
    if gen in CHIPS and gen not in GPU_SPECS and re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name):
        return tpu_target(name)
    raise ValueError(
        f"unknown topology {name!r}: expected GEN:AxB[xC] with GEN one of "
        f"{', '.join(g for g in CHIPS if g not in GPU_SPECS)} (e.g. v5e:2x2, v4:2x2x4, v5p:4x4x4) "
        f"or {'|'.join(GPU_SPECS)}:N for N <= 8 GPUs on one host"
    )


def target_attention(cfg: ModelConfig, target: Target) -> ModelConfig:
    """`cfg` with `attention=kernel` bound to the target's kernel (kernel:tpu, Mosaic; kernel:gpu, Triton): the
    program is traced on the host, whose backend is the CPU, so the platform's choice is made here."""
    return cfg.replace(attention=f"kernel:{target.platform}") if cfg.attention == "kernel" else cfg


def attention_path(cfg: ModelConfig) -> str:
    """What the compiled program's attention is, for the report."""
    if cfg.attention.startswith("kernel:"):
        name = cfg.attention.removeprefix("kernel:")
        return f"sparse, band on the Pallas {'Mosaic TPU' if name == 'tpu' else 'Triton GPU'} kernel"
    return {"dense": "dense", "sparse": "sparse, tiled (XLA)", "auto": "auto: sparse tiled (XLA) from 256 tokens"}[
        cfg.attention
    ]


def model_config(rc: run_config.RunConfig, shape: str | None = None) -> ModelConfig:
    """The ModelConfig train.py would build for `rc`, from a shape table or config.json, without weights."""
    m = rc.model
    if shape is None and m.path is not None and (Path(m.path).expanduser() / "config.json").is_file():
        base = config_from_hf(json.loads((Path(m.path).expanduser() / "config.json").read_text()))
    else:
        shape = shape or KNOWN_PATHS.get(m.path)
        if shape not in MODEL_SHAPES:
            raise ValueError(
                f"model.path={m.path!r}: its shape is unknown without loading it; pass --model-shape "
                f"({', '.join(MODEL_SHAPES)}) or a local HF directory with config.json"
            )
        base = MODEL_SHAPES[shape]
    runtime = m.runtime()
    if m.from_scratch:  # train.py: defaults + the tokenizer's vocabulary and special ids + arch
        base = ModelConfig(
            vocab_size=base.vocab_size,
            bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
            pad_token_id=base.pad_token_id,
        )
    cfg = base.replace(**m.arch, **runtime)
    mode = rc.anchors.mode
    if mode == "ac":
        cfg = cfg.replace(vocab_size=cfg.vocab_size + 1)
        tokens, ids = (AC_TOKEN,), (cfg.vocab_size - 1,)
    elif mode == "ep":
        tokens = rc.anchors.tokens or (".", "?", "!")
        ids = tuple(range(3, 3 + len(tokens)))
    else:
        tokens, ids = (), ()
    return cfg.replace(anchor_mode=mode, anchor_tokens=tuple(tokens), anchor_ids=ids)


# ----------------------------------------------------------------------------- counting


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (every weight but the embedding lookup and norms)."""
    E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return cfg.num_layers * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + E * cfg.vocab_size


def num_params(cfg: ModelConfig) -> int:
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return matmul_params(cfg) + norms + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def forward_flops(cfg: ModelConfig, tokens: int, keys: int) -> float:
    """Forward FLOPs of `tokens` queries, each attending over `keys` slots (dense: masked ones count)."""
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys
    return tokens * (2 * matmul_params(cfg) + attention)


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one optimizer step: 3x forward, plus the remat recomputation."""
    fwd = forward_flops(cfg, batch * seq_len, seq_len)
    recompute = {"none": 0.0, "full": fwd, "dots": fwd - forward_flops(cfg, batch * seq_len, 0)}[
        cfg.remat
    ]  # attention dots have batch dims
    return 3 * fwd, 3 * fwd + recompute


def train_hbm_bytes(cfg: ModelConfig, grad_accum: int, n_devices: int, tensor: int) -> float:
    """Lower bound of HBM traffic per device and step: each micro-batch streams the gathered weights
    (compute dtype) through forward, backward (and the remat forward); the update reads params, grads
    and two Adam moments and writes three (fp32 state, sharded). Activations are not counted."""
    passes = 3 if cfg.remat == "full" else 2
    weights = num_params(cfg) / tensor * jnp.dtype(cfg.dtype).itemsize
    state = num_params(cfg) / n_devices * jnp.dtype(cfg.param_dtype).itemsize
    return grad_accum * passes * weights + 7 * state


def kv_bytes(cfg: ModelConfig, batch: int, slots: int) -> int:
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * slots * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


# ----------------------------------------------------------------------------- compiling


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def largest_arguments(named: dict[str, Any], top: int = 5) -> list[dict]:
    """The biggest per-device input buffers, by path."""
    leaves = [
        (f"{group}{jax.tree_util.keystr(path)}", _shard_bytes(x))
        for group, tree in named.items()
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    ]
    return [{"name": n, "bytes": b} for n, b in sorted(leaves, key=lambda t: -t[1])[:top]]


def compile_report(
    lowered: jax.stages.Lowered,
    target: Target,
    named_args: dict[str, Any],
    model_flops: float,
    hw_flops: float,
    hbm_bytes: float,
) -> dict[str, Any]:
    """Compile and report per-device memory, fit, FLOPs and the step-time estimate.

    `model_flops`, `hw_flops` and `hbm_bytes` are per device. An executable that does not fit the HBM
    is reported (fits: false, the compiler's message) with the largest arguments, not raised."""
    text = lowered.as_text()
    report: dict[str, Any] = {
        # custom calls of Pallas kernels in the lowered program: Mosaic (TPU), Triton (GPU)
        "pallas_kernel_calls": sum(text.count(f"@{name}(") for name in PALLAS_CUSTOM_CALLS),
        "hbm_bytes": target.hbm_bytes,
        "argument_bytes_by_group": {g: sum(_shard_bytes(x) for x in jax.tree.leaves(t)) for g, t in named_args.items()},
        "largest_arguments": largest_arguments(named_args),
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return {**report, "fits": False, "compiler_error": lines[:12]}
    mem = compiled.memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}  # GPU: None
    compute_s, memory_s = hw_flops / target.peak_flops, hbm_bytes / target.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    return {
        **report,
        "fits": total <= target.hbm_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "total_bytes": total,
        "model_flops": model_flops,
        "hardware_flops": hw_flops,
        "hbm_traffic_bytes": hbm_bytes,
        "xla_flops_loop_bodies_once": cost.get("flops"),
        "xla_bytes_accessed_loop_bodies_once": cost.get("bytes accessed"),
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "step_s": step_s,
        "mfu": model_flops / (step_s * target.peak_flops) if step_s else None,
    }


def train_report(rc: run_config.RunConfig, cfg: ModelConfig, target: Target) -> dict[str, Any]:
    """The train step of `rc` on `target`, as train.py builds it."""
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices=target.devices)
    sharding.check_batch(mesh, rc.data.batch_size, rc.train.grad_accum)
    trainer = Trainer(cfg, rc.train, mesh, rc.run.seed)
    B, L, n = rc.data.batch_size, rc.data.seq_len, len(target.devices)
    dtypes = {"valid": jnp.bool_, "loss_mask": jnp.bool_}
    batch = {
        k: jax.ShapeDtypeStruct((B, L), dtypes.get(k, jnp.int32), sharding=sharding.batch_sharding(mesh))
        for k in BATCH_KEYS
    }
    model, hw = train_flops(cfg, B, L)
    state = trainer.abstract_state
    report = compile_report(
        trainer.lower_train_step(batch),
        target,
        {"params": state.params, "opt_state": state.opt_state, "batch": batch},
        model / n,
        hw / n,
        train_hbm_bytes(cfg, rc.train.grad_accum, n, mesh.shape["tensor"]),
    )
    return {
        "step": "train",
        "mesh": dict(mesh.shape),
        "global_batch": B,
        "seq_len": L,
        "grad_accum": rc.train.grad_accum,
        "rows_per_device": B / (mesh.shape["data"] * mesh.shape["fsdp"]),
        "tokens_per_step": B * L,
        **report,
    }
