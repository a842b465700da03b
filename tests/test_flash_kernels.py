"""The block-skipping Pallas kernels (anjax.core.flash_kernels) in interpret mode, against the dense predicate.

Verification matrix (both kernels, GPU Triton and TPU Mosaic, on CPU): T = 512 (fast tier) and 1,024 (slow)
= 8/16 GPU blocks, 4/8 TPU blocks; packed EP and AC rows whose documents and sentences cross block
boundaries, with padding; float32 and bfloat16. Checked: the band kernel's output and LSE against the dense
softmax under `attention_allowed` restricted to the query's sentence, and the whole sparse path (band on the
kernel + anchors tiled, merged by LSE) with its gradients against dense attention under the predicate.
Errors and tolerances are the device check's (benchmarks/device_check.py `kernel_errors`, `TOL`; max abs error,
bf16 against fp32 math on the same bf16 inputs): fp32 out/LSE 2e-5, grads 2e-4 x max|grad|; bf16 out 2e-2, LSE
1e-4 (fp32 logits of bf16 inputs), grads 2e-2 x max|grad| (P is rounded to bf16 before P·V, as on device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, slow_case

from anjax.core import flash_kernels as fk
from anjax.core import sparse_attention as sa

dc = load_script("benchmarks/device_check.py")  # kernel_errors / failures / TOL: the device check's own
HEADS = (2, 1, 16)  # GQA: two query heads share one key/value head; head_dim 16


def case(mode: str, T: int, seed: int, rows: int = 2, pad: int = 37, dtype: str = "float32"):
    """(meta, q, k, v): `rows` packed EP/AC rows with `pad` padding tokens, random q/k/v in `dtype`."""
    return dc.kernel_case(mode, T, HEADS, dtype, seed=seed, rows=rows, pad=pad)


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
    """Band kernel: out and LSE vs the dense band; sparse path on the kernel: out, dQ, dK, dV vs dense."""
    meta, q, k, v = case(mode, T, seed=T + len(mode), dtype=dtype)
    errors = dc.kernel_errors(fk.Kernel(name, interpret=True), meta, q, k, v)
    assert not dc.failures(errors, dtype), errors


@pytest.mark.parametrize("mode", ["ep", "ac"])
@pytest.mark.parametrize("block", [fk.GPU_BLOCK, fk.TPU_BLOCK])
def test_block_ranges_are_the_predicates_blocks(mode, block):
    """At 4k tokens, the blocks the kernels compute (`band_blocks` -> `block_mask`, what they consume) are
    exactly the (query block, key block) pairs where the predicate allows a same-sentence pair (rows without
    padding: each sentence's tokens contiguous); with padding they still cover every such pair."""
    for pad in (0, 300):
        meta, *_ = case(mode, 4096, seed=block + pad, rows=1, pad=pad)
        allowed = np.asarray(dc.band_allowed(meta))[0]
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
    H, K, D = HEADS
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
