"""A Llama-family decoder as a Flax linen module, applied as a pure function.

    logits_BxTxV, cache = Llama(cfg).apply({"params": params}, tokens_BxT, meta, cache,
                                           full_attention=False)

`meta` is the per-token metadata of `anjax.core.mask`; attention follows
`anjax.core.mask.attention_allowed` (AnSAN when `full_attention=False`), dense or through
`anjax.core.sparse_attention` (`cfg.attention`: the same softmax without the [T, T] logits). With a
cache, the chunk attends to every slot of the cache plus itself (two key blocks,
one softmax: the cache is never copied), then its keys/values are written at each
row's `length` (slots from `length` on must be invalid; caller keeps length + T <= C);
the updated cache is returned.
Parameters and activations carry logical axis names; `anjax.core.sharding` maps them to a mesh.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from anjax.core.cache import KVCache, append_meta, write_slots
from anjax.core.config import ModelConfig
from anjax.core.flash_kernels import kernel_for_attention
from anjax.core.mask import TokenMeta, attention_allowed, token_metadata
from anjax.core.params import Params
from anjax.core.sparse_attention import sparse_attention, use_sparse

_init = nn.initializers.normal(0.02)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...], init=_init) -> jax.Array:
    """The parameter, unboxed; its init boxes it with its logical `axes` (None: never sharded)."""
    init_fn = nn.with_logical_partitioning(init, axes)
    return module.param(name, init_fn, shape, jnp.dtype(module.cfg.param_dtype), unbox=True)


def rope(x_BxTxNxD: jax.Array, pos_BxT: jax.Array, theta: float, scaling_factor: float) -> jax.Array:
    """Rotary embedding, HF `rotate_half` layout; linear scaling divides positions by the factor."""
    d = x_BxTxNxD.shape[-1]
    inv_freq_H = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles_BxTxH = (pos_BxT.astype(jnp.float32) / scaling_factor)[..., None] * inv_freq_H
    cos = jnp.cos(jnp.concatenate([angles_BxTxH] * 2, -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles_BxTxH] * 2, -1))[:, :, None, :]
    x = x_BxTxNxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxD.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", (x_BxTxD.shape[-1],), ("embed",), nn.initializers.ones)
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.cfg.dtype)


def dot_attention(
    q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, allowed_BxTxS: jax.Array
) -> jax.Array:
    """Grouped-query softmax attention; disallowed logits are replaced (jnp.where), fp32 softmax."""
    return blocked_attention(
        q_BxTxHxD, [(k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3), allowed_BxTxS)]
    )


def blocked_attention(q_BxTxHxD: jax.Array, blocks) -> jax.Array:
    """`dot_attention` over the concatenation of head-major key blocks [(k_BxKxSxD, v_BxKxSxD, allowed_BxTxS)],
    one softmax.

    The keys are never concatenated (a KV cache and a chunk are attended to in place); head-major
    blocks make q.k and p.v batched matmuls over (B, K) that read the keys and values without a transpose.
    """
    return _attend(q_BxTxHxD, blocks, *_block_exps(q_BxTxHxD, blocks))


def _attend(q_BxTxHxD: jax.Array, blocks, exps, total_BxKxGxTx1: jax.Array) -> jax.Array:
    """The attention output [B, T, H, D] from `_block_exps`' numerators and denominator."""
    B, T, H, D = q_BxTxHxD.shape
    out_BxKxGxTxD = sum(jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), v) for e, (_, v, _) in zip(exps, blocks))
    out_BxTxKxGxD = (out_BxKxGxTxD / total_BxKxGxTx1).transpose(0, 3, 1, 2, 4)
    return out_BxTxKxGxD.astype(q_BxTxHxD.dtype).reshape(B, T, H, D)


