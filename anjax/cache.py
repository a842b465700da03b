"""The fixed-capacity KV cache (DESIGN.md Invariant 3).

Keys are stored after RoPE at their true positions, so a slot's content never
changes once written; only its place in the cache does (compaction).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from anjax.config import ModelConfig
from anjax.mask import TokenMeta


@flax.struct.dataclass
class KVCache:
    """keys/values [L, B, C, K, D]; per-slot metadata [B, C]; `length` [B] slots in use (front-packed)."""

    keys: jax.Array
    values: jax.Array
    pos: jax.Array
    seg: jax.Array
    anchor: jax.Array
    valid: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def slot_meta(self) -> TokenMeta:
        """Metadata of the C slots as keys (one document per row)."""
        return TokenMeta(doc=jnp.zeros_like(self.pos), pos=self.pos, seg=self.seg,
                         anchor=self.anchor, valid=self.valid)


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: no valid slot, length 0."""
    kv_shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    zeros_BxC = jnp.zeros((batch, capacity), jnp.int32)
    return KVCache(keys=jnp.zeros(kv_shape, dtype), values=jnp.zeros(kv_shape, dtype),
                   pos=zeros_BxC, seg=zeros_BxC, anchor=zeros_BxC.astype(bool),
                   valid=zeros_BxC.astype(bool), length=jnp.zeros((batch,), jnp.int32))


def write_rows(buffer_BxCx: jax.Array, chunk_BxTx: jax.Array, offset_B: jax.Array) -> jax.Array:
    """Write each row's chunk at its own offset along axis 1 (caller guarantees offset + T <= C)."""
    def one(buf, chunk, off):
        return jax.lax.dynamic_update_slice_in_dim(buf, chunk.astype(buf.dtype), off, axis=0)
    return jax.vmap(one)(buffer_BxCx, chunk_BxTx, offset_B)


def append_meta(cache: KVCache, meta: TokenMeta) -> KVCache:
    """Record a chunk's metadata [B, T] in slots [length, length + T) and advance `length`.

    The chunk's keys/values are written layer by layer by the model (`write_rows`).
    """
    off = cache.length
    return cache.replace(pos=write_rows(cache.pos, meta.pos, off), seg=write_rows(cache.seg, meta.seg, off),
                         anchor=write_rows(cache.anchor, meta.anchor, off),
                         valid=write_rows(cache.valid, meta.valid, off),
                         length=cache.length + meta.pos.shape[1])
