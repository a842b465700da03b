"""The fixed-capacity KV cache (docs/DESIGN.md Invariant 3).

Keys are stored after RoPE at their true positions, so a slot's content never
changes once written; only its place in the cache does (compaction).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from anjax.core.config import ModelConfig
from anjax.core.mask import TokenMeta, in_window


class KVCache(flax.struct.PyTreeNode):
    """keys/values [L, B, K, C, D] (head-major: a head's slots are contiguous, so attention reads them in place),
    or split into a tuple of L per-layer buffers [B, K, C, D] (`split_layers`: what unrolled layers read and
    update in place); per-slot metadata [B, C]; `length` [B] slots in use (front-packed; in decode a protected
    span may leave holes below it, see `close_sentence`)."""

    keys: jax.Array
    values: jax.Array
    meta: TokenMeta  # per slot, every field [B, C]; doc is 0 (one document per row)
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.meta.valid.shape[1]

    def slot_meta(self) -> TokenMeta:
        """Metadata of the C slots as keys."""
        return self.meta

    pos = property(lambda self: self.meta.pos)
    seg = property(lambda self: self.meta.seg)
    anchor = property(lambda self: self.meta.anchor)
    protected = property(lambda self: self.meta.protected)
    valid = property(lambda self: self.meta.valid)

    def map_slots(self, slot_fn, meta_fn=None) -> KVCache:
        """The cache with `slot_fn` applied to keys/values [L, B, K, C, D] and `meta_fn` (default: `slot_fn`) to
        every metadata field [B, C]: the one place that lists what a slot holds."""
        meta_fn = meta_fn or slot_fn
        if isinstance(self.keys, tuple):  # split layers: each buffer as a stack of one layer
            kv_fn = lambda layers: tuple(slot_fn(x[None])[0] for x in layers)  # noqa: E731
        else:
            kv_fn = slot_fn
        return self.replace(keys=kv_fn(self.keys), values=kv_fn(self.values), meta=jax.tree.map(meta_fn, self.meta))

    def split_layers(self) -> KVCache:
        """The cache with one buffer per layer (a tuple of L [B, K, C, D])."""
        return self.replace(keys=tuple(self.keys), values=tuple(self.values))


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: no valid slot, length 0."""
    kv_shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    slots = lambda dtype: jnp.zeros((batch, capacity), dtype)  # distinct buffers (donation-safe)
    meta = TokenMeta(
        doc=slots(jnp.int32),
        pos=slots(jnp.int32),
        seg=slots(jnp.int32),
        anchor=slots(bool),
        protected=slots(bool),
        valid=slots(bool),
    )
    return KVCache(
        keys=jnp.zeros(kv_shape, dtype),
        values=jnp.zeros(kv_shape, dtype),
        meta=meta,
        length=jnp.zeros((batch,), jnp.int32),
    )


def write_rows(buffer_BxCx: jax.Array, chunk_BxTx: jax.Array, offset_B: jax.Array) -> jax.Array:
    """Write each row's chunk at its own offset along axis 1 (caller guarantees offset + T <= C)."""

    def one(buf, chunk, off):
        return jax.lax.dynamic_update_slice_in_dim(buf, chunk.astype(buf.dtype), off, axis=0)

    return jax.vmap(one)(buffer_BxCx, chunk_BxTx, offset_B)


def write_slots(buffer_LxBxKxCxD: jax.Array, chunk_LxBxKxTxD: jax.Array, offset_B: jax.Array) -> jax.Array:
    """Write every layer's chunk at each row's offset along the slot axis (caller keeps offset + T <= C).

    One scatter, updated in place under jit (a vmap over the batch axis would transpose the whole
    cache). Offsets are clamped to [0, C - T] like `write_rows`, so a write never leaves the buffer.
    """
    B, K, T = chunk_LxBxKxTxD.shape[1:4]
    slot_BxT = jnp.clip(offset_B, 0, buffer_LxBxKxCxD.shape[3] - T)[:, None] + jnp.arange(T)
    return buffer_LxBxKxCxD.at[:, jnp.arange(B)[:, None, None], jnp.arange(K)[:, None], slot_BxT[:, None]].set(
        chunk_LxBxKxTxD.astype(buffer_LxBxKxCxD.dtype), mode="promise_in_bounds"
    )


def append_meta(cache: KVCache, meta: TokenMeta) -> KVCache:
    """Record a chunk's metadata [B, T] in slots [length, length + T) and advance `length`.

    The model writes the chunk's keys/values for all layers (`write_slots`).
    """
    off = cache.length
    meta = meta.replace(doc=jnp.zeros_like(meta.doc))  # one document per cache row
    return cache.replace(
        meta=jax.tree.map(lambda slot, chunk: write_rows(slot, chunk, off), cache.meta, meta),
        length=cache.length + meta.pos.shape[1],
    )


def keep_slots(
    cache: KVCache, open_seg_B: jax.Array, full: bool, window: int = 0, next_pos_B: jax.Array | None = None
) -> jax.Array:
    """[B, C] bool: the slots a compaction keeps.

    Anchor cache: valid and (anchor or protected or in the open sentence `open_seg_B` or, with a `window` of n,
    among the last n positions before the row's next one, `next_pos_B`: the next query's window).
    Full cache (`full=True`): every valid slot. Other slots can never be attended to
    again under `anjax.core.mask.attention_allowed` (a later query's window starts later still).
    """
    if full:
        return cache.valid
    keep = cache.anchor | cache.protected | (cache.seg == open_seg_B[:, None])
    if window:
        assert next_pos_B is not None, "a window needs the rows' next positions"
        keep |= in_window(next_pos_B[:, None], cache.pos, window)[:, 0]
    return cache.valid & keep


def pack_order(keep_xC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, live), both shaped like `keep_xC` [..., C]: gathering along the last axis by `order` puts the
    kept slots first in their order (stable); `live` marks the first (number kept) slots."""
    order_xC = jnp.argsort(~keep_xC, axis=-1, stable=True)
    live_xC = jnp.arange(keep_xC.shape[-1]) < keep_xC.sum(axis=-1, keepdims=True)
    return order_xC, live_xC


def compact(cache: KVCache, keep_BxC: jax.Array) -> KVCache:
    """Move each row's kept slots to the front in their order (stable); `length` = kept count.

    Freed slots are zeroed and invalid. Cost: one gather over the whole cache.
    """
    order_BxC, live_BxC = pack_order(keep_BxC)
    length_B = live_BxC.sum(axis=1, dtype=jnp.int32)

    def take_meta(x_BxC):
        return jnp.where(live_BxC, jnp.take_along_axis(x_BxC, order_BxC, axis=1), jnp.zeros((), x_BxC.dtype))

    def take_kv(x_LxBxKxCxD):
        x = jnp.take_along_axis(x_LxBxKxCxD, order_BxC[None, :, None, :, None], axis=3)
        return jnp.where(live_BxC[None, :, None, :, None], x, jnp.zeros((), x.dtype))

    return cache.map_slots(take_kv, take_meta).replace(length=length_B)


def close_sentence(cache: KVCache, close_B: jax.Array, open_start_B: jax.Array) -> KVCache:
    """Decode-time compaction after one appended token: O(one slot) instead of a gather.

    Precondition: the open sentence's slots from `open_start` on are its tail after its
    last protected slot, `[open_start, length)`. In rows where `close_B` (the last slot
    holds an anchor) that anchor moves to `open_start`, the rest of the tail is freed
    (marked invalid, not zeroed) and `length = open_start + 1`; the sentence's other
    unprotected slots (before a protected span inside it) become holes: invalid slots
    below `length`, never attended to, reclaimed by the next `compact`. The valid slots
    are then those of `compact(cache, keep_slots(...))`; other rows are unchanged.
    """
    src_B = jnp.maximum(cache.length - 1, 0)
    dst_B = jnp.where(close_B, open_start_B, src_B)
    length_B = jnp.where(close_B, open_start_B + 1, cache.length)
    closed_seg_Bx1 = jnp.take_along_axis(cache.seg, src_B[:, None], axis=1)
    hole_BxC = close_B[:, None] & (cache.seg == closed_seg_Bx1) & ~cache.anchor & ~cache.protected

    def move_meta(x_BxC):
        slot_Bx1 = jnp.take_along_axis(x_BxC, src_B[:, None], axis=1)
        return write_rows(x_BxC, slot_Bx1, dst_B)

    def move_kv(x_LxBxKxCxD):
        return write_slots(
            x_LxBxKxCxD, jnp.take_along_axis(x_LxBxKxCxD, src_B[None, :, None, None, None], axis=3), dst_B
        )

    live_BxC = jnp.arange(cache.capacity) < length_B[:, None]
    moved = cache.map_slots(move_kv, move_meta)
    valid_BxC = move_meta(cache.valid & ~hole_BxC) & live_BxC
    return moved.replace(meta=moved.meta.replace(valid=valid_BxC), length=length_B)


def evict(cache: KVCache, keep_BxC: jax.Array) -> KVCache:
    """Decode-time compaction under a window, where a slot leaves the window at every step: the slots outside
    `keep_BxC` become holes (invalid, metadata only); when some row's buffer is full (`length` = capacity),
    every row is compacted (`compact`: one gather, once per many steps). The valid slots are then those of
    `compact(cache, keep_BxC)`."""
    cache = cache.replace(meta=cache.meta.replace(valid=cache.valid & keep_BxC))
    full = jnp.any(cache.length >= cache.capacity)
    return jax.lax.cond(full, lambda c: compact(c, c.valid), lambda c: c, cache)


def fit_slots(x: jax.Array, capacity: int, axis: int) -> jax.Array:
    """`x` with `capacity` entries along its slot axis: cut, or padded with zeros."""
    extra = capacity - x.shape[axis]
    if extra <= 0:
        return jax.lax.slice_in_dim(x, 0, capacity, axis=axis)
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def resize(cache: KVCache, capacity: int) -> KVCache:
    """The cache with `capacity` slots: cut or padded with empty slots (caller keeps length <= capacity)."""
    return cache.map_slots(lambda kv: fit_slots(kv, capacity, 3), lambda meta: fit_slots(meta, capacity, 1))
