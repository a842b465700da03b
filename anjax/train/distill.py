"""Self-distillation from the frozen starting model (an extension beyond the paper).

The teacher is the model the run started from, frozen, with full causal attention; the
student is the model being trained, with the AnSAN mask. The training objective is

    loss = lm + weight * kl,   kl = T^2 * mean over KL positions of KL(softmax(t / T) || softmax(s / T))

(t, s: teacher and student logits; T: temperature; T^2 keeps gradient sizes comparable
across T, as in Hinton et al.). Both means run over the whole global batch.

Teacher input. EP (and none): the student's own row. AC: the same row with every `<AC>`
marked invalid. An invalid token is never a key and does not advance `pos`
(`anjax.core.mask.token_metadata`), so at every original token the teacher's output equals
that of a forward pass over the row with the `<AC>` tokens deleted and positions
recomputed per document -- exactly, with no token moved.

Alignment. Every target that is an original token (`loss_mask` and label != `<AC>`) gets
one KL term, and no other position does. The student predicts that target at position t,
whose token is the original token before it or an `<AC>` that follows that token; the
teacher predicts it at src(t), the last original token at or before t (src(t) = t in EP
mode). Positions whose target is `<AC>` are left to the LM loss (the student still learns
to emit `<AC>`), as are positions with no original token before them in their document
segment (a packed row that opens with `<AC>`). In AC mode both distributions are taken
over the vocabulary without `<AC>` and renormalised: the teacher never learned `<AC>`, and
whether to emit it is the LM loss's business, so the KL only shapes which original token
comes next.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from anjax.core.config import ModelConfig
from anjax.core.mask import token_metadata
from anjax.core.model import Llama
from anjax.core.params import Params

_EXCLUDED = jnp.finfo(jnp.float32).min  # logit of a token outside the KL's vocabulary: probability exactly 0


@dataclasses.dataclass(frozen=True)
class Distill:
    """The distillation term's settings (static: fixed for a run)."""

    weight: float  # w in loss = lm + w * kl
    temperature: float = 1.0  # T of both softmaxes


def ac_id(cfg: ModelConfig) -> int | None:
    """The `<AC>` id in AC mode, else None (the teacher then sees the student's row)."""
    return cfg.anchor_ids[0] if cfg.anchor_mode == "ac" else None


def alignment(cfg: ModelConfig, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{"kl_src": [B, L] int32 src(t), "kl_mask": [B, L] bool: position t gets a KL term} (module docstring)."""
    ac = ac_id(cfg)
    if ac is None:
        return {
            "kl_src": jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1]), batch["tokens"].shape),
            "kl_mask": batch["loss_mask"].astype(bool),
        }
    original_BxL = batch["valid"].astype(bool) & (batch["tokens"] != ac)
    src_BxL = jax.lax.cummax(jnp.where(original_BxL, jnp.arange(original_BxL.shape[1]), -1), axis=1)
    same_doc_BxL = (src_BxL >= 0) & (jnp.take_along_axis(batch["doc"], jnp.maximum(src_BxL, 0), axis=1) == batch["doc"])
    mask_BxL = batch["loss_mask"].astype(bool) & (batch["labels"] != ac) & same_doc_BxL
    return {"kl_src": jnp.maximum(src_BxL, 0), "kl_mask": mask_BxL}


def _log_probs(cfg: ModelConfig, logits_BxLxV: jax.Array, temperature: float) -> jax.Array:
    """log softmax(logits / T) over the KL's vocabulary (all of it, or all but `<AC>` in AC mode)."""
    z = logits_BxLxV.astype(jnp.float32) / temperature
    ac = ac_id(cfg)
    if ac is not None:
        z = jnp.where(jnp.arange(z.shape[-1]) == ac, _EXCLUDED, z)
    return jax.nn.log_softmax(z, axis=-1)


def teacher_log_probs(
    cfg: ModelConfig, teacher_params: Params, batch: dict[str, jax.Array], temperature: float
) -> jax.Array:
    """[B, L, V] teacher log-probabilities aligned to the student's positions: row t holds the teacher's
    prediction at src(t) (`batch` carries "kl_src" from `alignment`). No gradient flows to the teacher."""
    ac = ac_id(cfg)
    valid_BxL = batch["valid"].astype(bool) if ac is None else batch["valid"].astype(bool) & (batch["tokens"] != ac)
    meta = token_metadata(batch["tokens"], valid_BxL, batch["doc"])
    logits_BxLxV, _ = Llama(cfg).apply({"params": teacher_params}, batch["tokens"], meta, None, full_attention=True)
    logp_BxLxV = _log_probs(cfg, jax.lax.stop_gradient(logits_BxLxV), temperature)
    if ac is not None:
        logp_BxLxV = jnp.take_along_axis(logp_BxLxV, batch["kl_src"][..., None], axis=1)
    return with_logical_constraint(logp_BxLxV, ("batch", "length", "vocab"))


def kl_sums(
    cfg: ModelConfig,
    teacher_logp_BxLxV: jax.Array,
    student_logits_BxLxV: jax.Array,
    mask_BxL: jax.Array,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """(T^2 * sum over mask of KL(teacher || student), number of KL positions), fp32 scalars."""
    student_logp_BxLxV = _log_probs(cfg, student_logits_BxLxV, temperature)
    p_BxLxV = jnp.exp(teacher_logp_BxLxV)
    kl_BxL = jnp.sum(p_BxLxV * (teacher_logp_BxLxV - student_logp_BxLxV), axis=-1)
    mask = mask_BxL.astype(jnp.float32)
    return temperature**2 * jnp.sum(kl_BxL * mask), jnp.sum(mask)
