"""Exact block-sparse attention under the AnSAN predicate, never building the dense [T, S] logits.

    out_BxTxHxD = sparse_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, meta, full, cache=None, tile=None)

The keys of a query are split into disjoint parts, each visited tile by tile with one online
softmax (flash-attention style), so the parts merge by their log-sum-exp into one softmax:

- band: the query's own sentence and, with a window of n (`ModelConfig.anchor_window`), its last n
  positions (anchor mode), or its document (full mode). Query tile i visits only the key tiles from
  the start of its first query's sentence/document (or window, if that starts earlier) to the
  diagonal; the mask is `attention_allowed(...) & local` (anchor mode; local: same sentence or in the
  window) or `attention_allowed(...)` (full).
- anchors (anchor mode only): every valid anchor or protected token of the row, gathered in
  order into a compact per-row array of A = T slots (so it can never overflow), visited in tiles
  only as far as the anchors that precede the query tile; mask `attention_allowed(...) &
  not local`. Compute scales with the number of anchors, not with T.
- cache (prefill chunks): the compacted KV cache with its given mask, in key tiles; a query tile visits
  only the range of key tiles where its mask allows a key (a front-packed cache: the slots in use), so
  a chunk's cost grows with the cache's fill, not with its capacity.

A query tile's key-tile ranges are the union over the batch's rows (loops are shared by the batch).

Every mask is `anjax.core.mask.attention_allowed` on the tile's metadata: the predicate stays the single
definition; the parts only decide which tiles are visited. Exact (to fp32 rounding) for valid
queries under the layout that `token_metadata` and the engine produce: in each row, a document's
valid tokens are contiguous and in the order of their positions (padding anywhere). Outputs at
padding queries are finite and unspecified (the dense path gives them a uniform average).

Kernel path (`kernel`; `model.attention=kernel`, opt-in until a device check passes on hardware: `auto`
and `sparse` take the tiled path on every platform): the band is one call of the block-skipping Pallas kernel
of `anjax.core.flash_kernels` (Triton on GPU, Mosaic on TPU) over `band_starts` (each token's run start), which
returns its LSE; the anchor and cache parts stay on the tiled path and the two merge by LSE. Its backward is
the kernel's backward fed with the merged output and LSE (the exact gradient of the one softmax).
A window or the "sepllm" anchor rule always takes the tiled path (the kernel's band is a sentence, AnSAN).

Differentiable through a custom VJP (the FlashAttention-2 backward, tile by tile): the residuals
are q, k, v, the output and the per-row log-sum-exp, O(T) memory in forward and backward.
GQA: H query heads share K key/value heads in groups of G = H / K, as in `anjax.core.model`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.flash_kernels import Kernel, band_flash, band_flash_grads, block_multiple
from anjax.core.mask import TokenMeta, attention_allowed, in_window

TILE = 64  # query tile length (tokens) in anchor mode, where the band's short sentences waste least in small
# tiles; keys go in tiles of a quarter of it (`key_tile`). On 2 CPU cores the training step at 512-4k tokens ran
# 1.03-1.10x faster with 128/32 (query/key) than 128/128 and 1.06-1.07x faster again with 64/16 (README: Prefill).
# Full mode's dense causal band, and any block of at most 4 * TILE queries (a short prompt's chunk), take tiles of
# 4 * TILE: fewer loop steps (on 2 CPU cores, forward 1.4-1.5x faster at 1k-4k in full mode than half that)
AUTO_MIN_LENGTH = 256  # `attention: auto`: the sparse path from this many queries (a prefill chunk, a row)


def use_sparse(attention: str, length: int) -> bool:
    """Whether a model with `attention` (dense | sparse | auto | kernel[:...]) takes the sparse path for `length`
    queries. A single query row (decode) is always dense: it has no logits matrix to avoid."""
    if length < 2 or attention == "dense":
        return False
    return attention != "auto" or length >= AUTO_MIN_LENGTH


class _Part(NamedTuple):
    """One key set: keys/values head-major [B, K, S, D] (as the KV cache stores them), the key metadata [B, S]
    (or a given mask [B, T, S]) and, per query tile, the key tiles [first, stop) to visit."""

    keys: jax.Array
    values: jax.Array
    meta: TokenMeta | None
    allowed: jax.Array | None
    first: jax.Array  # [nq] int32
    stop: jax.Array  # [nq] int32


# static description of a part: (kind, key tile length); kind: "band" | "anchors" | "given"
_Spec = tuple[str, int]


class _Rule(NamedTuple):
    """The static arguments of `attention_allowed` beyond the metadata (hashable: a custom_vjp static)."""

    full: bool
    window: int = 0
    anchor_rule: str = "ansan"


def _slice(x: jax.Array, start, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _tile_mask(kind: str, rule: _Rule, q_meta: TokenMeta, part: _Part, q0, k0, tq: int, tk: int) -> jax.Array:
    """[B, tq, tk] bool: the predicate on query tile [q0, q0 + tq) x key tile [k0, k0 + tk) of a part."""
    if kind == "given":
        assert part.allowed is not None  # a given part carries its mask, no metadata
        return _slice(_slice(part.allowed, q0, tq, 1), k0, tk, 2)
    qm = jax.tree.map(lambda x: _slice(x, q0, tq, 1), q_meta)
    km = jax.tree.map(lambda x: _slice(x, k0, tk, 1), part.meta)
    allowed = attention_allowed(qm, km, *rule)
    if rule.full:
        return allowed
    local = km.seg[:, None, :] == qm.seg[:, :, None]  # the band's keys; the anchors part has the others
    if rule.window:
        local |= in_window(qm.pos, km.pos, rule.window)
    return allowed & (local if kind == "band" else ~local)


def _scores(q_BxKxGxQxD, k_BxKxSxD):
    return jnp.einsum("bkgqd,bksd->bkgqs", q_BxKxGxQxD, k_BxKxSxD, preferred_element_type=jnp.float32)


def _forward(specs: tuple[_Spec, ...], rule: _Rule, tq: int, q_BxKxGxTxD, q_meta: TokenMeta, parts):
    """(out [B, K, G, T, D] in q's dtype, lse [B, K, G, T] fp32; +inf where a query has no allowed key)."""
    B, K, G, T, D = q_BxKxGxTxD.shape

    def query_tile(i, carry):
        out, lse = carry
        q0 = i * tq
        q_t = _slice(q_BxKxGxTxD, q0, tq, 3)
        m = jnp.full((B, K, G, tq), -jnp.inf, jnp.float32)
        l = jnp.zeros((B, K, G, tq), jnp.float32)
        acc = jnp.zeros((B, K, G, tq, D), jnp.float32)
        for (kind, tk), part in zip(specs, parts):

            def key_tile(j, c, kind=kind, tk=tk, part=part):
                m, l, acc = c
                k0 = j * tk
                allowed = _tile_mask(kind, rule, q_meta, part, q0, k0, tq, tk)[:, None, None]
                s = jnp.where(allowed, _scores(q_t, _slice(part.keys, k0, tk, 2)), -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp(m - m_use)
                p = jnp.exp(s - m_use[..., None])
                v_t = _slice(part.values, k0, tk, 2)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

            m, l, acc = jax.lax.fori_loop(part.first[i], part.stop[i], key_tile, (m, l, acc))
        o_t = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse_t = jnp.where(l > 0, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
        out = jax.lax.dynamic_update_slice_in_dim(out, o_t.astype(out.dtype), q0, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_t, q0, axis=3)

    init = (jnp.zeros_like(q_BxKxGxTxD), jnp.zeros((B, K, G, T), jnp.float32))
    return jax.lax.fori_loop(0, T // tq, query_tile, init)


def _forward_merged(specs, rule, tq, kernel, q_BxKxGxTxD, q_meta, parts, band):
    """(out, lse) of the tiled parts and, with a kernel, of the band (k, v, seg) on it, merged by LSE."""
    if band is None:
        return _forward(specs, rule, tq, q_BxKxGxTxD, q_meta, parts)
    out_b, lse_b = band_flash(kernel, q_BxKxGxTxD, *band)
    if not specs:
        return out_b, lse_b
    out_r, lse_r = _forward(specs, rule, tq, q_BxKxGxTxD, q_meta, parts)
    lse_r = jnp.where(lse_r == jnp.inf, -jnp.inf, lse_r)  # no allowed key in the tiled parts
    lse = jnp.logaddexp(lse_b, lse_r)
    weight = lambda part_lse: jnp.exp(part_lse - lse)[..., None]
    out = out_b.astype(jnp.float32) * weight(lse_b) + out_r.astype(jnp.float32) * weight(lse_r)
    return out.astype(q_BxKxGxTxD.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attend(specs, rule, tq, kernel, q_BxKxGxTxD, q_meta, parts, band):
    return _forward_merged(specs, rule, tq, kernel, q_BxKxGxTxD, q_meta, parts, band)[0]


def _attend_fwd(specs, rule, tq, kernel, q_BxKxGxTxD, q_meta, parts, band):
    out, lse = _forward_merged(specs, rule, tq, kernel, q_BxKxGxTxD, q_meta, parts, band)
    return out, (q_BxKxGxTxD, q_meta, parts, band, out, lse)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _attend_bwd(specs, rule, tq, kernel, res, dout_BxKxGxTxD):
    """FlashAttention-2 backward: P = exp(S - lse) recomputed per tile; dS = P (dP - rowsum(dO * O)), with
    the merged O and lse, so each part (tiled or the kernel's band) gives its share of the exact gradient."""
    q, q_meta, parts, band, out, lse = res
    dq, d_parts = _parts_bwd(specs, rule, tq, q, q_meta, parts, out, lse, dout_BxKxGxTxD)
    d_band = None
    if band is not None:
        k, v, start = band
        dq_b, dk, dv = band_flash_grads(kernel, q, k, v, start, out, lse, dout_BxKxGxTxD)
        dq = dq + dq_b
        d_band = (dk.astype(k.dtype), dv.astype(v.dtype), _zero_cotangent(start))
    return dq.astype(q.dtype), jax.tree.map(_zero_cotangent, q_meta), d_parts, d_band


def _parts_bwd(specs, rule, tq, q, q_meta, parts, out, lse, dout_BxKxGxTxD):
    """(dq fp32, cotangents of the tiled parts)."""
    if not specs:
        return jnp.zeros(q.shape, jnp.float32), parts
    delta = jnp.sum(dout_BxKxGxTxD.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, K, G, T]

    def query_tile(i, carry):
        dq, grads = carry
        q0 = i * tq
        q_t, do_t = _slice(q, q0, tq, 3), _slice(dout_BxKxGxTxD, q0, tq, 3)
        lse_t, delta_t = _slice(lse, q0, tq, 3)[..., None], _slice(delta, q0, tq, 3)[..., None]
        dq_t = jnp.zeros(q_t.shape, jnp.float32)
        new_grads = []
        for (kind, tk), part, (dk, dv) in zip(specs, parts, grads):

            def key_tile(j, c, kind=kind, tk=tk, part=part):
                dq_t, dk, dv = c
                k0 = j * tk
                k_t, v_t = _slice(part.keys, k0, tk, 2), _slice(part.values, k0, tk, 2)
                allowed = _tile_mask(kind, rule, q_meta, part, q0, k0, tq, tk)[:, None, None]
                p = jnp.where(allowed, jnp.exp(_scores(q_t, k_t) - lse_t), 0.0)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", do_t, v_t, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_t)
                dq_t = dq_t + jnp.einsum("bkgqs,bksd->bkgqd", ds, k_t.astype(jnp.float32))
                dk_t = jnp.einsum("bkgqs,bkgqd->bksd", ds, q_t.astype(jnp.float32))
                dv_t = jnp.einsum("bkgqs,bkgqd->bksd", p, do_t.astype(jnp.float32))
                add = lambda g, d: jax.lax.dynamic_update_slice_in_dim(g, _slice(g, k0, tk, 2) + d, k0, axis=2)
                return dq_t, add(dk, dk_t), add(dv, dv_t)

            dq_t, dk, dv = jax.lax.fori_loop(part.first[i], part.stop[i], key_tile, (dq_t, dk, dv))
            new_grads.append((dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_t, q0, axis=3), tuple(new_grads)

    grads0 = tuple((jnp.zeros(p.keys.shape, jnp.float32), jnp.zeros(p.values.shape, jnp.float32)) for p in parts)
    dq, grads = jax.lax.fori_loop(0, q.shape[3] // tq, query_tile, (jnp.zeros(q.shape, jnp.float32), grads0))
    d_parts = tuple(
        jax.tree.map(_zero_cotangent, p)._replace(keys=dk.astype(p.keys.dtype), values=dv.astype(p.values.dtype))
        for p, (dk, dv) in zip(parts, grads)
    )
    return dq, d_parts


_attend.defvjp(_attend_fwd, _attend_bwd)


def _run_start(meta: TokenMeta, full: bool) -> jax.Array:
    """[B, T] index where each token's sentence (document when `full`) begins: the first of the run of
    valid tokens with its (doc, seg); a padding token continues the run of the valid token before it."""
    B, T = meta.valid.shape
    idx_T = jnp.arange(T)
    last_valid_BxT = jax.lax.cummax(jnp.where(meta.valid, idx_T, -1), axis=1)
    prev_BxT = jnp.concatenate([jnp.full((B, 1), -1), last_valid_BxT[:, :-1]], axis=1)  # last valid before t
    at_prev = lambda x: jnp.take_along_axis(x, jnp.maximum(prev_BxT, 0), axis=1)
    changed = meta.doc != at_prev(meta.doc)
    if not full:
        changed |= meta.seg != at_prev(meta.seg)
    new_run_BxT = meta.valid & ((prev_BxT < 0) | changed)
    return jax.lax.cummax(jnp.where(new_run_BxT, idx_T, 0), axis=1)


def band_starts(meta: TokenMeta, full: bool) -> jax.Array:
    """[B, T] int32, the kernel's band (`anjax.core.flash_kernels`): where each valid token's sentence (document
    when `full`) begins; a padding token is a run of its own (its index). The one place the kernel's mask and
    block ranges come from the predicate's metadata."""
    idx_T = jnp.arange(meta.valid.shape[1], dtype=jnp.int32)
    return jnp.where(meta.valid, _run_start(meta, full), idx_T).astype(jnp.int32)


def _pad_to(x: jax.Array, length: int, axis: int = 1, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def key_tile(tile: int, whole: bool) -> int:
    """Key tile length for query tiles of `tile`: `tile` when `whole` (full mode: a causal band is dense; with a
    kernel: accelerators' matrix units take whole tiles, the short ones were measured on CPU), else the largest
    divisor of `tile` up to a quarter of it (a sentence band, the anchors and the cache's anchors are a few dozen
    keys per query: short key tiles stop nearer them)."""
    if whole:
        return tile
    return max(d for d in range(1, max(1, tile // 4) + 1) if tile % d == 0)


def _cache_tiles(allowed_BxTxC: jax.Array, tile: int, tk_want: int) -> tuple[int, jax.Array, jax.Array]:
    """(key tile length, first [nq], stop [nq]): per query tile of `tile` queries, the key tiles of a given
    mask's keys from the first to the last one any of its queries may attend to (none: an empty range).

    The key tile is `tk_want` when it divides the C keys, else their greatest common divisor, or the whole block
    when that is under 16 (tiles of a few keys would cost more in loop steps than they save)."""
    B, T, C = allowed_BxTxC.shape
    tk = math.gcd(C, tk_want)
    tk = tk if tk >= min(tk_want, 16) else C
    any_nqxC = allowed_BxTxC.reshape(B, T // tile, tile, C).any((0, 2))
    key_C = jnp.arange(C, dtype=jnp.int32)
    first_nq = jnp.min(jnp.where(any_nqxC, key_C, C), axis=1) // tk
    stop_nq = (jnp.max(jnp.where(any_nqxC, key_C, -1), axis=1) + tk) // tk  # last // tk + 1; none: 0
    return tk, jnp.minimum(first_nq, stop_nq).astype(jnp.int32), stop_nq.astype(jnp.int32)


def sparse_attention(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    meta: TokenMeta,
    full: bool,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    tile: int | None = None,
    kernel: Kernel | None = None,
    window: int = 0,
    anchor_rule: str = "ansan",
) -> jax.Array:
    """[B, T, H, D] softmax attention of a block of tokens to itself under `attention_allowed(meta, meta, full)`,
    plus, with `cache` = (keys [B, K, C, D], values [B, K, C, D], allowed [B, T, C]), to a dense key block
    in the same softmax. Equal to `anjax.core.model.blocked_attention` on the same keys for valid queries.

    `full` is static (a Python bool). T is padded to a multiple of `tile` (default: 4 * `TILE` in full mode or
    for T <= 4 * `TILE`, else `TILE`) with invalid tokens
    (and of the kernel's block). `kernel`: a `Kernel` for the band, or None (the tiled path). `window`, `anchor_rule`:
    `attention_allowed`'s (static).
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxTxKxD.shape[2]
    full = bool(full)
    rule = _Rule(full, window, anchor_rule)
    if not full and (window or anchor_rule != "ansan"):  # the kernel's band is a sentence, AnSAN: tiled path
        kernel = None
    block = block_multiple(kernel) if kernel else 1
    tile = min(tile or (4 * TILE if full or T <= 4 * TILE else TILE), -(-T // block) * block)
    Tp = -(-T // math.lcm(tile, block)) * math.lcm(tile, block)
    nq = Tp // tile
    meta = jax.tree.map(lambda x: _pad_to(x, Tp), meta)  # padding: valid=False
    q = _pad_to(q_BxTxHxD * jnp.asarray(D**-0.5, q_BxTxHxD.dtype), Tp)
    q_BxKxGxTxD = q.reshape(B, Tp, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k, v = _pad_to(k_BxTxKxD, Tp), _pad_to(v_BxTxKxD, Tp)
    tile_idx = jnp.arange(nq, dtype=jnp.int32)
    tk = key_tile(tile, whole=full or bool(kernel))

    start_BxT = _run_start(meta, full)
    k_BxKxTxD, v_BxKxTxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # the tiled parts read head-major
    if kernel:  # the band on the kernel: a padding token is a run of its own (no valid query's key)
        specs, parts, band = [], [], (k, v, band_starts(meta, full))
    else:
        first_BxT = start_BxT
        if window and not full:  # or its window's start: the valid token `window - 1` valid tokens before it
            rank_BxT = jnp.cumsum(meta.valid, axis=1) - meta.valid
            nth_valid_BxT = jnp.argsort(~meta.valid, axis=1, stable=True)
            back_BxT = jnp.take_along_axis(nth_valid_BxT, jnp.maximum(rank_BxT - window + 1, 0), axis=1)
            first_BxT = jnp.minimum(first_BxT, back_BxT)
        first_nq = (first_BxT[:, ::tile].min(0) // tk).astype(jnp.int32)  # non-decreasing in a row
        stop_nq = (tile_idx + 1) * (tile // tk)  # through the diagonal
        specs, parts, band = [("band", tk)], [_Part(k_BxKxTxD, v_BxKxTxD, meta, None, first_nq, stop_nq)], None
    if not full:  # anchors and protected tokens, front-packed in order; slots past each row's count invalid
        chosen_BxT = meta.valid & (meta.anchor | meta.protected)
        order_BxT = jnp.argsort(~chosen_BxT, axis=1, stable=True)
        count_B = chosen_BxT.sum(1)
        a_meta = jax.tree.map(lambda x: jnp.take_along_axis(x, order_BxT, axis=1), meta)
        a_meta = a_meta.replace(valid=jnp.arange(Tp) < count_B[:, None])
        gather_kv = lambda x: jnp.take_along_axis(x, order_BxT[:, None, :, None], axis=2)
        # anchors at or before each query tile's last token, most over the batch -> anchor tiles to visit
        before_nq = jnp.cumsum(chosen_BxT, axis=1)[:, tile - 1 :: tile].max(0)
        stop_nq = (-(-before_nq // tk)).astype(jnp.int32)
        specs.append(("anchors", tk))
        parts.append(_Part(gather_kv(k_BxKxTxD), gather_kv(v_BxKxTxD), a_meta, None, jnp.zeros(nq, jnp.int32), stop_nq))
    if cache is not None:
        ck_BxKxCxD, cv_BxKxCxD, allowed_BxTxC = cache
        allowed_BxTpxC = _pad_to(allowed_BxTxC, Tp)
        tk_cache, first_nq, stop_nq = _cache_tiles(allowed_BxTpxC, tile, tk)
        specs.append(("given", tk_cache))
        parts.append(_Part(ck_BxKxCxD, cv_BxKxCxD, None, allowed_BxTpxC, first_nq, stop_nq))
    out: jax.Array = _attend(tuple(specs), rule, tile, kernel, q_BxKxGxTxD, meta, tuple(parts), band)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, D)[:, :T]