def _block_exps(q_BxTxHxD: jax.Array, blocks) -> tuple[list[jax.Array], jax.Array]:
    """Unnormalized softmax numerators per block [B, K, G, T, S] and their common denominator [B, K, G, T, 1]."""
    B, T, H, D = q_BxTxHxD.shape
    K = blocks[0][0].shape[1]
    q = q_BxTxHxD.reshape(B, T, K, H // K, D)
    logits = [
        jnp.where(
            allowed[:, None, None],
            jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (D**-0.5),
            jnp.finfo(jnp.float32).min,
        )
        for k, _, allowed in blocks
    ]
    max_BxKxGxTx1 = functools.reduce(jnp.maximum, [x.max(-1, keepdims=True) for x in logits])
    exps = [jnp.exp(x - max_BxKxGxTx1) for x in logits]  # a softmax over all blocks, normalized at the end
    return exps, functools.reduce(jnp.add, [e.sum(-1, keepdims=True) for e in exps])


def attention_with_key_mass(q_BxTxHxD: jax.Array, blocks, weight_IxBxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`blocked_attention`'s output and, from the same softmax numerators, the key mass [I, B, K, S1 + S2 + ...]:
    the attention probability each key of `blocks` receives, summed over the query heads of its KV group and
    over the queries weighted by `weight_IxBxT[i]` (one sum per weighting, each as if it were the only one).

    Each query's weight is divided by its denominator first, so the mass is one vector-matrix product per
    (row, KV head) over the numerators as they lie: the probabilities are never formed."""
    exps, total_BxKxGxTx1 = _block_exps(q_BxTxHxD, blocks)

    def weighted(w_BxT):
        scale_BxKxGxT = w_BxT.astype(jnp.float32)[:, None, None, :] / total_BxKxGxTx1[..., 0]
        return jnp.concatenate([jnp.einsum("bkgt,bkgts->bks", scale_BxKxGxT, e) for e in exps], -1)

    mass_IxBxKxS = jnp.stack([weighted(w_BxT) for w_BxT in weight_IxBxT])
    return _attend(q_BxTxHxD, blocks, exps, total_BxKxGxTx1), mass_IxBxKxS


class Attention(nn.Module):
    cfg: ModelConfig
    full_attention: bool

    @nn.compact
    def __call__(self, x_BxTxE, q_meta: TokenMeta, k_meta: TokenMeta, layer_kv, mass_weight_IxBxT=None):
        """Returns (y, (k, v) of the chunk) with a cache (`layer_kv`, metadata `k_meta`), else (y, None).

        With `mass_weight_IxBxT`, also sows `key_mass` [I, B, K, C + T] (cache slots, then the chunk's keys)
        in "intermediates" (kept when the caller makes that collection mutable)."""
        cfg, dt = self.cfg, self.cfg.dtype
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused_projections:  # one matvec instead of three (`anjax.core.params.fuse_projections`)
            wqkv = _param(self, "qkv", (E, H + 2 * K, D), ("embed", None, "head_dim")).astype(dt)
            qkv = jnp.einsum("bte,end->btnd", x_BxTxE, wqkv)
            q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
        else:
            wq = _param(self, "q", (E, H, D), ("embed", "heads", "head_dim")).astype(dt)
            wk = _param(self, "k", (E, K, D), ("embed", "kv_heads", "head_dim")).astype(dt)
            wv = _param(self, "v", (E, K, D), ("embed", "kv_heads", "head_dim")).astype(dt)
            q = jnp.einsum("bte,ehd->bthd", x_BxTxE, wq)
            k = jnp.einsum("bte,ekd->btkd", x_BxTxE, wk)
            v = jnp.einsum("bte,ekd->btkd", x_BxTxE, wv)
        wo = _param(self, "o", (H, D, E), ("heads", "head_dim", "embed")).astype(dt)
        q = rope(q, q_meta.pos, cfg.rope_theta, cfg.rope_scaling_factor)
        k = rope(k, q_meta.pos, cfg.rope_theta, cfg.rope_scaling_factor)
        q = with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        window, anchor_rule = cfg.anchor_window, cfg.anchor_rule  # the model's anchor scheme
        mask = lambda keys_meta: attention_allowed(q_meta, keys_meta, self.full_attention, window, anchor_rule)
        sparse = use_sparse(cfg.attention, q.shape[1])  # the chunk's self-attention without its [T, T] logits
        cache = None if layer_kv is None else (layer_kv[0].astype(dt), layer_kv[1].astype(dt), mask(k_meta))
        head_major = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [B, K, T, D], as the cache stores them
        new_kv = None if layer_kv is None else head_major
        if mass_weight_IxBxT is not None:  # the cache's slots, then the chunk's keys
            blocks = [cache, (*head_major, mask(q_meta))] if cache is not None else [(*head_major, mask(k_meta))]
            out, mass = attention_with_key_mass(q, blocks, mass_weight_IxBxT)
            self.sow("intermediates", "key_mass", mass)
        elif sparse:
            kernel = kernel_for_attention(cfg.attention, jax.default_backend())
            out = sparse_attention(
                q, k, v, q_meta, self.full_attention, cache, kernel=kernel, window=window, anchor_rule=anchor_rule
            )
        elif cache is None:  # keys are the chunk itself
            out = dot_attention(q, k, v, mask(k_meta))
        else:  # the cache's slots, then the chunk itself
            out = blocked_attention(q, [cache, (*head_major, mask(q_meta))])
        y = out.reshape(*out.shape[:2], H * D) @ wo.reshape(H * D, E)  # (h, d) as one axis: wo is read as stored
        return with_logical_constraint(y, ("batch", "length", "embed")), new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE):
        cfg, dt = self.cfg, self.cfg.dtype
        E, F = cfg.hidden_size, cfg.intermediate_size
        if cfg.fused_projections:  # one matvec instead of two (`anjax.core.params.fuse_projections`)
            gate_up = _param(self, "gate_up", (E, 2 * F), ("embed", None)).astype(dt)
            g_BxTxF, u_BxTxF = jnp.split(x_BxTxE @ gate_up, 2, axis=-1)
        else:
            g_BxTxF = x_BxTxE @ _param(self, "gate", (E, F), ("embed", "mlp")).astype(dt)
            u_BxTxF = x_BxTxE @ _param(self, "up", (E, F), ("embed", "mlp")).astype(dt)
        down = _param(self, "down", (F, E), ("mlp", "embed")).astype(dt)
        h_BxTxF = nn.silu(g_BxTxF) * u_BxTxF
        h_BxTxF = with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
        return h_BxTxF @ down


class Block(nn.Module):
    """Pre-norm decoder layer. Call signature fits nn.scan: (x, layer_kv, *broadcast) -> (x, chunk_kv)."""

    cfg: ModelConfig
    full_attention: bool

    @nn.compact
    def __call__(self, x_BxTxE, layer_kv, q_meta, k_meta, mass_weight_IxBxT=None):
        h, new_kv = Attention(self.cfg, self.full_attention, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_BxTxE), q_meta, k_meta, layer_kv, mass_weight_IxBxT
        )
        x_BxTxE = x_BxTxE + h
        x_BxTxE = x_BxTxE + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxTxE))
        return with_logical_constraint(x_BxTxE, ("batch", "length", "embed")), new_kv


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


class Llama(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxT: jax.Array,
        meta: TokenMeta,
        cache: KVCache | None = None,
        full_attention: bool = True,
        mass_weight_IxBxT: jax.Array | None = None,
    ):
        """`mass_weight_IxBxT`: sow each layer's `key_mass` (`Attention`; scanned: stacked [L, I, B, K, C + T])."""
        cfg = self.cfg
        embed_VxE = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        table_VxE = with_logical_constraint(embed_VxE.astype(cfg.dtype), ("vocab", None))  # gathered whole over fsdp
        x = table_VxE[tokens_BxT]
        x = with_logical_constraint(x, ("batch", "length", "embed"))

        if cache is None:
            k_meta, layers_kv = meta, None
        else:
            k_meta, layers_kv = cache.slot_meta(), (cache.keys, cache.values)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        split = layers_kv is not None and isinstance(layers_kv[0], tuple)  # one cache buffer per layer
        if cfg.scan_layers:
            if split:
                raise ValueError("a cache split into per-layer buffers needs unrolled layers (scan_layers=False)")
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # pyright: ignore[reportArgumentType]  (flax infers in_axes: int)
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new_kv = stack(cfg, full_attention, name="layers")(x, layers_kv, meta, k_meta, mass_weight_IxBxT)
        else:
            new = []
            for i in range(cfg.num_layers):
                layer_kv = None if layers_kv is None else (layers_kv[0][i], layers_kv[1][i])
                x, kv = block(cfg, full_attention, name=f"layer_{i}")(x, layer_kv, meta, k_meta, mass_weight_IxBxT)
                if split:
                    kv = _after(kv, x)  # written once the layer has read its buffers: in place
                new.append(kv)
            new_kv = None if cache is None else tuple(zip(*new))  # per layer: ([B, K, T, D] * L, ...)

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:  # contract with the table as stored: a transposed head is a copy of it per call
            logits = jnp.einsum("bte,ve->btv", x, embed_VxE.astype(cfg.dtype), preferred_element_type=jnp.float32)
        else:
            head_ExV = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab")).astype(cfg.dtype)
            logits = jnp.einsum("bte,ev->btv", x, head_ExV, preferred_element_type=jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is not None:  # the chunk's keys/values [L, B, K, T, D] go to slots [length, length + T)
            assert new_kv is not None  # the layers return them whenever there is a cache
            offset_B = cache.length
            cache = append_meta(cache, meta)
            keys, values = (
                _write_layers(buf, chunks, offset_B) for buf, chunks in zip((cache.keys, cache.values), new_kv)
            )
            cache = cache.replace(keys=keys, values=values)
        return logits, cache


def _after(kv, x_BxTxE: jax.Array):
    """`kv` (keys, values [B, K, T, D]) made to depend on `x_BxTxE` (plus zeros computed from it: exact).

    XLA:CPU copies a loop-carried buffer that one op reads and another updates in place, twice per
    iteration, unless the update's value depends on the read's result (an optimization barrier does not
    count); a layer's new keys and values are computed before its attention reads the cache."""
    zeros_Bx1xTx1 = 0 * jnp.nan_to_num(x_BxTxE[:, None, :, :1])
    return tuple(a + zeros_Bx1xTx1.astype(a.dtype) for a in kv)


def _write_layers(buffer, chunks, offset_B: jax.Array):
    """`write_slots` for a stacked buffer [L, B, K, C, D] or split buffers (a tuple of L [B, K, C, D], each written
    in place); `chunks`: stacked [L, B, K, T, D] (scanned layers) or L per-layer [B, K, T, D] (unrolled)."""
    if isinstance(buffer, tuple):
        return tuple(write_slots(b[None], c[None], offset_B)[0] for b, c in zip(buffer, chunks))
    return write_slots(buffer, chunks if isinstance(chunks, jax.Array) else jnp.stack(chunks), offset_B)


def init_boxed(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters boxed with their logical axis names (nn.LogicallyPartitioned leaves)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = Llama(cfg).init(rng, tokens, token_metadata(tokens, jnp.ones_like(tokens, bool)))
    assert isinstance(variables, dict)  # flax's type allows a FrozenDict (only under flax_return_frozendict)
    return variables["params"]


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters as a plain nested dict (logical axis names stripped)."""
    return nn.meta.unbox(init_boxed(cfg, rng, seq_len))
