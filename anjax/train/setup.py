"""A training run's pieces, built once for train.py (`anjax.train.loop`) and reusable by other tools.

`fresh_model` (load or random-init, `<AC>` row, the run's anchor scheme), `make_run_mesh` (batch and
mesh divisibility checked), `model_for_run` (resume from the run directory or start fresh),
`data_for_run` (this process's rows of the global batches), `data_record` / `restore_data` (the data
position and process layout saved with a checkpoint).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import yaml
from etils import epath
from jax.experimental import multihost_utils

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.io import run_dir as run_dir_files
from anjax.io.loading import load_model, load_tokenizer
from anjax.text.anchors import AnchorScheme, add_ac_token, resolve_scheme
from anjax.train import prepare, run_config


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
        window=rc.anchors.window,
        rule=rc.anchors.rule,
        splitter=rc.anchors.splitter,
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
    """The mesh, after checking that each micro-batch splits over the data x fsdp devices."""
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    sharding.check_batch(mesh, rc.data.batch_size, rc.train.grad_accum)
    return mesh


def model_for_run(rc: run_config.RunConfig, run_dir: Path | epath.Path, resumed: int | None):
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


def data_for_run(rc: run_config.RunConfig, cfg: ModelConfig, tokenizer, mesh: jax.sharding.Mesh):
    """(training iterator, validation iterator or None, validation batches): this process's rows of the
    global batches, the same global batches whatever the number of processes.

    A source that is not a prepared directory is prepared once into RUN/data (process 0 first; the
    others then find it there on a shared run.dir, or prepare their own identical copy); with run.dir on
    gs:// into this host's cache (`prepare.local_data_cache`), since the loader memory-maps its shards.
    """
    scheme = run_scheme(cfg, tokenizer)
    cache = prepare.local_data_cache() if run_dir_files.is_remote(rc.run.dir) else Path(rc.run.dir) / "data"
    splits = [rc.data.split] + ([rc.data.eval_split] if rc.eval.every and rc.data.eval_split else [])
    if jax.process_count() > 1 and not prepare.is_prepared(rc.data.path):
        if jax.process_index() == 0:
            for split in splits:
                prepare.load_split(rc.data, tokenizer, scheme, split, cache)
        multihost_utils.sync_global_devices("anjax: the run's corpus is prepared")
    rows = sharding.process_row_indices(mesh, rc.data.batch_size)
    make = functools.partial(prepare.make_batches, rc.data, tokenizer, scheme, rows=rows, cache_dir=cache)
    train_it = make(train=True)
    if len(splits) == 1:
        return train_it, None, 0
    val_it = make(train=False)
    n_val = val_it.steps_per_epoch if rc.eval.batches is None else min(rc.eval.batches, val_it.steps_per_epoch)
    return train_it, val_it, n_val


def _layout(mesh: jax.sharding.Mesh) -> dict:
    return {"processes": jax.process_count(), "mesh": {a: int(mesh.shape[a]) for a in sharding.MESH_AXES}}


def data_record(train_it, mesh: jax.sharding.Mesh) -> dict:
    """What a checkpoint stores about the data: the iterator state and the processes and mesh that read it."""
    return {"iterator": train_it.state(), **_layout(mesh)}


def restore_data(train_it, record: dict, mesh: jax.sharding.Mesh, where: str) -> None:
    """Continue `train_it` from a checkpoint's `data_record`.

    Every checkpoint with a layout record was read in the global order (batch `step` is a function of
    (seed, step), each process reading its rows of it), so it resumes on any processes and mesh. A
    checkpoint without one was read per process from contiguous document shards: its batches are those
    of the global order only if one process wrote it, which it cannot show, so several processes refuse it.
    """
    if "iterator" not in record:
        if jax.process_count() > 1:
            raise run_dir_files.CheckpointError(
                f"{where} does not record how many processes wrote it (saved by an older anjax that sharded "
                "documents per process): resume it with 1 process, or use another run.dir"
            )
        train_it.restore(record)
        return
    was, now = {k: record[k] for k in ("processes", "mesh")}, _layout(mesh)
    if was != now and jax.process_index() == 0:
        print(f"resuming {where} (written by {was}) with {now}: the global batches are the same")
    train_it.restore(record["iterator"])
