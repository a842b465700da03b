"""The training loop of train.py: signals, NaN stop, validation, logging, checkpoints, export.

`train(rc)` is the whole run (train.py only parses arguments and calls it); `train_loop` steps a
state until `StopSignal` says stop; `validation_loss` is the loss on the validation split.
Resumes from the latest checkpoint in run.dir; SIGTERM or Ctrl-C (SIGINT) to any one process saves a
checkpoint on every process at one step and stops (a second signal exits at once, the last checkpoint
intact); a non-finite loss raises TrainingDiverged with the last good checkpoint intact.
At the end: RUN/export and RUN/loss.png.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from anjax.core import sharding
from anjax.core.params import Params
from anjax.io import checkpoint
from anjax.io import run_dir as run_dir_files
from anjax.io.hf import save_hf_dir
from anjax.train import metrics, run_config, setup
from anjax.train.trainer import Trainer


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stops before any checkpoint of it is written."""


def validation_loss(trainer, params: Params, val_it, n_val: int) -> dict[str, float]:
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


class StopSignal:
    """Stops training for SIGTERM or SIGINT at the same step on every process; a second signal exits at
    once, the last finished checkpoint intact (on several processes only a second SIGINT: JAX's handler
    takes every SIGTERM).

    One process: either signal sets a flag that is checked before each step. Several processes: SIGTERM
    is JAX's preemption notice (jax.distributed.initialize installs its handler; the coordination service
    tells every process, and `reached_preemption_sync_point` turns true on all of them at the same step,
    without a collective per step), and SIGINT raises that notice. With the preemption service disabled
    (jax_enable_preemption_service=False) the processes all-gather the flag before each step instead.
    """

    def __init__(self):
        self.signal: str | None = None
        self.preemption = jax.process_count() > 1 and jax.config.jax_enable_preemption_service  # pyright: ignore[reportAttributeAccessIssue]  # registered at run time
        for s in (signal.SIGINT,) if self.preemption else (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, _frame):
        if self.signal:
            print(
                f"second signal ({signal.Signals(signum).name}): exiting now; the last finished checkpoint is intact",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.signal = signal.Signals(signum).name
        if self.preemption:
            signal.raise_signal(signal.SIGTERM)  # to JAX's handler: every process stops at one step

    def reached(self, step: int) -> bool:
        """Whether to stop now, with `step` optimizer steps done (the same answer on every process)."""
        if self.preemption:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or "a preemption notice (SIGTERM) to one of the processes"
                return True
            return False
        return setup.any_process(bool(self.signal))


def train_loop(
    rc: run_config.RunConfig,
    trainer,
    state,
    train_it,
    validate,
    ckpt: checkpoint.Checkpointer,
    log: metrics.MetricsLog | None,
    stop: StopSignal,
):
    """Steps state.step + 1 .. train.steps: log, validate, checkpoint. Returns the last state, which is
    short of train.steps once `stop` is reached; raises TrainingDiverged on a non-finite loss or gradient."""
    start, steps, saved = int(state.step), rc.train.steps, ckpt.latest_step()
    train_s = log.last("train_s", 0.0) if log is not None else 0.0  # optimizer-step seconds, over all sittings
    with tqdm(total=steps, initial=start, unit="step", disable=log is None, dynamic_ncols=True) as bar:

        def write(record):
            if log is None:
                return
            log.write(record)
            if "val_loss_full" in record:
                bar.write(
                    f"step {record['step']}: validation loss full {record['val_loss_full']:.4f}, "
                    f"anchor {record['val_loss_anchor']:.4f}"
                )

        if start == 0 and validate:
            write({"step": 0, **validate(state.params)})
        for step in range(start + 1, steps + 1):
            if stop.reached(step - 1):
                break
            t = time.perf_counter()
            state, m = trainer.train_step(state, sharding.host_batch_to_global(next(train_it), trainer.mesh))
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            seconds = time.perf_counter() - t
            train_s += seconds
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                ckpt.wait()
                raise TrainingDiverged(
                    f"loss {loss}, gradient norm {grad_norm} at step {step}: training stopped; "
                    f"the last good checkpoint (step {saved}) in {ckpt.directory} is intact"
                )
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": float(trainer.schedule(step - 1)),
                "tokens": float(m["tokens"]),  # real (not padding) tokens of the global batch
                "slots": rc.data.batch_size * rc.data.seq_len,  # its token slots
                "tokens_per_s": float(m["tokens"]) / seconds,
                "train_s": train_s,
            }
            if "kl" in m:
                record["kl"] = float(m["kl"])
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update()
            if validate and (step % rc.eval.every == 0 or step == steps):
                record.update(validate(state.params))
            if step % rc.log.every == 0 or "val_loss_full" in record or step == steps:
                write(record)
            if step % rc.checkpoint.every == 0 or step == steps:
                ckpt.save(state, setup.data_record(train_it, trainer.mesh))
                saved = step
    if int(state.step) not in (saved, 0):  # stopped by a signal between checkpoints
        ckpt.save(state, setup.data_record(train_it, trainer.mesh))
    ckpt.wait()
    return state


