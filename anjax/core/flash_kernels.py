"""Block-skipping flash attention over runs of tokens (a sentence, or a document), as Pallas kernels, with its LSE.

    out_BxKxGxTxD, lse_BxKxGxT = band_flash(kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT)
    dq, dk, dv = band_flash_grads(kernel, q, k, v, start_BxT, out, lse, dout)

`start_BxT[t]` is the index where token t's run begins (`anjax.core.sparse_attention` derives it from the
predicate's metadata: a sentence in anchor mode, a document in full mode; a padding token is a run of its own,
start = t). Query t attends to key s iff start[s] == start[t] and s <= t, so start[t] <= t and the key blocks
a query block needs are [min start of its queries // block, its own index]: `band_blocks` turns that into the
block ranges the kernels consume, and every (query block, key block) pair outside them is skipped, at run time,
from the data. q is already scaled; lse is the natural log-sum-exp (fp32). `band_flash_grads` is the
FlashAttention-2 backward fed with a *given* (out, lse): with the merged output and LSE of every key part, it
returns this part's share of the exact gradient of the one softmax (P = exp(S - lse), dS = P (dP - rowsum(dO *
out))).

Kernels (`Kernel.name`), written here on public Pallas APIs only:
- "tpu" (Mosaic): grid (batch, head, query block, key block) with the block ranges scalar-prefetched
  (`pltpu.PrefetchScalarGridSpec`): a skipped pair computes nothing and its index map repeats the last block,
  so it is not even copied. Blocks of 128 (the lane width).
- "gpu" (Triton): grid (query block, batch, head), each program looping over its own key-block range only;
  the backward's key-block programs loop over their query-block range. Blocks of 64; head_dim a power of 2.
GQA: the K key/value heads are read in place by the H = K * G query heads (index maps h / G); the key/value
gradients are per query head, summed over each group here. `Kernel(name, interpret=True)` runs the kernel in
Pallas interpret mode (CPU tests, `--dry-run`). The kernels express exactly "same run and causal": a mask
that is not a union of runs (e.g. a sliding window) must stay on the tiled path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from anjax.core.sharding import BATCH_AXES

KERNELS = ("gpu", "tpu")
GPU_BLOCK = 64  # Triton query/key block
TPU_BLOCK = 128  # Mosaic block: the lane width
LANES = 128  # TPU: per-row statistics are kept lane-replicated, [rows, 128]
SUBLANES = 8
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a row's first visited block may be all masked


class Kernel(NamedTuple):
    """A static kernel choice: name in KERNELS, and whether to run it in Pallas interpret mode."""

    name: str
    interpret: bool = False


def kernel_for(platform: str) -> Kernel | None:
    """The kernel for a JAX platform name ("gpu" | "tpu" | "cpu" ...); None: the pure-JAX path."""
    return Kernel(platform) if platform in KERNELS else None


def kernel_for_attention(attention: str, platform: str) -> Kernel | None:
    """The kernel `ModelConfig.attention` asks for: None for dense | sparse | auto (the tiled path), the
    platform's for "kernel" (ValueError on a platform without one), the named one for "kernel:gpu[-interpret]"."""
    if not attention.startswith("kernel"):
        return None
    if attention == "kernel":
        if platform not in KERNELS:
            raise ValueError(f"attention=kernel: no Pallas kernel on platform {platform!r} (gpu, tpu); use sparse")
        return Kernel(platform)
    name, _, mode = attention.removeprefix("kernel:").partition("-")
    return Kernel(name, interpret=mode == "interpret")


def block_multiple(kernel: Kernel) -> int:
    """The block length; T must be a multiple of it."""
    return GPU_BLOCK if kernel.name == "gpu" else TPU_BLOCK


