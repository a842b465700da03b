"""The sharded train step: the same losses on 1 and 8 simulated devices with parameters, gradients
and Adam moments really split; gradient accumulation equal to one k-times larger batch."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anjax.core import sharding, sparse_attention
from anjax.core.config import tiny_config
from anjax.train.run_config import TrainSection
from anjax.train.trainer import Trainer, TrainState, train_step

pytestmark = pytest.mark.slow  # 8 simulated devices in a subprocess; bf16/remat and accumulation steps

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_config(vocab_size=256, anchor_mode="ep", anchor_tokens=(".",), anchor_ids=(7,))
SPARSE_TILE = 8  # several query/key tiles in a 32-token row


def batch(step: int, B: int = 8, L: int = 32) -> dict[str, np.ndarray]:
    """Random tokens with ~10% anchors, two documents in row 0 and right padding of varying length."""
    rng = np.random.default_rng(step)
    tokens = rng.integers(3, CFG.vocab_size, (B, L)).astype(np.int32)
    tokens[rng.random((B, L)) < 0.1] = CFG.anchor_ids[0]
    lengths = rng.integers(L // 2, L + 1, B)
    valid = np.arange(L) < lengths[:, None]
    doc = np.where(valid, (np.arange(L) >= L // 3) & (np.arange(B)[:, None] == 0), -1).astype(np.int32)
    loss_mask = valid & (np.arange(L) < lengths[:, None] - 1) & (np.roll(doc, -1, 1) == doc)
    labels = np.where(loss_mask, np.roll(tokens, -1, 1), 0).astype(np.int32)
    return {"tokens": tokens, "doc": doc, "valid": valid, "labels": labels, "loss_mask": loss_mask}


def run_steps(mesh_shape, grad_accum=1, steps=3, B=8, cfg=CFG, distill_weight=0.0, attention="dense"):
    """(trainer, final state, losses) of `steps` steps on the given mesh; when distilling, the losses are
    (lm, kl) pairs and the teacher is the random init of seed 1."""
    mesh = sharding.make_mesh(*mesh_shape)
    tc = TrainSection(steps=steps, lr=1e-2, warmup_steps=1, grad_accum=grad_accum, distill_weight=distill_weight)
    cfg = cfg.replace(attention=attention)
    trainer = Trainer(cfg, tc, mesh)
    state, losses = trainer.init_state(), []
    if distill_weight:
        trainer.init_teacher(jax.device_get(Trainer(cfg, tc, mesh, seed=1).place_params()))
    for s in range(steps):
        state, m = trainer.train_step(state, sharding.host_batch_to_global(batch(s, B), mesh))
        losses.append([float(m["loss"]), float(m["kl"])] if distill_weight else float(m["loss"]))
    return trainer, state, losses


DISTILL = dict(cfg=CFG.replace(anchor_mode="ac", anchor_tokens=("<AC>",)), distill_weight=0.5, grad_accum=2, steps=2)


@functools.cache
def eight_devices(attention: str) -> dict:
    """The `__main__` half of this file, run on 8 simulated devices (XLA_FLAGS must be set before jax starts)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, attention], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    return result


def shard_report(state) -> dict:
    """Global and per-device shapes of a few parameters and their Adam first moments."""
    mu = state.opt_state[1][0].mu
    pick = {
        "q": lambda t: t["layer_0"]["attn"]["q"],
        "gate": lambda t: t["layer_1"]["mlp"]["gate"],
        "embed": lambda t: t["embed"],
    }
    return {
        f"{kind}.{name}": [
            list(get(tree).shape),
            list(get(tree).addressable_shards[0].data.shape),
            str(get(tree).sharding.spec),
        ]
        for kind, tree in (("param", state.params), ("mu", mu))
        for name, get in pick.items()
    }


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_one_vs_eight_devices(attention, monkeypatch):
    monkeypatch.setattr(sparse_attention, "TILE", SPARSE_TILE)
    _, _, losses_1 = run_steps((1, 1, 1), attention=attention)
    result = eight_devices(attention)
    np.testing.assert_allclose(result["losses"], losses_1, rtol=1e-5)
    assert losses_1[-1] < losses_1[0]
    for name, (shape, local, spec) in result["shards"].items():  # fsdp=2 and tensor=2 each halve a dimension
        assert np.prod(local) * 4 == np.prod(shape), (name, shape, local, spec)
    assert result["shards"]["param.q"][2] == "P('fsdp', 'tensor', None)"


def test_grad_accumulation_equals_big_batch():
    """k=4 micro-batches of 2 rows vs one batch of 8, compared on the gradient that reaches the optimizer
    (a transformation that keeps the gradient as its state)."""
    mesh = sharding.make_mesh(1, 1, 1)
    trainer = Trainer(CFG, TrainSection(), mesh)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    params, tx = trainer.init_state().params, optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))
    b = sharding.host_batch_to_global(batch(0), mesh)

    def gradient(k):
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
        with sharding.active(mesh):
            new, m = jax.jit(functools.partial(train_step, CFG, tx, k, trainer.param_shardings))(state, b)
        return new.opt_state, float(m["loss"])

    g1, loss1 = gradient(1)
    g4, loss4 = gradient(4)
    assert b["loss_mask"][::4].sum() != b["loss_mask"][1::4].sum()  # micro-batches have unequal target counts
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for a, b1 in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b1, rtol=1e-5, atol=1e-6 * float(jnp.abs(b1).max()))


def test_distillation_one_vs_eight_devices():
    """AC distillation (the teacher's `<AC>`-free view, the alignment gather) under the same sharding: the same
    LM losses and KL terms on 8 devices, the teacher split like the parameters."""
    _, _, losses_1 = run_steps((1, 1, 1), **DISTILL)
    result = eight_devices("dense")
    np.testing.assert_allclose(result["distill_losses"], losses_1, rtol=1e-5)
    assert losses_1[-1][1] > 0 and result["teacher_q"] == result["shards"]["param.q"][2]


if __name__ == "__main__":  # the 8-device half of the tests above (needs XLA_FLAGS before jax starts)
    sparse_attention.TILE = SPARSE_TILE
    attention = sys.argv[1]
    _, state, losses = run_steps((2, 2, 2), attention=attention)
    result = {"devices": jax.device_count(), "losses": losses, "shards": shard_report(state)}
    if attention == "dense":  # distillation is attention-independent: checked once
        trainer, _, result["distill_losses"] = run_steps((2, 2, 2), **DISTILL)
        result["teacher_q"] = str(trainer.teacher["layer_0"]["attn"]["q"].sharding.spec)
    print(json.dumps(result))


def test_bf16_compute_with_fp32_master_params_and_remat():
    """dtype=bfloat16 computes in bf16 while parameters and Adam moments stay fp32; remat changes memory, not
    the loss."""
    mesh = sharding.make_mesh(1, 1, 1)
    b = sharding.host_batch_to_global(batch(0), mesh)
    losses = {}
    for name, cfg in {"fp32": CFG, "bf16": CFG.replace(dtype="bfloat16"), "remat": CFG.replace(remat="full")}.items():
        trainer = Trainer(cfg, TrainSection(lr=1e-2, warmup_steps=1), mesh)
        state = trainer.init_state()
        state, m = trainer.train_step(state, b)
        losses[name] = float(m["loss"])
        assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state[1][0].mu))} == {jnp.dtype("float32")}
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) < 2e-2 * losses["fp32"]
    np.testing.assert_allclose(losses["remat"], losses["fp32"], rtol=1e-6)
