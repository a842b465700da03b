"""Continued pre-training, SFT or from-scratch training of an AnLLM, sharded over a (data, fsdp, tensor) mesh.

    python train.py --config configs/smollm2-135m-ac.yaml [--set key.path=value ...]

Resumes from the latest checkpoint in run.dir; SIGTERM or Ctrl-C (SIGINT) saves a
checkpoint and exits 0 (a second signal exits at once, the last checkpoint intact);
a non-finite loss stops the run with the last good checkpoint intact.
At the end: RUN/export (Hugging Face format) and RUN/loss.png. See README.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from anjax import cli
from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.io import checkpoint, outputs
from anjax.io import run_dir as run_dir_files
from anjax.text.anchors import AnchorScheme, resolve_scheme
from anjax.train import metrics, run_config
from anjax.train.data import make_batches


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stops before any checkpoint of it is written."""


def prepare_model(rc: run_config.RunConfig) -> tuple[ModelConfig, dict | None, object]:
    """(cfg storing the run's anchor scheme, host params or None for random init, tokenizer) for a fresh run.

    The scheme comes from `anchors` and `data.add_bos` / `data.max_sentence_tokens` (`resolve_scheme`,
    which also gives `<AC>` an embedding row initialised by `anchors.ac_init`).
    """
    from anjax.io.loading import load_model, load_tokenizer
    m = rc.model
    runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                   attention=m.attention)
    if m.from_scratch:
        tokenizer, params = load_tokenizer(m.path), None
        if rc.anchors.mode == "ac":
            from anjax.text.anchors import add_ac_token
            add_ac_token(tokenizer)
        cfg = ModelConfig(**{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                             **m.arch, **runtime})
    else:
        cfg, params, tokenizer = load_model(m.path, **m.arch, **runtime)
    _, cfg, params = resolve_scheme(cfg, tokenizer, params, mode=rc.anchors.mode, tokens=rc.anchors.tokens,
                                    add_bos=rc.data.add_bos, max_sentence_tokens=rc.data.max_sentence_tokens or 0,
                                    ac_init=rc.anchors.ac_init)
    return cfg, params, tokenizer


def run_scheme(cfg: ModelConfig, tokenizer) -> AnchorScheme:
    """The anchor scheme stored in a run's model config."""
    return resolve_scheme(cfg, tokenizer)[0]


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def make_run_mesh(rc: run_config.RunConfig) -> jax.sharding.Mesh:
    """The mesh, after checking that the global batch splits over processes and data x fsdp devices."""
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    sharding.check_batch(mesh, rc.data.batch_size, rc.train.grad_accum, jax.process_count())
    return mesh


def model_for_run(rc: run_config.RunConfig, run_dir: Path, resumed: int | None):
    """(cfg, host params or None, tokenizer): from the run directory when resuming, else `prepare_model`."""
    if resumed is not None:
        run_dir_files.check_resumable(run_dir, rc.to_dict())
        cfg = run_dir_files.load_model_config(run_dir, dtype=rc.model.dtype, param_dtype=rc.model.param_dtype,
                                           remat=rc.model.remat, attention=rc.model.attention)
        return cfg, None, run_dir_files.tokenizer(run_dir)
    cfg, params, tokenizer = prepare_model(rc)
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
        from jax.experimental import multihost_utils
        n_val = int(np.max(multihost_utils.process_allgather(np.asarray(n_val))))
    return train_it, val_it, n_val


def evaluate(trainer, params, val_it, n_val: int) -> dict[str, float]:
    """Validation loss over the first `n_val` batches, full attention and anchor mask (and the KL to the
    teacher when distilling)."""
    sums: dict[str, float] = {}
    for i in range(n_val):
        out = trainer.eval_step(params, sharding.host_batch_to_global(val_it.batch(i), trainer.mesh))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
    n = max(sums.get("targets", 0.0), 1)
    result = {"val_loss_full": sums.get("full", 0.0) / n, "val_loss_anchor": sums.get("anchor", 0.0) / n}
    if "kl" in sums:
        result["val_kl"] = sums["kl"] / max(sums["kl_targets"], 1)
    return result


def stop_on_signals() -> dict:
    """{"signal": None}, set to "SIGTERM" / "SIGINT" by the first of them; a second one exits at once."""
    stop = {"signal": None}

    def handler(signum, _frame):
        if stop["signal"]:
            print(f"second signal ({signal.Signals(signum).name}): exiting now; the last finished checkpoint is intact",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)
    return stop