def band_blocks(start_BxT: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(first_BxN, last_BxN) int32: query block i visits key blocks first[i]..i; key block j is visited by the
    query blocks i in j..last[j] with first[i] <= j. Exactly the blocks holding an allowed pair when each run's
    tokens are contiguous (inner padding inside a run only adds blocks, never drops one)."""
    B, T = start_BxT.shape
    n = T // block
    first_BxN = (start_BxT.reshape(B, n, block).min(-1) // block).astype(jnp.int32)
    i_N = jnp.arange(n, dtype=jnp.int32)
    visits_BxNxN = block_mask(first_BxN)
    last_BxN = jnp.max(jnp.where(visits_BxNxN, i_N[None, :, None], -1), axis=1).astype(jnp.int32)
    return first_BxN, last_BxN


def block_mask(first_BxN: jax.Array) -> jax.Array:
    """[B, N query blocks, N key blocks] bool: the pairs the kernels compute."""
    i_N = jnp.arange(first_BxN.shape[1], dtype=jnp.int32)
    return (first_BxN[:, :, None] <= i_N[None, None, :]) & (i_N[None, None, :] <= i_N[None, :, None])


def _flat(x_BxKxGxTxD):
    """[B, T, H, D] (head h = k * G + g)."""
    B, K, G, T, D = x_BxKxGxTxD.shape
    return x_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _to_groups(x_BxTxHxD, K: int):
    B, T, H, D = x_BxTxHxD.shape
    return x_BxTxHxD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)


def _per_device(fn, args, head_dims: tuple, out_head_dims: tuple):
    """`fn(*args)` under the mesh in force (`jax.set_mesh`, as the train step traces), as a shard_map: Pallas
    kernels are not partitioned automatically. Rows split over the batch axes, key/value heads (dim
    `head_dims[i]` of args[i], None: none) over "tensor" when they divide; no mesh: a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    B, K = args[0].shape[0], args[0].shape[1]  # q [B, K, G, T, D]
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    batch = batch if B % int(np.prod([mesh.shape[a] for a in batch])) == 0 else None
    heads = "tensor" if "tensor" in mesh.axis_names and K % mesh.shape["tensor"] == 0 else None

    def spec(ndim, head_dim):
        axes = [None] * ndim
        axes[0] = batch
        if head_dim is not None:
            axes[head_dim] = heads
        return jax.sharding.PartitionSpec(*axes)

    in_specs = tuple(spec(x.ndim, d) for x, d in zip(args, head_dims))
    out_specs = tuple(spec(n, d) for n, d in out_head_dims)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def band_flash(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT):
    """(out [B, K, G, T, D] in q's dtype, lse [B, K, G, T] fp32) of the causal same-run attention."""
    run = functools.partial(_band_flash, kernel)
    return _per_device(run, (q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT), (1, 2, 2, None), ((5, 1), (4, 1)))


def band_flash_grads(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT, out, lse, dout):
    """(dq [B, K, G, T, D], dk [B, T, K, D], dv [B, T, K, D]) fp32 for the given merged out/lse/dout."""
    run = functools.partial(_band_flash_grads, kernel)
    args = (q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT, out, lse, dout)
    return _per_device(run, args, (1, 2, 2, None, 1, 1, 1), ((5, 1), (4, 2), (4, 2)))


def _band_flash(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT):
    B, K, G, T, D = q_BxKxGxTxD.shape
    start_BxT = start_BxT.astype(jnp.int32)
    if kernel.name == "gpu":
        out_BxTxHxD, lse_BxHxT = _gpu_forward(kernel.interpret, _flat(q_BxKxGxTxD), k_BxTxKxD, v_BxTxKxD, start_BxT)
        out = _to_groups(out_BxTxHxD, K)
    else:
        q_BxHxTxD = q_BxKxGxTxD.reshape(B, K * G, T, D)
        kv = lambda x: x.transpose(0, 2, 1, 3)
        out_BxHxTxD, lse_BxHxT = _tpu_forward(kernel.interpret, q_BxHxTxD, kv(k_BxTxKxD), kv(v_BxTxKxD), start_BxT)
        out = out_BxHxTxD.reshape(B, K, G, T, D)
    return out, lse_BxHxT.reshape(B, K, G, T)


def _band_flash_grads(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, start_BxT, out, lse, dout):
    B, K, G, T, D = q_BxKxGxTxD.shape
    start_BxT = start_BxT.astype(jnp.int32)
    lse_BxHxT = lse.reshape(B, K * G, T).astype(jnp.float32)
    delta_BxHxT = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1).reshape(B, K * G, T)
    if kernel.name == "gpu":
        q, do = _flat(q_BxKxGxTxD), _flat(dout.astype(q_BxKxGxTxD.dtype))
        dq, dk, dv = _gpu_backward(kernel.interpret, q, k_BxTxKxD, v_BxTxKxD, start_BxT, lse_BxHxT, delta_BxHxT, do)
        dq = _to_groups(dq, K)
    else:
        q, do = (x.reshape(B, K * G, T, D) for x in (q_BxKxGxTxD, dout.astype(q_BxKxGxTxD.dtype)))
        kv = lambda x: x.transpose(0, 2, 1, 3)
        dq, dk, dv = _tpu_backward(
            kernel.interpret, q, kv(k_BxTxKxD), kv(v_BxTxKxD), start_BxT, lse_BxHxT, delta_BxHxT, do
        )
        dq = dq.reshape(B, K, G, T, D)
        dk, dv = (x.transpose(0, 2, 1, 3) for x in (dk, dv))  # [B, T, H, D]
    kv_sum = lambda x: x.reshape(B, T, K, G, D).sum(3)
    return dq, kv_sum(dk), kv_sum(dv)


