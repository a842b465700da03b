"""One global data order: 2 processes x 2 devices (jax.distributed, gloo) train on the batches of one
process, and a checkpoint of that run resumed on 1 process continues with the same batches."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from anjax.core import sharding
from anjax.io.loading import load_tokenizer
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.train import prepare, run_config, setup
from anjax.train.data import DataConfig
from anjax.train.trainer import Trainer

pytestmark = pytest.mark.slow  # train.py in 3 subprocesses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SETTINGS = [
    "data.seq_len=32",
    "data.batch_size=8",
    f"train.steps={STEPS}",
    "eval.every=3",
    "eval.batches=2",
    "checkpoint.every=3",
    "checkpoint.keep=3",
    "checkpoint.export_hf=false",
    "log.tensorboard=false",
    "mesh.data=2",
    "mesh.fsdp=2",
]


def train_py(run_dir, corpus, env, n):
    """`n` train.py processes (tiny config, the prepared corpus) with `env`; waits for them."""
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", f"run.dir={run_dir}"]
    cmd += [f"data.path={corpus}", *SETTINGS]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "".join(err[-2000:] for _, err in outs)
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_on_one_global_order_and_resume_on_one(tmp_path):
    tokenizer = load_tokenizer(None)
    add_ac_token(tokenizer)
    corpus = tmp_path / "corpus"
    splits = {"train": "train", "validation": "validation"}
    prepare.prepare(DataConfig(), tokenizer, make_scheme(tokenizer, "ac"), corpus, splits, workers=1)

    # the oracle: one process, one device, the same global batches
    rc = run_config.load(ROOT / "configs/tiny.yaml", [f"data.path={corpus}", *SETTINGS[:3]])
    cfg, params, tokenizer = setup.fresh_model(rc)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = Trainer(cfg, rc.train, mesh, rc.run.seed)
    state, batches = (
        trainer.init_state(params),
        prepare.make_batches(rc.data, tokenizer, setup.run_scheme(cfg, tokenizer)),
    )
    expected = []
    for _ in range(STEPS):
        state, m = trainer.train_step(state, sharding.host_batch_to_global(next(batches), mesh))
        expected.append(float(m["loss"]))

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    two = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"localhost:{port}")
    recs = train_py(tmp_path / "two", corpus, dict(two, JAX_NUM_PROCESSES="2"), 2)
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], expected, rtol=1e-5)
    assert [r["step"] for r in recs if "val_loss_full" in r] == [0, 3, 6]

    # a kill after step 3's checkpoint, resumed by one process with 4 devices
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / str(STEPS))
    one = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    resumed = train_py(tmp_path / "one", corpus, one, 1)
    for key in ("loss", "val_loss_full", "val_loss_anchor"):
        got = [r.get(key) for r in resumed if r["step"] > 3]
        want = [r.get(key) for r in recs if r["step"] > 3]
        assert None not in want[-1:] and len(got) == len(want) == STEPS - 3
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-5)
