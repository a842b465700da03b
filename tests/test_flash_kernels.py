"""The block-skipping Pallas kernels (anjax.core.flash_kernels) in interpret mode, against the dense predicate.

Verification matrix (both kernels, GPU Triton and TPU Mosaic, on CPU): T = 512 (fast tier) and 1,024 (slow)
= 8/16 GPU blocks, 4/8 TPU blocks; packed EP and AC rows whose documents and sentences cross block
boundaries, with padding; float32 and bfloat16. Checked: the band kernel's output and LSE against the dense
softmax under `attention_allowed` restricted to the query's sentence, and the whole sparse path (band on the
kernel + anchors tiled, merged by LSE) with its gradients against dense attention under the predicate.
Tolerances (max abs error; bf16 against fp32 math on the same bf16 inputs): fp32 out/LSE 2e-5, grads 2e-4 x
max|grad|; bf16 out 2e-2, LSE 1e-4 (fp32 logits of bf16 inputs), grads 2e-2 x max|grad| (P is rounded to
bf16 before P·V, as on device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, slow_case

from anjax.core import flash_kernels as fk
from anjax.core import sparse_attention as sa
from anjax.core.mask import attention_allowed, token_metadata
from anjax.core.model import dot_attention

bench = load_script("benchmarks/bench_attention.py")
H, K, D = 2, 1, 16  # GQA: two query heads share one key/value head
TOL = {  # (out, lse, grads relative to the largest gradient)
    "float32": (2e-5, 2e-5, 2e-4),
    "bfloat16": (2e-2, 1e-4, 2e-2),
}


def case(mode: str, T: int, seed: int, rows: int = 2, pad: int = 37, dtype: str = "float32"):
    """(meta, q, k, v): packed EP/AC rows with `pad` padding tokens, random q/k/v in `dtype`."""
    rng = np.random.default_rng(seed)
    batch = bench.packed_batch(mode, T, rng, rows=rows, pad=pad)
    meta = token_metadata(batch["tokens"], batch["valid"], batch["doc"], anchor_ids=bench.anchor_ids(mode))
    q = jnp.asarray(rng.standard_normal((rows, T, H, D)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((rows, T, K, D)), dtype) for _ in range(2))
    return meta, q, k, v


def band_allowed(meta, full: bool):
    """[B, T, T] the predicate restricted to the query's own sentence (its document when `full`)."""
    allowed = attention_allowed(meta, meta, full)
    return allowed if full else allowed & (meta.seg[:, None, :] == meta.seg[:, :, None])


def dense_band(q_BxTxHxD, k, v, allowed_BxTxT):
    """(out [B, K, G, T, D], lse [B, K, G, T]) in fp32: q already scaled."""
    B, T, _, _ = q_BxTxHxD.shape
    f32 = lambda x: x.astype(jnp.float32)
    qg = f32(q_BxTxHxD).reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, f32(k))
    s = jnp.where(allowed_BxTxT[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, -1)
    out = jnp.einsum("bkgts,bskd->bkgtd", jnp.exp(s - lse[..., None]), f32(v))
    return out, lse


def loss(attend, q, k, v, meta, full):
    w = jnp.cos(jnp.arange(D, dtype=jnp.float32))
    out = attend(q, k, v, meta, full).astype(jnp.float32)
    return jnp.sum(jnp.where(meta.valid[..., None, None], out, 0.0) * w)


MATRIX = [  # interpret mode is slow (TPU ~40 s, GPU ~20 s for 512): two cases in the fast tier
    ("gpu", "ep", 512, "bfloat16"),
    ("tpu", "ac", 512, "float32"),
    slow_case("gpu", "ac", 512, "float32"),
    slow_case("tpu", "ep", 512, "bfloat16"),
    slow_case("gpu", "ep", 1024, "bfloat16"),
    slow_case("tpu", "ac", 1024, "float32"),
    slow_case("gpu", "ac", 1024, "float32"),
    slow_case("tpu", "ep", 1024, "bfloat16"),
]


@pytest.mark.parametrize("name,mode,T,dtype", MATRIX)
def test_kernel_equals_dense_predicate(name, mode, T, dtype):
    """Band kernel: out and LSE vs the dense band; sparse path on the kernel: out and grads vs dense."""
    kernel = fk.Kernel(name, interpret=True)
    meta, q, k, v = case(mode, T, seed=T + len(mode), dtype=dtype)
    tol_out, tol_lse, tol_grad = TOL[dtype]
    valid = np.asarray(meta.valid)
    vq = valid[:, None, None, :]  # [B, 1, 1, T] over [B, K, G, T]
    start = sa.band_starts(meta, False)
    q_BxKxGxTxD = q.reshape(*q.shape[:2], K, H // K, D).transpose(0, 2, 3, 1, 4)

    on_kernel = lambda q, k, v, meta, full: sa.sparse_attention(q, k, v, meta, full, kernel=kernel)
    f32 = lambda x: x.astype(jnp.float32)
    dense = lambda q, k, v, meta, full: dot_attention(f32(q), f32(k), f32(v), attention_allowed(meta, meta, full))

    @jax.jit
    def run(q, k, v, q_BxKxGxTxD, meta, start):
        band = fk.band_flash(kernel, q_BxKxGxTxD, k, v, start)
        want_band = dense_band(q, k, v, band_allowed(meta, False))
        grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v, meta, False) for f in (dense, on_kernel)]
        return band, want_band, on_kernel(q, k, v, meta, False), dense(q, k, v, meta, False), grads

    (out_b, lse_b), (want_out_b, want_lse_b), got, want, (g_want, g_got) = run(q, k, v, q_BxKxGxTxD, meta, start)
    err = lambda a, b, m: float(np.abs(np.asarray(f32(a) - f32(b)))[m].max())
    assert err(out_b, want_out_b, np.broadcast_to(vq[..., None], out_b.shape)) <= tol_out
    assert err(lse_b, want_lse_b, np.broadcast_to(vq, lse_b.shape)) <= tol_lse
    assert err(got, want, np.broadcast_to(valid[..., None, None], got.shape)) <= tol_out
    for g, w in zip(g_got, g_want):
        assert g.dtype == q.dtype
        assert err(g, w, np.ones(g.shape, bool)) <= tol_grad * float(jnp.abs(w).max())