# ----------------------------------------------------------------------------- GPU (Triton)


def _band_mask(start_q_Q, start_k_S, q0, k0):
    """[Q, S] bool: same run and causal, for query rows from q0 and key columns from k0."""
    rows = q0 + lax.broadcasted_iota(jnp.int32, (start_q_Q.shape[0], start_k_S.shape[0]), 0)
    cols = k0 + lax.broadcasted_iota(jnp.int32, (start_q_Q.shape[0], start_k_S.shape[0]), 1)
    return (start_q_Q[:, None] == start_k_S[None, :]) & (cols <= rows)


def _dot(a, b, trans_a=False, trans_b=False):
    """fp32 accumulation; fp32 inputs at full precision (not TF32 / bf16 passes: the fp32 path is exact)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gpu_params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _gpu_forward(interpret, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, start_BxT):
    B, T, H, D = q_BxTxHxD.shape
    G, b, n = H // k_BxTxKxD.shape[2], GPU_BLOCK, T // GPU_BLOCK
    first_BxN, _ = band_blocks(start_BxT, b)

    def kernel(first_ref, start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        i = pl.program_id(0)
        q = q_ref[...]
        start_q = start_ref[pl.ds(i * b, b)]

        def body(j, carry):
            acc, m, l = carry
            k = k_ref[pl.ds(j * b, b), :]
            s = _dot(q, k, trans_b=True)
            s = jnp.where(_band_mask(start_q, start_ref[pl.ds(j * b, b)], i * b, j * b), s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_next)
            p = jnp.exp(s - m_next[:, None])
            v = v_ref[pl.ds(j * b, b), :]
            return acc * alpha[:, None] + _dot(p.astype(v.dtype), v), m_next, l * alpha + p.sum(-1)

        init = (jnp.zeros((b, D), jnp.float32), jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.float32))
        acc, m, l = lax.fori_loop(first_ref[i], i + 1, body, init)
        o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log(l)

    return pl.pallas_call(
        kernel,
        grid=(n, B, H),
        in_specs=[
            pl.BlockSpec((None, n), lambda i, bb, h: (bb, 0)),
            pl.BlockSpec((None, T), lambda i, bb, h: (bb, 0)),
            pl.BlockSpec((None, b, None, D), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, T, None, D), lambda i, bb, h: (bb, 0, lax.div(h, G), 0)),
            pl.BlockSpec((None, T, None, D), lambda i, bb, h: (bb, 0, lax.div(h, G), 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, b, None, D), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, b), lambda i, bb, h: (bb, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q_BxTxHxD.shape, q_BxTxHxD.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        compiler_params=None if interpret else _gpu_params(),
        interpret=interpret,
        name="band_flash_forward",
    )(first_BxN, start_BxT, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD)


def _gpu_backward(interpret, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, start_BxT, lse_BxHxT, delta_BxHxT, do_BxTxHxD):
    B, T, H, D = q_BxTxHxD.shape
    G, b, n = H // k_BxTxKxD.shape[2], GPU_BLOCK, T // GPU_BLOCK
    first_BxN, last_BxN = band_blocks(start_BxT, b)

    def probs(start_ref, lse_ref, delta_ref, q, k, v, do, i, j):
        """(P, dS) of query block i x key block j."""
        s = _dot(q, k, trans_b=True)
        allowed = _band_mask(start_ref[pl.ds(i * b, b)], start_ref[pl.ds(j * b, b)], i * b, j * b)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[pl.ds(i * b, b)][:, None]), 0.0)
        dp = _dot(do, v, trans_b=True)
        return p, p * (dp - delta_ref[pl.ds(i * b, b)][:, None])

    def dkdv_kernel(first_ref, last_ref, start_ref, lse_ref, delta_ref, q_ref, do_ref, k_ref, v_ref, dk_ref, dv_ref):
        j = pl.program_id(0)
        k, v = k_ref[...], v_ref[...]

        def body(i, carry):
            dk, dv = carry
            q, do = q_ref[pl.ds(i * b, b), :], do_ref[pl.ds(i * b, b), :]
            p, ds = probs(start_ref, lse_ref, delta_ref, q, k, v, do, i, j)
            skip = first_ref[i] > j  # a query block whose range starts after this key block
            p, ds = jnp.where(skip, 0.0, p), jnp.where(skip, 0.0, ds)
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv + _dot(p.astype(do.dtype), do, trans_a=True)

        zeros = jnp.zeros((b, D), jnp.float32)
        dk, dv = lax.fori_loop(j, last_ref[j] + 1, body, (zeros, zeros))
        dk_ref[...], dv_ref[...] = dk, dv

    def dq_kernel(first_ref, start_ref, lse_ref, delta_ref, q_ref, do_ref, k_ref, v_ref, dq_ref):
        i = pl.program_id(0)
        q, do = q_ref[...], do_ref[...]

        def body(j, dq):
            k, v = k_ref[pl.ds(j * b, b), :], v_ref[pl.ds(j * b, b), :]
            _, ds = probs(start_ref, lse_ref, delta_ref, q, k, v, do, i, j)
            return dq + _dot(ds.astype(k.dtype), k)

        dq_ref[...] = lax.fori_loop(first_ref[i], i + 1, body, jnp.zeros((b, D), jnp.float32))

    row = lambda length: pl.BlockSpec((None, length), lambda i, bb, h: (bb, 0))
    stat = pl.BlockSpec((None, None, T), lambda i, bb, h: (bb, h, 0))
    tile = lambda heads: pl.BlockSpec((None, b, None, D), lambda i, bb, h: (bb, i, heads(h), 0))
    whole = lambda heads: pl.BlockSpec((None, T, None, D), lambda i, bb, h: (bb, 0, heads(h), 0))
    query_head, kv_head = (lambda h: h), (lambda h: lax.div(h, G))
    grad = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    call = functools.partial(
        pl.pallas_call, grid=(n, B, H), compiler_params=None if interpret else _gpu_params(), interpret=interpret
    )
    dk, dv = call(
        dkdv_kernel,
        in_specs=[row(n), row(n), row(T), stat, stat, *[whole(query_head)] * 2, *[tile(kv_head)] * 2],
        out_specs=[tile(query_head), tile(query_head)],
        out_shape=[grad, grad],
        name="band_flash_dkdv",
    )(first_BxN, last_BxN, start_BxT, lse_BxHxT, delta_BxHxT, q_BxTxHxD, do_BxTxHxD, k_BxTxKxD, v_BxTxKxD)
    dq = call(
        dq_kernel,
        in_specs=[row(n), row(T), stat, stat, *[tile(query_head)] * 2, *[whole(kv_head)] * 2],
        out_specs=tile(query_head),
        out_shape=grad,
        name="band_flash_dq",
    )(first_BxN, start_BxT, lse_BxHxT, delta_BxHxT, q_BxTxHxD, do_BxTxHxD, k_BxTxKxD, v_BxTxKxD)
    return dq, dk, dv


# ----------------------------------------------------------------------------- TPU (Mosaic)


def _lanes(x_RxL, width: int):
    """A lane-replicated [R, 128] statistic as [R, width] (width <= 128 or a multiple of 128)."""
    return x_RxL[:, :width] if width <= LANES else jnp.tile(x_RxL, (1, width // LANES))


def _tpu_mask(sq_ref, sk_ref, i, j):
    """[b, b] bool from the lane-replicated query starts [b, 128] and sublane-replicated key starts [8, b]."""
    b = TPU_BLOCK
    start_q = _lanes(sq_ref[...], b)
    rows = i * b + lax.broadcasted_iota(jnp.int32, (b, b), 0)
    cols = j * b + lax.broadcasted_iota(jnp.int32, (b, b), 1)
    return (start_q == sk_ref[:1, :]) & (cols <= rows)


def _tpu_call(kernel, interpret, grid, args, prefetch, in_specs, out_specs, out_shape, scratch, name):
    """`kernel` over `grid` on `args`, whose first `prefetch` (the block ranges) are scalar-prefetched."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=prefetch,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )(*args)


