"""Segment-masked causal flash attention on the accelerator kernels shipped with JAX (Pallas), with its LSE.

    out_BxKxGxTxD, lse_BxKxGxT = segment_flash(kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, seg_BxT)
    dq, dk, dv = segment_flash_grads(kernel, q, k, v, seg, out, lse, dout)

Query t may attend to key s iff s <= t and seg[s] == seg[t] (the same-sentence band of
`anjax.core.sparse_attention`). q is already scaled; lse is the natural log-sum-exp (fp32).
`segment_flash_grads` is the kernel's own backward fed with a *given* (out, lse): with the
merged output and LSE of every key part, it returns this part's share of the exact gradient
of the one softmax (FlashAttention-2: P = exp(S - lse), dS = P (dP - rowsum(dO * out))).

Kernels (`kernel_for` picks by platform; the pure-JAX tiled path is used elsewhere):
- "gpu": `jax.experimental.pallas.ops.gpu.attention.mha` (Triton): segment ids, causal key-block
  skipping, LSE residual (base 2) and a Triton backward that takes the residuals. The Mosaic-GPU
  kernel (`attention_mgpu`) has no segment ids; `jax.nn.dot_product_attention` returns no LSE.
- "tpu": `jax.experimental.pallas.ops.tpu.flash_attention` (Mosaic): SegmentIds, causal block
  skipping, (l, m) residuals and a backward that takes them (given LSE as m = lse, l = 1).
  Splash attention skips blocks only from a static mask; the segment mask here is data.
GQA: K key/value heads are repeated to the H = K * G query heads for the kernels, and the
key/value gradients summed back over each group. `interpret=True` runs the kernel in Pallas
interpret mode (CPU tests).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax.numpy as jnp

KERNELS = ("gpu", "tpu")
GPU_BLOCK = 64  # Triton query/key block (forward); the backward uses 32
TPU_BLOCK = 128  # Mosaic TPU block (the kernel's minimum)


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
    """The query/key length the kernel's blocks need T to be a multiple of."""
    return GPU_BLOCK if kernel.name == "gpu" else TPU_BLOCK


def _flat(x_BxKxGxTxD):
    """[B, T, H, D] (head h = k * G + g)."""
    B, K, G, T, D = x_BxKxGxTxD.shape
    return x_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _heads(q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD):
    """q, k, v as [B, T, H, D] with K/V repeated to the H query heads (head h uses kv head h // G)."""
    G = q_BxKxGxTxD.shape[2]
    return _flat(q_BxKxGxTxD), jnp.repeat(k_BxTxKxD, G, axis=2), jnp.repeat(v_BxTxKxD, G, axis=2)


def _to_groups(x_BxTxHxD, K: int):
    B, T, H, D = x_BxTxHxD.shape
    return x_BxTxHxD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)


def _gpu():
    from jax.experimental.pallas.ops.gpu import attention

    b = GPU_BLOCK
    return attention, attention.BlockSizes(b, b, 32, 32, 32, 32)


def _tpu():
    from jax.experimental.pallas.ops.tpu import flash_attention

    b = TPU_BLOCK
    return flash_attention, flash_attention.BlockSizes(b, b, b, 1, b, b, b, b, b, b, b)


def _mode(kernel: Kernel):
    if kernel.interpret and kernel.name == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.force_tpu_interpret_mode()
    return contextlib.nullcontext()


def segment_flash(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, seg_BxT):
    """(out [B, K, G, T, D] in q's dtype, lse [B, K, G, T] fp32) of the causal same-segment attention."""
    K = k_BxTxKxD.shape[2]
    q, k, v = _heads(q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD)
    with _mode(kernel):
        if kernel.name == "gpu":
            mod, bs = _gpu()
            out, lse2_BxHxT = mod.mha(
                q,
                k,
                v,
                seg_BxT,
                sm_scale=1.0,
                causal=True,
                block_sizes=bs,
                interpret=kernel.interpret,
                return_residuals=True,
            )
            lse_BxHxT = lse2_BxHxT / math.log2(math.e)
        else:
            mod, bs = _tpu()
            t = lambda x: x.transpose(0, 2, 1, 3)
            out, l_BxHxT, m_BxHxT = mod._flash_attention_impl(
                t(q),
                t(k),
                t(v),
                None,
                mod.SegmentIds(seg_BxT, seg_BxT),
                True,
                True,
                1.0,
                bs.block_b,
                bs.block_q,
                bs.block_k_major,
                bs.block_k,
                False,
            )
            out, lse_BxHxT = t(out), m_BxHxT + jnp.log(l_BxHxT)
    B, H, T = lse_BxHxT.shape
    return _to_groups(out, K), lse_BxHxT.reshape(B, K, H // K, T)


def segment_flash_grads(kernel: Kernel, q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD, seg_BxT, out, lse, dout):
    """(dq [B, K, G, T, D], dk [B, T, K, D], dv [B, T, K, D]) fp32 for the given merged out/lse/dout."""
    B, K, G, T, D = q_BxKxGxTxD.shape
    q, k, v = _heads(q_BxKxGxTxD, k_BxTxKxD, v_BxTxKxD)
    o, do = _flat(out), _flat(dout)
    lse_BxHxT = lse.reshape(B, K * G, T).astype(jnp.float32)
    with _mode(kernel):
        if kernel.name == "gpu":
            mod, bs = _gpu()
            res = (q, k, v, seg_BxT, o, lse_BxHxT * math.log2(math.e))
            dq, dk, dv, _ = mod._mha_backward(
                1.0, True, bs, "triton", None, 2, None, kernel.interpret, False, False, res, do
            )
        else:
            mod, bs = _tpu()
            t = lambda x: x.transpose(0, 2, 1, 3)
            res = (t(q), t(k), t(v), None, mod.SegmentIds(seg_BxT, seg_BxT), t(o), jnp.ones_like(lse_BxHxT), lse_BxHxT)
            dq, dk, dv = (t(x) for x in mod._flash_attention_bwd(False, True, 1.0, bs, False, res, t(do))[:3])
    kv_sum = lambda x: x.astype(jnp.float32).reshape(B, T, K, G, D).sum(3)
    return _to_groups(dq.astype(jnp.float32), K), kv_sum(dk), kv_sum(dv)