@pytest.mark.parametrize("mode", ["ep", "ac"])
@pytest.mark.parametrize("block", [fk.GPU_BLOCK, fk.TPU_BLOCK])
def test_block_ranges_are_the_predicates_blocks(mode, block):
    """At 4k tokens, the blocks the kernels compute (`band_blocks` -> `block_mask`, what they consume) are
    exactly the (query block, key block) pairs where the predicate allows a same-sentence pair (rows without
    padding: each sentence's tokens contiguous); with padding they still cover every such pair."""
    for pad in (0, 300):
        meta, *_ = case(mode, 4096, seed=block + pad, rows=1, pad=pad)
        allowed = np.asarray(band_allowed(meta, False))[0]
        n = 4096 // block
        brute = allowed.reshape(n, block, n, block).any((1, 3))
        first, last = fk.band_blocks(sa.band_starts(meta, False), block)
        visits = np.asarray(fk.block_mask(first))[0]
        assert (visits | ~brute).all()  # no needed block skipped
        if pad == 0:
            assert (visits == brute).all() and visits.sum() == brute.sum()
        i = np.arange(n)
        assert (np.asarray(last)[0] == np.array([i[visits[:, j]].max() for j in range(n)])).all()
        assert visits.sum() < 0.2 * n * (n + 1) / 2  # a sentence band: few blocks of the causal triangle


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_skipped_blocks_are_never_read(name):
    """NaN keys/values in one key block: the query blocks whose range skips it stay finite (forward and dQ), the
    ones that visit it do not; NaN queries/output grads in one query block: only the key blocks that it visits
    get NaN dK/dV. Fails if a kernel computes a block outside its ranges."""
    kernel = fk.Kernel(name, interpret=True)
    b = fk.block_multiple(kernel)
    meta, q, k, v = case("ep", 4 * b, seed=3, rows=1, pad=0)
    start = sa.band_starts(meta, False)
    visits = np.asarray(fk.block_mask(fk.band_blocks(start, b)[0]))[0]
    q5 = q.reshape(1, 4 * b, K, H // K, D).transpose(0, 2, 3, 1, 4)
    j = 1  # a key block some query blocks after it skip
    assert visits[:, j].sum() >= 2 and not visits[:, j].all()
    poison = lambda x, blk, axis: x.at[(slice(None),) * axis + (slice(blk * b, (blk + 1) * b),)].set(jnp.nan)
    out, lse = jax.jit(lambda k, v: fk.band_flash(kernel, q5, k, v, start))(poison(k, j, 1), poison(v, j, 1))
    finite_rows = np.isfinite(np.asarray(out)).reshape(K, H // K, 4, b, D).all((0, 1, 3, 4))
    assert (finite_rows == ~visits[:, j]).all()
    out, lse = fk.band_flash(kernel, q5, k, v, start)
    grads = jax.jit(lambda q5, k, dout: fk.band_flash_grads(kernel, q5, k, v, start, out, lse, dout))
    dq, _, _ = grads(q5, poison(k, j, 1), jnp.ones_like(out))
    assert (np.isfinite(np.asarray(dq)).reshape(K, H // K, 4, b, D).all((0, 1, 3, 4)) == ~visits[:, j]).all()
    i = 2  # a query block: NaN queries and output gradients
    _, dk, dv = grads(poison(q5, i, 3), k, poison(jnp.ones_like(out), i, 3))
    for g in (dk, dv):
        assert (np.isfinite(np.asarray(g)).reshape(4, b, K, D).all((1, 2, 3)) == ~visits[i, :]).all()