def train_loop(rc: run_config.RunConfig, trainer, state, train_it, validate, ckpt: checkpoint.Checkpointer,
               log: metrics.MetricsLog | None, stop: dict):
    """Steps state.step + 1 .. train.steps: log, validate, checkpoint. Returns the last state, which is
    short of train.steps once `stop["signal"]` is set; raises TrainingDiverged on a non-finite loss or gradient."""
    from tqdm import tqdm
    start, steps, saved = int(state.step), rc.train.steps, ckpt.latest_step()
    train_s = log.last("train_s", 0.0) if log is not None else 0.0  # optimizer-step seconds, over all sittings
    with tqdm(total=steps, initial=start, unit="step", disable=log is None, dynamic_ncols=True) as bar:
        def write(record):
            if log is None:
                return
            log.write(record)
            if "val_loss_full" in record:
                bar.write(f"step {record['step']}: validation loss full {record['val_loss_full']:.4f}, "
                          f"anchor {record['val_loss_anchor']:.4f}")

        if start == 0 and validate:
            write({"step": 0, **validate(state.params)})
        for step in range(start + 1, steps + 1):
            if _any_process(bool(stop["signal"])):
                break
            t = time.perf_counter()
            state, m = trainer.train_step(state, sharding.host_batch_to_global(next(train_it), trainer.mesh))
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            seconds = time.perf_counter() - t
            train_s += seconds
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                ckpt.wait()
                raise TrainingDiverged(f"loss {loss}, gradient norm {grad_norm} at step {step}: training stopped; "
                                       f"the last good checkpoint (step {saved}) in {ckpt.directory} is intact")
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": float(trainer.schedule(step - 1)),
                      "tokens_per_s": float(m["tokens"]) / seconds, "train_s": train_s}
            if "kl" in m:
                record["kl"] = float(m["kl"])
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update()
            if validate and (step % rc.eval.every == 0 or step == steps):
                record.update(validate(state.params))
            if step % rc.log.every == 0 or "val_loss_full" in record or step == steps:
                write(record)
            if step % rc.checkpoint.every == 0 or step == steps:
                ckpt.save(state, train_it.state())
                saved = step
    if int(state.step) not in (saved, 0):  # stopped by a signal between checkpoints
        ckpt.save(state, train_it.state())
    ckpt.wait()
    return state


def init_distributed(rc: run_config.RunConfig) -> None:
    """jax.distributed.initialize() when run.distributed is set or JAX_COORDINATOR_ADDRESS is in the
    environment. The process count and index come from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set;
    otherwise JAX detects them (TPU pods, SLURM, Open MPI, Kubernetes)."""
    env = os.environ
    if rc.run.distributed or env.get("JAX_COORDINATOR_ADDRESS"):
        num, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(num) if num else None, process_id=int(index) if index else None)


def check_outputs(rc: run_config.RunConfig) -> None:
    """run.dir must be writable, and RUN/export replaceable, before anything loads."""
    run_dir = cli.check_writable_dir(rc.run.dir, "run.dir")
    if rc.checkpoint.export_hf:
        outputs.check_replaceable(run_dir / "export")


def train(rc: run_config.RunConfig) -> int:
    init_distributed(rc)
    lead = jax.process_index() == 0
    mesh = make_run_mesh(rc)
    run_dir = Path(rc.run.dir)
    ckpt = checkpoint.Checkpointer(run_dir, rc.checkpoint.keep, rc.checkpoint.async_save)
    stop = stop_on_signals()
    try:
        resumed = ckpt.latest_step()
        cfg, params, tokenizer = model_for_run(rc, run_dir, resumed)
        train_it, val_it, n_val = data_for_run(rc, cfg, tokenizer)
        from anjax.train.trainer import Trainer
        trainer = Trainer(cfg, rc.train, mesh, rc.run.seed)
        if resumed is None:
            state = trainer.init_state(params)
        else:
            state, data_state = ckpt.restore(resumed, trainer.abstract_state)
            train_it.restore(data_state)
        if trainer.distill:  # the teacher is the starting model: on resume rebuilt from model.path (or run.seed)
            trainer.init_teacher(params if resumed is None else prepare_model(rc)[1])
        del params
        validate = (lambda p: evaluate(trainer, p, val_it, n_val)) if val_it is not None else None
        log = metrics.MetricsLog(run_dir, resumed, rc.log.tensorboard) if lead else None
        t0, start = time.perf_counter(), int(state.step)
        state = train_loop(rc, trainer, state, train_it, validate, ckpt, log, stop)
        final = int(state.step)
        if final < rc.train.steps:
            print(f"{stop['signal'] or 'a signal on another process'} at step {final}: " + (f"checkpoint saved in {ckpt.directory}; rerun the same command "
                                                  "to resume" if final else "nothing to save yet"))
            return 0
        if rc.checkpoint.export_hf:
            from jax.experimental import multihost_utils

            from anjax.io.hf import save_hf_dir
            host_params = multihost_utils.process_allgather(state.params, tiled=True)
            if lead:
                print(f"exported to {save_hf_dir(cfg, host_params, tokenizer, run_dir / 'export')}")
        if lead:
            log.close()
            metrics.plot_losses(log.path, run_dir / "loss.png")
            print(f"done: {final} steps ({final - start} in this process, {time.perf_counter() - t0:.0f} s); "
                  f"metrics in {log.path}, curve in {run_dir / 'loss.png'}")
        return 0
    finally:
        ckpt.close()


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML run config (default: all defaults)")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. --set train.steps=10 run.dir=runs/x")
    args = parser.parse_args(argv)
    rc = run_config.load(args.config, [o for group in args.overrides for o in group])
    check_outputs(rc)
    try:
        return train(rc)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    cli.run(main)
