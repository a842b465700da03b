"""The train step of a run config compiled for a target, as train.py builds it (`anjax.train.trainer.Trainer`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from anjax.aot.report import compile_report
from anjax.aot.shapes import forward_flops
from anjax.aot.target import Target
from anjax.core import sharding
from anjax.core.config import ModelConfig, num_params
from anjax.train import run_config
from anjax.train.trainer import BATCH_KEYS, Trainer


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