def _tpu_starts(start_BxT):
    """Query starts lane-replicated [B, T, 128], key starts sublane-replicated [B, 8, T] (Mosaic layouts)."""
    B, T = start_BxT.shape
    return (
        lax.broadcast_in_dim(start_BxT, (B, T, LANES), (0, 1)),
        lax.broadcast_in_dim(start_BxT, (B, SUBLANES, T), (0, 2)),
    )


def _tpu_forward(interpret, q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, start_BxT):
    B, H, T, D = q_BxHxTxD.shape
    G, b, n = H // k_BxKxTxD.shape[1], TPU_BLOCK, T // TPU_BLOCK
    first_BxN, _ = band_blocks(start_BxT, b)
    sq, sk = _tpu_starts(start_BxT)

    def kernel(first_ref, sq_ref, sk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc):
        bb, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when((first_ref[bb, i] <= j) & (j <= i))
        def _block():
            s = _dot(q_ref[...], k_ref[...], trans_b=True)
            s = jnp.where(_tpu_mask(sq_ref, sk_ref, i, j), s, MASK_VALUE)
            m_prev = m_sc[...]
            m_next = jnp.maximum(m_prev, s.max(-1, keepdims=True))  # [b, 128]
            p = jnp.exp(s - _lanes(m_next, b))
            alpha = jnp.exp(m_prev - m_next)
            l_sc[...] = alpha * l_sc[...] + p.sum(-1, keepdims=True)
            m_sc[...] = m_next
            v = v_ref[...]
            acc_sc[...] = acc_sc[...] * _lanes(alpha, D) + _dot(p.astype(v.dtype), v)

        @pl.when(j == n - 1)
        def _finish():
            o_ref[...] = (acc_sc[...] / _lanes(l_sc[...], D)).astype(o_ref.dtype)
            lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])

    visit = lambda bb, i, j, first: jnp.minimum(jnp.maximum(j, first[bb, i]), i)  # skipped: no new copy
    out, lse = _tpu_call(
        kernel,
        interpret,
        (B, H, n, n),
        (first_BxN, sq, sk, q_BxHxTxD, k_BxKxTxD, v_BxKxTxD),
        1,
        [
            pl.BlockSpec((None, b, LANES), lambda bb, h, i, j, first: (bb, i, 0)),
            pl.BlockSpec((None, SUBLANES, b), lambda bb, h, i, j, first: (bb, 0, visit(bb, i, j, first))),
            pl.BlockSpec((None, None, b, D), lambda bb, h, i, j, first: (bb, h, i, 0)),
            pl.BlockSpec((None, None, b, D), lambda bb, h, i, j, first: (bb, lax.div(h, G), visit(bb, i, j, first), 0)),
            pl.BlockSpec((None, None, b, D), lambda bb, h, i, j, first: (bb, lax.div(h, G), visit(bb, i, j, first), 0)),
        ],
        [
            pl.BlockSpec((None, None, b, D), lambda bb, h, i, j, first: (bb, h, i, 0)),
            pl.BlockSpec((None, None, b, LANES), lambda bb, h, i, j, first: (bb, h, i, 0)),
        ],
        [jax.ShapeDtypeStruct(q_BxHxTxD.shape, q_BxHxTxD.dtype), jax.ShapeDtypeStruct((B, H, T, LANES), jnp.float32)],
        [(b, LANES), (b, LANES), (b, D)],
        "band_flash_forward",
    )
    return out, lse[..., 0]


