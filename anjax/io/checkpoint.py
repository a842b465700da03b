"""The orbax checkpoints of a run directory (its other files: `anjax.io.run_dir`).

    RUN/config.yaml          the run config it started with (IDENTITY_KEYS are checked on resume)
    RUN/model_config.json    anjax ModelConfig (vocabulary, anchor settings) of the checkpoints
    RUN/tokenizer/           the tokenizer (with `<AC>` for AC runs)
    RUN/checkpoints/<step>/  orbax items: params, train (step, opt_state, rng), meta (data record, fingerprints)
    RUN/export/              Hugging Face directory written at the end of training

`load_for_inference(RUN)` gives (cfg, params, tokenizer) from the latest
checkpoint, so `anjax.io.loading.load_model` (infer.py, evaluation) accepts a run
directory as well as its export. A checkpoint that cannot be restored is
reported (the step directory, the file or the mismatch) and never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from anjax.core.config import ModelConfig
from anjax.core.model import init_params
from anjax.core.params import Params, with_scan_layers
from anjax.io import outputs
from anjax.io.run_dir import CheckpointError, inference_config, is_remote, load_model_config, storage_path
from anjax.io.run_dir import tokenizer as run_tokenizer


def _bits_sum(x: jax.Array) -> jax.Array:
    """Wrapping uint32 sum of the raw bits: exact and independent of summation order and sharding."""
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def fingerprints(tree) -> dict[str, int]:
    """{leaf path: bit-sum} of a tree of (possibly sharded) arrays; detects damaged checkpoint data."""
    sums = jax.jit(lambda t: jax.tree.map(_bits_sum, t))(tree)
    return {jax.tree_util.keystr(k): int(v) for k, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _describe(e: Exception, step_dir: Path | epath.Path) -> str:
    """One line saying what orbax/tensorstore could not read, naming the file where it can."""
    text = str(e)
    paths = re.findall(r"'path': '([^']*)'", text)
    if "TensorStore" in text and paths:
        return f"cannot read array {paths[-1].rstrip('/')!r} under {paths[0]} (data file missing or damaged)"
    if isinstance(e, json.JSONDecodeError):
        for f in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name != "d" and p.suffix != ".txt"):
            try:
                json.loads(f.read_text())
            except UnicodeDecodeError:
                continue
            except json.JSONDecodeError:
                return f"{f} is not valid JSON ({e})"
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())[:600] or type(e).__name__


class _DropNoSpace(logging.Filter):
    """Drops orbax's logged tracebacks of a full disk (its background threads log each one): the save, wait or
    close that meets the error reports it as one line (`Checkpointer._writing`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return not outputs.is_full_disk(record.exc_info[1])
        return os.strerror(errno.ENOSPC) not in record.getMessage()


class Checkpointer:
    """orbax CheckpointManager over RUN/checkpoints: async saves, keep the last `keep`.

    Items per step: `params`, `train` (step, opt_state, rng) and `meta` (JSON: the
    data-iterator state and a fingerprint of every array, checked on restore).
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2, async_save: bool = True, read_only: bool = False):
        root = storage_path(run_dir, "run.dir")
        self.directory = (root if is_remote(root) else root.resolve()) / "checkpoints"
        items = ("params", "train", "meta")
        if read_only:  # orbax logs a warning for every read-only manager; a loader has nothing to warn about
            absl_logger = logging.getLogger("absl")
            level = absl_logger.level
            absl_logger.setLevel(logging.ERROR)
            try:
                options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
                self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=items)
            finally:
                absl_logger.setLevel(level)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=items)
        self._quiet = _DropNoSpace()
        logging.getLogger("absl").addFilter(self._quiet)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, data_state: dict) -> None:
        """Start saving `state` (a trainer.TrainState) at its step; returns once arrays are copied off device."""
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        meta = {"data": data_state, "fingerprints": fingerprints({"params": state.params, "train": train})}
        with self._writing():  # also meets the previous save's error: orbax waits for it first
            self.manager.save(
                int(state.step),
                force=True,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    train=ocp.args.StandardSave(train),
                    meta=ocp.args.JsonSave(meta),
                ),
            )

    @contextlib.contextmanager
    def _writing(self):
        """A full disk met by a save (here or in orbax's background threads) becomes one CheckpointError
        naming the step's directory; its partial files are removed, the finished checkpoints stay as they are."""
        try:
            yield
        except Exception as e:
            if not outputs.is_full_disk(e):
                raise
            step = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
            path = self.directory / step[1] if step else self.directory
            if not is_remote(self.directory):
                for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            latest = self.manager.latest_step()
            kept = f"the checkpoint of step {latest} is intact" if latest is not None else "no checkpoint was finished"
            raise CheckpointError(
                f"{path}: no space left on device; {kept}: free some space and rerun the same command to resume"
            ) from None

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data-iterator state) of `step`, sharded like `abstract_state`.

        `abstract_state` is a trainer.TrainState (a flax.struct dataclass) of abstract arrays; the
        restored state is that value with its arrays replaced, so this module needs no trainer.
        """
        a = abstract_state
        train = {"step": a.step, "opt_state": a.opt_state, "rng": a.rng}
        out = self._restore(step, params=ocp.args.StandardRestore(a.params), train=ocp.args.StandardRestore(train))
        t = out["train"]
        state = a.replace(step=t["step"], params=out["params"], opt_state=t["opt_state"], rng=t["rng"])
        return state, dict(out["meta"]["data"])

    def restore_params(self, step: int, abstract_params: Params) -> Params:
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def _restore(self, step: int, **items) -> Mapping[str, Any]:
        """Restore `items` plus meta; every restored array must match its saved fingerprint."""
        step_dir = self.directory / str(step)
        advice = "-- left untouched; move it away to resume from an earlier checkpoint, or use another run.dir"
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
        except Exception as e:  # orbax/tensorstore raise many types; all mean "this checkpoint is unusable"
            raise CheckpointError(
                f"checkpoint {step_dir} cannot be restored: {_describe(e, step_dir)} {advice}"
            ) from None
        saved = out["meta"]["fingerprints"]
        for key, value in fingerprints({k: out[k] for k in items}).items():
            if saved.get(key) != value:
                item = step_dir / key.split("'")[1]
                raise CheckpointError(
                    f"checkpoint {step_dir}: array {key} does not match the fingerprint saved "
                    f"with it (damaged data file under {item}) {advice}"
                )
        return out

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            with self._writing():
                self.manager.close()
        finally:
            logging.getLogger("absl").removeFilter(self._quiet)


def load_for_inference(run_dir: str | Path, **overrides: Any) -> tuple[ModelConfig, Params, Any]:
    """(cfg, params as a numpy tree, tokenizer) from the latest checkpoint of a run directory.

    `cfg` is `anjax.io.run_dir.inference_config` (the same as loading RUN/export).
    """
    run_dir = Path(run_dir)
    stored, cfg = load_model_config(run_dir), inference_config(run_dir, **overrides)
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"{run_dir}: the run directory has no finished checkpoint yet")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_params(stored, jax.random.PRNGKey(0))),
        )
        params = jax.device_get(ckpt.restore_params(step, abstract))
    finally:
        ckpt.close()
    params = with_scan_layers(stored, params, cfg.scan_layers)[1]
    params = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.param_dtype)), params)
    return cfg, params, run_tokenizer(run_dir)
