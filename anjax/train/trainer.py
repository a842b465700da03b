"""Loss, optimizer, and the jitted, sharded train and eval steps.

A batch is the data pipeline's dict of [B, L] arrays (tokens, doc, valid,
labels, loss_mask). The loss is the mean cross-entropy over the tokens where
`loss_mask` holds, taken over the whole global batch: with gradient
accumulation the step sums the gradients of the summed token losses of its k
micro-batches and divides once by the total target count, so k micro-batches
give the same update as one batch k times larger.

With `train.distill_weight` > 0 the objective is `lm + w * kl` against a frozen teacher
(`anjax.train.distill`); the gradient is accumulated as that of `lm_sum + c * kl_sum` with
c = w * targets / kl_positions (both counted over the global batch before the scan), so
the final division by the target count gives exactly `lm + w * kl`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.spmd import with_logical_constraint

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.core.mask import token_metadata
from anjax.core.model import Llama, init_boxed, init_params
from anjax.core.params import Params
from anjax.train import distill
from anjax.train.run_config import TrainSection

BATCH_KEYS = ("tokens", "doc", "valid", "labels", "loss_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] base key, folded with `step` for stochastic layers (none in Llama today)


def learning_rate(tc: TrainSection) -> optax.Schedule:
    """Learning rate of the step after `count` steps: step s (1-based) gets lr * s / warmup_steps up
    to warm-up's end, then lr constant, or cosine-decayed to lr * min_lr_ratio at step `steps`."""
    warmup = max(tc.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(tc.lr, max(tc.steps - warmup, 1), alpha=tc.min_lr_ratio)

    def schedule(count):
        s = count + 1
        after = tc.lr if tc.schedule == "constant" else cosine(jnp.maximum(s - warmup, 0))
        return jnp.where(s < warmup, tc.lr * s / warmup, after)

    return schedule


def optimizer(tc: TrainSection) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after global-norm clipping."""
    adamw = optax.adamw(learning_rate(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm else adamw


def forward(cfg: ModelConfig, params: Params, batch: dict[str, jax.Array], full_attention: bool) -> jax.Array:
    """[B, L, V] fp32 logits of a batch (anchor metadata from cfg.anchor_ids)."""
    meta = token_metadata(batch["tokens"], batch["valid"], batch["doc"], anchor_ids=cfg.anchor_ids)
    logits_BxLxV, _ = Llama(cfg).apply({"params": params}, batch["tokens"], meta, None, full_attention=full_attention)
    return logits_BxLxV


def cross_entropy_sums(logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies over loss_mask, number of target tokens), both fp32 scalars."""
    logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, batch["labels"][..., None], axis=-1)[..., 0]
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((logz_BxL - target_BxL) * mask_BxL), jnp.sum(mask_BxL)


def loss_sums(
    cfg: ModelConfig, params: Params, batch: dict[str, jax.Array], full_attention: bool
) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies over loss_mask, number of target tokens), both fp32 scalars."""
    return cross_entropy_sums(forward(cfg, params, batch, full_attention), batch)


def train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    grad_accum: int,
    param_shardings,
    state: TrainState,
    batch: dict[str, jax.Array],
    teacher: Params | None = None,
    spec: distill.Distill | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch [B, L], scanned over `grad_accum` micro-batches of B/k rows;
    with `teacher` params and a `spec`, the objective is lm + spec.weight * kl (module docstring).

    Micro-batch m takes rows m, m+k, m+2k, ... so every device keeps its own rows.
    """

    def split(x_BxL):
        x = x_BxL.reshape(x_BxL.shape[0] // grad_accum, grad_accum, *x_BxL.shape[1:]).swapaxes(0, 1)
        return with_logical_constraint(x, (None, "batch", "length"))

    def lm_objective(p, mb):
        loss, n = loss_sums(cfg, p, mb, False)
        return loss, (loss, n, 0.0, 0.0)

    objective = lm_objective
    if teacher is not None:
        if spec is None:
            raise ValueError("a distillation teacher needs its distill.Distill spec")
        batch = {**batch, **distill.alignment(cfg, batch)}
        kl_weight = (
            spec.weight
            * jnp.sum(batch["loss_mask"].astype(jnp.float32))
            / jnp.maximum(jnp.sum(batch["kl_mask"].astype(jnp.float32)), 1.0)
        )

        def distill_objective(p, mb):
            teacher_logp = distill.teacher_log_probs(cfg, teacher, mb, spec.temperature)
            logits = forward(cfg, p, mb, False)
            loss, n = cross_entropy_sums(logits, mb)
            kl, m = distill.kl_sums(cfg, teacher_logp, logits, mb["kl_mask"], spec.temperature)
            return loss + kl_weight * kl, (loss, n, kl, m)

        objective = distill_objective

    def micro(carry, mb):
        grads, sums = carry
        (_, aux), g = jax.value_and_grad(objective, has_aux=True)(state.params, mb)
        return (jax.tree.map(jnp.add, grads, g), tuple(a + b for a, b in zip(sums, aux))), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, (loss_sum, count, kl_sum, kl_count)), _ = jax.lax.scan(
        micro, (zeros, (0.0,) * 4), jax.tree.map(split, batch)
    )
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params: Params = optax.apply_updates(state.params, updates)  # pyright: ignore[reportAssignmentType]  # optax: any tree
    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "grad_norm": optax.tree.norm(grads),
        "targets": count,
        "tokens": jnp.sum(batch["valid"].astype(jnp.float32)),
    }
    if teacher is not None:
        metrics["kl"] = kl_sum / jnp.maximum(kl_count, 1.0)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def eval_step(
    cfg: ModelConfig,
    params: Params,
    batch: dict[str, jax.Array],
    teacher: Params | None = None,
    spec: distill.Distill | None = None,
) -> dict[str, jax.Array]:
    """Summed validation loss and target count, in full-attention and anchor (AnSAN) modes; with a teacher
    also the summed KL(teacher || anchor-mode student) and its position count."""
    full, n = loss_sums(cfg, params, batch, True)
    logits = forward(cfg, params, batch, False)
    anchor, _ = cross_entropy_sums(logits, batch)
    out = {"full": full, "anchor": anchor, "targets": n}
    if teacher is not None:
        if spec is None:
            raise ValueError("a distillation teacher needs its distill.Distill spec")
        batch = {**batch, **distill.alignment(cfg, batch)}
        teacher_logp = distill.teacher_log_probs(cfg, teacher, batch, spec.temperature)
        out["kl"], out["kl_targets"] = distill.kl_sums(cfg, teacher_logp, logits, batch["kl_mask"], spec.temperature)
    return out


