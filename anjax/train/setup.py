"""A training run's pieces, built once for train.py (`anjax.train.loop`) and reusable by other tools.

`fresh_model` (load or random-init, `<AC>` row, the run's anchor scheme), `make_run_mesh` (batch,
process and mesh divisibility checked), `model_for_run` (resume from the run directory or start fresh),
`data_for_run` (this process's data shard), `init_distributed`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.io import run_dir as run_dir_files
from anjax.io.loading import load_model, load_tokenizer
from anjax.text.anchors import AnchorScheme, add_ac_token, resolve_scheme
from anjax.train import run_config
from anjax.train.data import make_batches


def fresh_model(rc: run_config.RunConfig) -> tuple[ModelConfig, dict | None, object]:
    """(cfg storing the run's anchor scheme, host params or None for random init, tokenizer) for a fresh run.

    The scheme comes from `anchors` and `data.add_bos` / `data.max_sentence_tokens` (`resolve_scheme`,
    which also gives `<AC>` an embedding row initialised by `anchors.ac_init`).
    """
    m = rc.model
    runtime = m.runtime()
    if m.from_scratch:
        tokenizer, params = load_tokenizer(m.path), None
        if rc.anchors.mode == "ac":
            add_ac_token(tokenizer)
        cfg = ModelConfig(
            **{
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                **m.arch,
                **runtime,
            }
        )
    else:
        cfg, params, tokenizer = load_model(m.path, **m.arch, **runtime)
    _, cfg, params = resolve_scheme(
        cfg,
        tokenizer,
        params,
        mode=rc.anchors.mode,
        tokens=rc.anchors.tokens,
        add_bos=rc.data.add_bos,
        max_sentence_tokens=rc.data.max_sentence_tokens or 0,
        ac_init=rc.anchors.ac_init,
    )
    return cfg, params, tokenizer


def run_scheme(cfg: ModelConfig, tokenizer) -> AnchorScheme:
    """The anchor scheme stored in a run's model config."""
    return resolve_scheme(cfg, tokenizer)[0]


def any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def make_run_mesh(rc: run_config.RunConfig) -> jax.sharding.Mesh:
    """The mesh, after checking that the global batch splits over processes and data x fsdp devices."""
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    sharding.check_batch(mesh, rc.data.batch_size, rc.train.grad_accum, jax.process_count())
    return mesh


def model_for_run(rc: run_config.RunConfig, run_dir: Path, resumed: int | None):
    """(cfg, host params or None, tokenizer): from the run directory when resuming, else `fresh_model`."""
    if resumed is not None:
        run_dir_files.check_resumable(run_dir, rc.to_dict())
        run_config.check_resume(rc, yaml.safe_load((run_dir / "config.yaml").read_text()), run_dir)
        cfg = run_dir_files.load_model_config(
            run_dir,
            dtype=rc.model.dtype,
            param_dtype=rc.model.param_dtype,
            remat=rc.model.remat,
            attention=rc.model.attention,
        )
        run_config.check_fits(rc.data, cfg.max_position_embeddings)
        return cfg, None, run_dir_files.tokenizer(run_dir)
    cfg, params, tokenizer = fresh_model(rc)
    run_config.check_fits(rc.data, cfg.max_position_embeddings)
    if jax.process_index() == 0:
        run_dir_files.save_run_files(run_dir, rc.to_dict(), cfg, tokenizer)
    return cfg, params, tokenizer


def data_for_run(rc: run_config.RunConfig, cfg: ModelConfig, tokenizer):
    """(training iterator, validation iterator or None, validation batches) of this process's data shard."""
    P = jax.process_count()
    shard = dict(shard_index=jax.process_index(), num_shards=P)
    scheme = run_scheme(cfg, tokenizer)
    train_it = make_batches(rc.data, tokenizer, scheme, train=True, **shard)
    if not (rc.eval.every and rc.data.eval_split):
        return train_it, None, 0
    val_it = make_batches(rc.data, tokenizer, scheme, train=False, **shard)
    n_val = val_it.steps_per_epoch if rc.eval.batches is None else rc.eval.batches
    if P > 1:  # hosts' shards differ in length; past its end a host feeds padding rows
        n_val = int(np.max(multihost_utils.process_allgather(np.asarray(n_val))))
    return train_it, val_it, n_val


def init_distributed(rc: run_config.RunConfig) -> None:
    """jax.distributed.initialize() when run.distributed is set or JAX_COORDINATOR_ADDRESS is in the
    environment. The process count and index come from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set;
    otherwise JAX detects them (TPU pods, SLURM, Open MPI, Kubernetes)."""
    env = os.environ
    if rc.run.distributed or env.get("JAX_COORDINATOR_ADDRESS"):
        num, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(num) if num else None, process_id=int(index) if index else None)
