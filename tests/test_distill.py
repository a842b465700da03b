"""Self-distillation (anjax.train.distill): weight 0 is the paper's LM loss exactly; the KL term equals a numpy
computation from two separate full forward passes (the teacher's over each document with its `<AC>` tokens
deleted), in EP and AC mode; the update is the gradient of lm + w * kl, also with gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import slow_case

from anjax.core import sharding
from anjax.core.config import tiny_config
from anjax.core.mask import token_metadata
from anjax.core.model import Llama, init_params
from anjax.train import distill
from anjax.train.run_config import TrainSection
from anjax.train.trainer import Trainer, TrainState, cross_entropy_sums, forward, train_step

AC = 7
CFGS = {
    "ep": tiny_config(vocab_size=256, anchor_mode="ep", anchor_tokens=(".",), anchor_ids=(AC,)),
    "ac": tiny_config(vocab_size=256, anchor_mode="ac", anchor_tokens=("<AC>",), anchor_ids=(AC,)),
}
MODES = [slow_case("ep"), "ac"]  # the fast tier runs AC: EP's path plus the <AC>-skipping alignment


def batch(seed: int = 0, B: int = 4, L: int = 24) -> dict[str, np.ndarray]:
    """Random tokens with ~15% anchors; row 0 holds two documents, the second opening with an anchor (a packed
    document continuing after `<AC>`); row 1 has consecutive anchors and opens with one; rows are right-padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 256, (B, L)).astype(np.int32)
    tokens[rng.random((B, L)) < 0.15] = AC
    tokens[0, L // 3] = tokens[1, 0] = tokens[1, 5] = tokens[1, 6] = AC
    lengths = np.maximum(rng.integers(L // 2, L + 1, B), L - 2)
    valid = np.arange(L) < lengths[:, None]
    doc = np.where(valid, (np.arange(L) >= L // 3) & (np.arange(B)[:, None] == 0), -1).astype(np.int32)
    loss_mask = valid & (np.arange(L) < lengths[:, None] - 1) & (np.roll(doc, -1, 1) == doc)
    labels = np.where(loss_mask, np.roll(tokens, -1, 1), 0).astype(np.int32)
    return {"tokens": tokens, "doc": doc, "valid": valid, "labels": labels, "loss_mask": loss_mask}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@functools.partial(jax.jit, static_argnums=0)
def full_attention_logits(cfg, params, ids_1xL, valid_1xL):
    """[L, V] logits of one full-attention forward pass of a right-padded row (padding changes nothing before it)."""
    logits, _ = Llama(cfg).apply(
        {"params": params}, ids_1xL, token_metadata(ids_1xL, valid_1xL), None, full_attention=True
    )
    return logits[0]


jitted_forward = jax.jit(forward, static_argnums=(0, 3))  # the tests' model forwards compile once, not op by op


def hand_kl(cfg, student, teacher, b, temperature):
    """(sum, count) of T^2 KL(teacher || student) from the module docstring's words: the student's logits from
    one AnSAN forward of the rows; the teacher's from one full-attention forward of each document's original
    tokens alone (no `<AC>`, positions 0..n-1); a target that is an original token is predicted by the teacher at
    the last original token at or before the student's position; `<AC>` is left out of both distributions."""
    ac = AC if cfg.anchor_mode == "ac" else None
    student_logits = np.asarray(jitted_forward(cfg, student, jax.tree.map(jnp.asarray, b), False), np.float64)
    keep = np.arange(cfg.vocab_size) != ac
    total, count = 0.0, 0
    for r in range(b["tokens"].shape[0]):
        for d in sorted(set(b["doc"][r]) - {-1}):
            where = np.flatnonzero(b["doc"][r] == d)
            original = [t for t in where if b["tokens"][r, t] != ac]
            ids, valid = np.zeros((1, b["tokens"].shape[1]), np.int32), np.zeros((1, b["tokens"].shape[1]), bool)
            ids[0, : len(original)], valid[0, : len(original)] = b["tokens"][r, original], True  # the document alone
            teacher_logits = np.asarray(full_attention_logits(cfg, teacher, ids, valid), np.float64)
            for t in where:
                before = [j for j, o in enumerate(original) if o <= t]
                if not b["loss_mask"][r, t] or b["labels"][r, t] == ac or not before:
                    continue
                p = log_softmax(teacher_logits[before[-1]][keep] / temperature)
                q = log_softmax(student_logits[r, t][keep] / temperature)
                total += temperature**2 * np.sum(np.exp(p) * (p - q))
                count += 1
    return total, count


@pytest.mark.parametrize("mode", MODES)
def test_kl_equals_hand_computation(mode):
    cfg, b = CFGS[mode], batch()
    student, teacher = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    want_sum, want_count = hand_kl(cfg, student, teacher, b, 2.0)
    b_dev = jax.tree.map(jnp.asarray, b)
    b_dev = {**b_dev, **distill.alignment(cfg, b_dev)}
    got_sum, got_count = jax.jit(
        lambda student, teacher, b: distill.kl_sums(
            cfg, distill.teacher_log_probs(cfg, teacher, b, 2.0), forward(cfg, student, b, False), b["kl_mask"], 2.0
        )
    )(student, teacher, b_dev)
    assert int(got_count) == want_count
    n_ac_targets = int((b["loss_mask"] & (b["labels"] == AC)).sum())
    if mode == "ep":
        assert want_count == int(b["loss_mask"].sum())
    else:  # <AC> targets left out, and the positions before a document's first original token
        assert n_ac_targets > 0 and want_count < int(b["loss_mask"].sum()) - n_ac_targets
    np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)

    # the jitted, sharded train and eval steps report the same KL
    mesh = sharding.make_mesh(1, 1, 1)
    trainer = Trainer(cfg, TrainSection(distill_weight=0.5, distill_temperature=2.0, grad_accum=2), mesh)
    trainer.init_teacher(teacher)
    g = sharding.host_batch_to_global(b, mesh)
    out = trainer.eval_step(trainer.place_params(student), g)
    np.testing.assert_allclose([float(out["kl"]), float(out["kl_targets"])], [want_sum, want_count], rtol=1e-5)
    _, m = trainer.train_step(trainer.init_state(student), g)
    np.testing.assert_allclose(float(m["kl"]), want_sum / want_count, rtol=1e-5)


def optimizer_input(cfg, params, b, grad_accum, teacher=None, spec=None):
    """(gradient that reaches the optimizer, metrics) of one train_step (a transformation keeping the gradient)."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    tx = optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))
    mesh = sharding.make_mesh(1, 1, 1)
    shardings = Trainer(cfg, TrainSection(), mesh).param_shardings
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    with sharding.active(mesh):
        step = jax.jit(functools.partial(train_step, cfg, tx, grad_accum, shardings, spec=spec))
        new, m = step(state, sharding.host_batch_to_global(b, mesh), teacher)
    return new.opt_state, m


@pytest.mark.parametrize("mode", MODES)
def test_weight_zero_is_the_lm_loss(mode):
    cfg, b = CFGS[mode], batch(1)
    student, teacher = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    g_lm, m_lm = optimizer_input(cfg, student, b, 2)
    g_0, m_0 = optimizer_input(cfg, student, b, 2, teacher, distill.Distill(0.0))
    assert float(m_0["loss"]) == float(m_lm["loss"]) and float(m_0["kl"]) > 0
    for a, e in zip(jax.tree.leaves(g_0), jax.tree.leaves(g_lm), strict=True):
        np.testing.assert_array_equal(a, e)
    assert Trainer(cfg, TrainSection(), sharding.make_mesh(1, 1, 1)).distill is None  # the default: no teacher at all


@pytest.mark.parametrize("mode", MODES)
def test_update_is_the_gradient_of_lm_plus_weighted_kl(mode):
    """With 2 micro-batches of unequal target and KL counts, the step's gradient is that of
    lm_mean + w * kl_mean over the whole batch."""
    cfg, b, w, T = CFGS[mode], batch(2), 0.7, 1.5
    student, teacher = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    g, m = optimizer_input(cfg, student, b, 2, teacher, distill.Distill(w, T))
    b_dev = jax.tree.map(jnp.asarray, b)
    b_dev = {**b_dev, **distill.alignment(cfg, b_dev)}
    assert b_dev["kl_mask"][::2].sum() != b_dev["kl_mask"][1::2].sum()

    def objective(p, teacher):
        teacher_logp = distill.teacher_log_probs(cfg, teacher, b_dev, T)
        logits = forward(cfg, p, b_dev, False)
        lm, n = cross_entropy_sums(logits, b_dev)
        kl, k = distill.kl_sums(cfg, teacher_logp, logits, b_dev["kl_mask"], T)
        return lm / n + w * kl / k

    want = jax.jit(jax.grad(objective))(student, teacher)  # d/d student
    for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6 * float(jnp.abs(e).max()))


def test_missing_teacher_is_an_error():
    mesh = sharding.make_mesh(1, 1, 1)
    trainer = Trainer(CFGS["ac"], TrainSection(distill_weight=1.0), mesh)
    with pytest.raises(RuntimeError, match="init_teacher"):
        trainer.train_step(trainer.init_state(), sharding.host_batch_to_global(batch(), mesh))