def export(cfg, host_params: Params, tokenizer, out_dir: Path | epath.Path) -> Path | epath.Path:
    """RUN/export (`save_hf_dir`); on gs:// written in a local temporary directory and copied up."""
    if not run_dir_files.is_remote(out_dir):
        return save_hf_dir(cfg, host_params, tokenizer, Path(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir_files.upload_dir(save_hf_dir(cfg, host_params, tokenizer, Path(tmp) / "export"), out_dir)
    return out_dir


def train(rc: run_config.RunConfig) -> int:
    """The whole run of `rc`: resume or start, train, checkpoint, export, plot. 0 when done or stopped by a
    signal (checkpoint saved); raises TrainingDiverged on a non-finite loss."""
    sharding.init_distributed(rc.run.distributed)
    lead = jax.process_index() == 0
    mesh = setup.make_run_mesh(rc)
    run_dir = run_dir_files.storage_path(rc.run.dir, "run.dir")
    ckpt = checkpoint.Checkpointer(run_dir, rc.checkpoint.keep, rc.checkpoint.async_save)
    stop = StopSignal()
    try:
        resumed = ckpt.latest_step()
        cfg, params, tokenizer = setup.model_for_run(rc, run_dir, resumed)
        train_it, val_it, n_val = setup.data_for_run(rc, cfg, tokenizer, mesh)
        trainer = Trainer(cfg, rc.train, mesh, rc.run.seed)
        if resumed is None:
            state = trainer.init_state(params)
        else:
            state, data_state = ckpt.restore(resumed, trainer.abstract_state)
            setup.restore_data(train_it, data_state, mesh, f"checkpoint {ckpt.directory / str(resumed)}")
        if trainer.distill:  # the teacher is the starting model: on resume rebuilt from model.path (or run.seed)
            trainer.init_teacher(params if resumed is None else setup.fresh_model(rc)[1])
        del params
        validate = (lambda p: validation_loss(trainer, p, val_it, n_val)) if val_it is not None else None
        log = metrics.MetricsLog(run_dir, resumed, rc.log.tensorboard) if lead else None
        t0, start = time.perf_counter(), int(state.step)
        state = train_loop(rc, trainer, state, train_it, validate, ckpt, log, stop)
        final = int(state.step)
        if final < rc.train.steps:
            print(
                f"{stop.signal} at step {final}: "
                + (
                    f"checkpoint saved in {ckpt.directory}; rerun the same command to resume"
                    if final
                    else "nothing to save yet"
                )
            )
            return 0
        if rc.checkpoint.export_hf:
            host_params = multihost_utils.process_allgather(state.params, tiled=True)
            if lead:
                print(f"exported to {export(cfg, host_params, tokenizer, run_dir / 'export')}")
        if log is not None:  # lead: the one process with a log
            log.close()
            metrics.plot_losses(log.path, run_dir / "loss.png")
            print(
                f"done: {final} steps ({final - start} in this process, {time.perf_counter() - t0:.0f} s); "
                f"metrics in {log.path}, curve in {run_dir / 'loss.png'}"
            )
        return 0
    finally:
        ckpt.close()