class Trainer:
    """Shardings, initialization and the jitted steps for one model config on one mesh."""

    def __init__(self, cfg: ModelConfig, tc: TrainSection, mesh: jax.sharding.Mesh, seed: int = 0):
        self.cfg, self.mesh, self.seed = cfg, mesh, seed
        self.tx = optimizer(tc)
        self.schedule = learning_rate(tc)
        boxed = jax.eval_shape(lambda rng: init_boxed(cfg, rng), jax.random.PRNGKey(0))
        self.param_shardings = sharding.logical_shardings(boxed, mesh)
        abstract_params = nn.meta.unbox(boxed)
        repl = sharding.replicated(mesh)
        opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_abstract, self.param_shardings, transform_non_params=lambda _: repl
        )
        # TrainStates of shardings and of abstract arrays: the pytree's twins, to jit and lower with
        self.state_shardings = TrainState(repl, self.param_shardings, opt_shardings, repl)  # pyright: ignore[reportArgumentType]
        step, rng = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32)
        abstract = TrainState(step, abstract_params, opt_abstract, rng)  # pyright: ignore[reportArgumentType]
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_shardings
        )
        batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
        self.distill = distill.Distill(tc.distill_weight, tc.distill_temperature) if tc.distill_weight else None
        self.teacher = None  # frozen starting params, sharded like params; set by init_teacher when distilling
        teacher_sh = self.param_shardings if self.distill else None  # the teacher argument is None otherwise
        steps = functools.partial(train_step, cfg, self.tx, tc.grad_accum, self.param_shardings, spec=self.distill)
        self._train = jax.jit(
            lambda state, teacher, batch: steps(state, batch, teacher),
            in_shardings=(self.state_shardings, teacher_sh, batch_sh),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            lambda p, teacher, b: eval_step(cfg, p, b, teacher, self.distill),
            in_shardings=(self.param_shardings, teacher_sh, batch_sh),
            out_shardings=repl,
        )

    def place_params(self, params: Params | None = None) -> Params:
        """Sharded params from host params (numpy, identical on every host) or, if None, the random init of `seed`."""
        with sharding.active(self.mesh):
            if params is None:
                init = lambda rng: init_params(self.cfg, rng)
                return jax.jit(init, out_shardings=self.param_shardings)(jax.random.PRNGKey(self.seed))
            dtypes = jax.tree.map(lambda x: x.dtype, self.abstract_state.params)
            return sharding.put(jax.tree.map(np.asarray, params, dtypes), self.param_shardings)

    def init_state(self, params: Params | None = None) -> TrainState:
        """Sharded step-0 state from `place_params(params)`."""
        params = self.place_params(params)
        with sharding.active(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
            step, rng = sharding.put(
                (jnp.zeros((), jnp.int32), jax.random.PRNGKey(self.seed)),
                (self.state_shardings.step, self.state_shardings.rng),
            )
        return TrainState(step, params, opt_state, rng)

    def lower_train_step(self, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
        """The train step lowered for the abstract state (and abstract teacher when distilling) and `batch`
        (ahead-of-time compilation)."""
        teacher = self.abstract_state.params if self.distill else None
        with sharding.active(self.mesh):
            return self._train.lower(self.abstract_state, teacher, batch)

    def init_teacher(self, params: Params | None = None) -> None:
        """Fix the distillation teacher: the run's STARTING params (the same argument as the fresh run's
        `init_state`, also on resume), `place_params`'d: one copy, split like the parameters, no optimizer state."""
        self.teacher = self.place_params(params)

    def _teacher(self):
        if self.distill is not None and self.teacher is None:
            raise RuntimeError("train.distill_weight > 0: call Trainer.init_teacher with the starting params first")
        return self.teacher

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        with sharding.active(self.mesh):
            return self._train(state, self._teacher(), batch)

    def eval_step(self, params: Params, batch: dict[str, jax.Array]) -> dict:
        with sharding.active(self.mesh):
            return self._eval(params, self._teacher(), batch)
