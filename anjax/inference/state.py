"""What a batch of rows carries between jitted steps: the static spec, the per-row state, a chunk's metadata.

Shared by the engine's steps (`anjax.inference.steps`), the cache policies (`anjax.inference.policies`)
and scoring; it imports neither, so both can build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from anjax.core.cache import KVCache, init_cache
from anjax.core.config import ModelConfig
from anjax.core.mask import TokenMeta, is_anchor, protected_tokens


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Graph-defining settings: hashable, static under jit."""

    anchor_cache: bool  # compact to anchors + open sentence; else full cache, causal attention
    anchor_ids: tuple[int, ...] = ()
    ac_id: int = -1  # the <AC> id in AC mode (forced anchors), else -1
    skip_bos: bool = False  # the token at true position 0 is BOS: not counted in its sentence
    sink_tokens: int = 0
    reference_positions: bool = False
    policy: Any = None  # an `anjax.inference.policies.Policy` (full attention over the slots it keeps), else None
    split_layers: bool = False  # unrolled layers, one cache buffer per layer (`Engine.prefill`, `decode_loop`)


class GenState(flax.struct.PyTreeNode):
    """Per-row bookkeeping beside the cache; every field but `cache` is [B] (overflow [B, 4]).

    Under a cache policy (`EngineSpec.policy`) also `budget` [B], the slots each row keeps, and `mass`
    [L, B, K, C], the attention mass each slot of each layer and KV head has received (slot order)."""

    cache: KVCache
    next_pos: jax.Array  # true position of the row's next token
    open_seg: jax.Array  # sentence index of the next token (the open sentence)
    open_start: jax.Array  # decode: first slot of the open sentence's tail after its last protected slot
    open_len: jax.Array  # tokens of the open sentence fed so far, BOS not counted (kept here: a policy may evict them)
    done: jax.Array  # bool: the row takes no more tokens
    peak: jax.Array  # most slots the row used (`length`) after a compaction
    overflow: jax.Array  # [B, 4] (slots needed, anchors, open-sentence, protected tokens) at overflow, else 0
    budget: jax.Array | None = None
    mass: jax.Array | None = None

    def policy_arrays(self) -> tuple[jax.Array, jax.Array]:
        """(budget [B], mass [L, B, K, C]) of a state under a cache policy."""
        assert self.budget is not None and self.mass is not None, "a state made under a cache policy"
        return self.budget, self.mass


def init_state(cfg: ModelConfig, batch: int, slots: int, done_B: ArrayLike, split: bool = False) -> GenState:
    """An empty state with a cache of `slots` slots; rows flagged in `done_B` [B] take no tokens. `split`: the
    cache as per-layer buffers (`EngineSpec.split_layers`: unrolled layers read and write them in place)."""
    zeros_B = lambda: jnp.zeros((batch,), jnp.int32)  # distinct buffers (donation-safe)
    cache = init_cache(cfg, batch, slots, jnp.dtype(cfg.dtype))
    return GenState(
        cache=cache.split_layers() if split else cache,
        next_pos=zeros_B(),
        open_seg=zeros_B(),
        open_start=zeros_B(),
        open_len=zeros_B(),
        done=jnp.array(done_B, bool),
        peak=zeros_B(),
        overflow=jnp.zeros((batch, 4), jnp.int32),
    )


def next_positions(state: GenState, spec: EngineSpec) -> jax.Array:
    """[B] position of the next token: true, or the reference (number of kept slots)."""
    if spec.reference_positions:
        return state.cache.valid.sum(axis=1, dtype=jnp.int32)
    return state.next_pos


def advance_sentence(spec: EngineSpec, state: GenState, anchor_BxT: jax.Array, valid_BxT: jax.Array) -> dict:
    """{open_seg, open_len} [B] after appending a chunk with these anchor and valid flags [B, T]: the open
    sentence's length restarts after the chunk's last anchor, and the BOS (true position 0) is not counted."""
    v = valid_BxT.astype(jnp.int32)
    counted = valid_BxT & ~anchor_BxT
    if spec.skip_bos:
        counted &= state.next_pos[:, None] + jnp.cumsum(v, 1) - v > 0
    a = anchor_BxT.astype(jnp.int32)
    after_last_anchor = jnp.cumsum(a[:, ::-1], 1)[:, ::-1] == 0
    tail_B = (counted & after_last_anchor).sum(1, dtype=jnp.int32)
    closed_B = a.sum(1, dtype=jnp.int32)
    return dict(open_seg=state.open_seg + closed_B, open_len=jnp.where(closed_B > 0, tail_B, state.open_len + tail_B))


def chunk_meta(
    spec: EngineSpec, state: GenState, tokens_BxT: jax.Array, valid_BxT: jax.Array, protected_BxT=None
) -> TokenMeta:
    """The metadata [B, T] of a chunk appended to `state` (positions and sentences continue the row's)."""
    valid = valid_BxT.astype(bool)
    v = valid.astype(jnp.int32)
    anchor = is_anchor(tokens_BxT, spec.anchor_ids) & valid
    a = anchor.astype(jnp.int32)
    offset_BxT = jnp.cumsum(v, 1) - v
    protected = protected_tokens(protected_BxT, state.next_pos[:, None] + offset_BxT, valid, spec.sink_tokens)
    return TokenMeta(
        doc=jnp.zeros_like(v),
        pos=next_positions(state, spec)[:, None] + offset_BxT,
        seg=state.open_seg[:, None] + jnp.cumsum(a, 1) - a,
        anchor=anchor,
        protected=protected,
        valid=valid,
    )


def track(state: GenState, active_B: jax.Array, limit: int) -> GenState:
    """Stop (and flag) rows that took a token and use more than `limit` slots; update the peak of the others.

    The peak never exceeds `limit`: an overflowing row reports what it held before.
    """
    cache = state.cache
    held_B = cache.length
    fresh_B = active_B & (held_B > limit)
    count = lambda x_BxC: (cache.valid & x_BxC).sum(axis=1, dtype=jnp.int32)
    info_Bx4 = jnp.stack(
        [held_B, count(cache.anchor), count(cache.seg == state.open_seg[:, None]), count(cache.protected)], -1
    )
    return state.replace(
        peak=jnp.where(active_B & ~fresh_B, jnp.maximum(state.peak, held_B), state.peak),
        overflow=jnp.where(fresh_B[:, None], info_Bx4, state.overflow),
        done=state.done | fresh_B,
    )