def _tpu_backward(interpret, q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, start_BxT, lse_BxHxT, delta_BxHxT, do_BxHxTxD):
    B, H, T, D = q_BxHxTxD.shape
    G, b, n = H // k_BxKxTxD.shape[1], TPU_BLOCK, T // TPU_BLOCK
    first_BxN, last_BxN = band_blocks(start_BxT, b)
    sq, sk = _tpu_starts(start_BxT)
    lse, delta = (lax.broadcast_in_dim(x, (B, H, T, LANES), (0, 1, 2)) for x in (lse_BxHxT, delta_BxHxT))

    def probs(sq_ref, sk_ref, lse_ref, delta_ref, q, k, v, do, i, j):
        """(P, dS) of query block i x key block j."""
        s = _dot(q, k, trans_b=True)
        p = jnp.where(_tpu_mask(sq_ref, sk_ref, i, j), jnp.exp(s - _lanes(lse_ref[...], b)), 0.0)
        return p, p * (_dot(do, v, trans_b=True) - _lanes(delta_ref[...], b))

    def dkdv_kernel(first_ref, last_ref, sq_ref, sk_ref, lse_ref, delta_ref, q_ref, do_ref, k_ref, v_ref, *refs):
        dk_ref, dv_ref, dk_sc, dv_sc = refs
        bb, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # key block j, query block i

        @pl.when(i == 0)
        def _init():
            dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
            dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

        @pl.when((j <= i) & (i <= last_ref[bb, j]) & (first_ref[bb, i] <= j))
        def _block():
            q, do = q_ref[...], do_ref[...]
            p, ds = probs(sq_ref, sk_ref, lse_ref, delta_ref, q, k_ref[...], v_ref[...], do, i, j)
            dk_sc[...] += _dot(ds.astype(q.dtype), q, trans_a=True)
            dv_sc[...] += _dot(p.astype(do.dtype), do, trans_a=True)

        @pl.when(i == n - 1)
        def _finish():
            dk_ref[...], dv_ref[...] = dk_sc[...], dv_sc[...]

    def dq_kernel(first_ref, sq_ref, sk_ref, lse_ref, delta_ref, q_ref, do_ref, k_ref, v_ref, dq_ref, dq_sc):
        bb, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

        @pl.when((first_ref[bb, i] <= j) & (j <= i))
        def _block():
            k = k_ref[...]
            _, ds = probs(sq_ref, sk_ref, lse_ref, delta_ref, q_ref[...], k, v_ref[...], do_ref[...], i, j)
            dq_sc[...] += _dot(ds.astype(k.dtype), k)

        @pl.when(j == n - 1)
        def _finish():
            dq_ref[...] = dq_sc[...]

    # dK/dV: grid (batch, head, key block j, query block i); a skipped query block repeats the last copied one
    q_visit = lambda bb, j, i, last: jnp.minimum(jnp.maximum(i, j), last[bb, j])
    at_q = lambda width: pl.BlockSpec(
        (None, None, b, width), lambda bb, h, j, i, f, la: (bb, h, q_visit(bb, j, i, la), 0)
    )
    kv_at_j = pl.BlockSpec((None, None, b, D), lambda bb, h, j, i, f, la: (bb, lax.div(h, G), j, 0))
    grad = jax.ShapeDtypeStruct((B, H, T, D), jnp.float32)
    dk, dv = _tpu_call(
        dkdv_kernel,
        interpret,
        (B, H, n, n),
        (first_BxN, last_BxN, sq, sk, lse, delta, q_BxHxTxD, do_BxHxTxD, k_BxKxTxD, v_BxKxTxD),
        2,
        [
            pl.BlockSpec((None, b, LANES), lambda bb, h, j, i, f, la: (bb, q_visit(bb, j, i, la), 0)),
            pl.BlockSpec((None, SUBLANES, b), lambda bb, h, j, i, f, la: (bb, 0, j)),
            at_q(LANES),
            at_q(LANES),
            at_q(D),
            at_q(D),
            kv_at_j,
            kv_at_j,
        ],
        [pl.BlockSpec((None, None, b, D), lambda bb, h, j, i, f, la: (bb, h, j, 0))] * 2,
        [grad, grad],
        [(b, D), (b, D)],
        "band_flash_dkdv",
    )
    # dQ: grid (batch, head, query block i, key block j), as the forward
    visit = lambda bb, i, j, first: jnp.minimum(jnp.maximum(j, first[bb, i]), i)
    at_i = lambda shape: pl.BlockSpec(shape, lambda bb, h, i, j, f: (bb, h, i, 0))
    kv_visit = pl.BlockSpec((None, None, b, D), lambda bb, h, i, j, f: (bb, lax.div(h, G), visit(bb, i, j, f), 0))
    dq = _tpu_call(
        dq_kernel,
        interpret,
        (B, H, n, n),
        (first_BxN, sq, sk, lse, delta, q_BxHxTxD, do_BxHxTxD, k_BxKxTxD, v_BxKxTxD),
        1,
        [
            pl.BlockSpec((None, b, LANES), lambda bb, h, i, j, f: (bb, i, 0)),
            pl.BlockSpec((None, SUBLANES, b), lambda bb, h, i, j, f: (bb, 0, visit(bb, i, j, f))),
            at_i((None, None, b, LANES)),
            at_i((None, None, b, LANES)),
            at_i((None, None, b, D)),
            at_i((None, None, b, D)),
            kv_visit,
            kv_visit,
        ],
        at_i((None, None, b, D)),
        grad,
        [(b, D)],
        "band_flash_dq",
    )
    return dq, dk, dv
