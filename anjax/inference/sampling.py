"""How the next id of each row is picked: the sampling values as arrays, the draw, the stop ids.

Every value a request may change (temperature, top-k, top-p, seed, stop ids, max_sentence_tokens) is an
array in `Sampling`, never a static argument, so a new value never recompiles (the decode steps,
`anjax.inference.steps`, take it as a traced argument). Stop ids are a fixed [MAX_STOP_IDS] array padded
with -1 (`stop_id_array`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MAX_STOP_IDS = 8


class Sampling(flax.struct.PyTreeNode):
    """Per-row [B] sampling arrays; `stop_ids` [MAX_STOP_IDS] padded with -1. Made on the host (numpy, placed
    by the call) or on the device (the server's slots); traced in the steps."""

    temperature: jax.Array | np.ndarray  # float, 0 = greedy
    top_k: jax.Array | np.ndarray  # int, 0 = off
    top_p: jax.Array | np.ndarray  # float, 1 = off
    seed: jax.Array | np.ndarray  # uint32
    stop_ids: jax.Array | np.ndarray
    max_sentence_tokens: jax.Array | np.ndarray  # int scalar, 0 = off (AC mode: force <AC>)


def sample_tokens(
    logits_BxV: jax.Array,
    keys_B: jax.Array,
    temperature_B: jax.Array | np.ndarray,
    top_k_B: jax.Array | np.ndarray,
    top_p_B: jax.Array | np.ndarray,
) -> jax.Array:
    """[B] next ids: argmax where temperature <= 0, else a draw after top-k then top-p filtering."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw():
        V = logits_BxV.shape[-1]
        x_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
        sorted_BxV = jnp.flip(jnp.sort(x_BxV, axis=-1), axis=-1)
        k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
        in_top_k = sorted_BxV >= jnp.take_along_axis(sorted_BxV, k_B[:, None] - 1, axis=1)
        probs_BxV = jax.nn.softmax(jnp.where(in_top_k, sorted_BxV, -jnp.inf), axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        n_keep_B = jnp.maximum(jnp.sum(in_top_k & (mass_before_BxV < top_p_B[:, None]), axis=-1), 1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=1)
        x_BxV = jnp.where(x_BxV >= cutoff_Bx1, x_BxV, -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)

    drawn_B = jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda: greedy_B)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B)


def stop_id_array(stop_ids: Sequence[int]) -> np.ndarray:
    """[MAX_STOP_IDS] int32: `stop_ids` padded with -1 (ValueError for more than MAX_STOP_IDS)."""
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    return stops
