"""Brute-force oracles for the training-free cache policies, written from the model's definition.

- `brute_force`: the prompt's first n tokens observed once (plain causal attention); every later query
  sees, of those n, only the keys its (layer, KV head) keeps (`Policy.keep` on the attention mass this
  forward computes itself) and every later token: scoring, and SnapKV's generation.
- `streamed_logp` / `streamed_nll`: layer by layer and chunk by chunk, a query of chunk c sees the keys its
  (layer, KV head) kept after chunk c − 1 and the keys of its own chunk up to itself (an explicit mask);
  the kept set after chunk c is `Policy.keep` on the attention mass this forward computes (h2o: summed over
  every chunk so far and carried by the kept keys; snapkv: the last `obs` queries of chunk c), read in the
  cache's slot order (kept keys by position, then the chunk): perplexity, and with a first chunk of the
  prompt then chunks of one token, the generation of `window` and `h2o`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.model import rope
from anjax.inference.runtime import round_up


def _rms(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def brute_force(cfg, params, ids, n, policy=None, budget=None):
    """(log-probs [T, V], per layer the key mass [K, n] of the prompt's first n tokens, kept [L, K, n]).

    Queries at positions >= n see prompt key j only if head (layer, k) keeps j: `policy.keep` on the
    mass of this very forward (all prompt positions kept when `policy` is None)."""
    return jax.tree.map(np.asarray, _brute_force(cfg, params, np.asarray(ids), n, policy, budget))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))  # one compile per call, not op by op
def _brute_force(cfg, params, ids, n, policy, budget):
    T, H, K, D = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = jnp.arange(T)[None]
    x = params["embed"][jnp.asarray(ids)]
    causal = jnp.tril(jnp.ones((T, T), bool))
    masses, kept = [], []
    for i in range(cfg.num_layers):
        p = params[f"layer_{i}"]
        h = _rms(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
        q = rope(jnp.einsum("te,ehd->thd", h, p["attn"]["q"])[None], pos, cfg.rope_theta, 1.0)[0]
        k = rope(jnp.einsum("te,ekd->tkd", h, p["attn"]["k"])[None], pos, cfg.rope_theta, 1.0)[0]
        v = jnp.einsum("te,ekd->tkd", h, p["attn"]["v"])
        kh, vh = jnp.repeat(k, H // K, 1), jnp.repeat(v, H // K, 1)
        logits = jnp.einsum("thd,shd->hts", q, kh) / np.sqrt(D)
        probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), -1)  # [H, T, T]; prompt queries: plain causal
        weight = jnp.zeros(T)
        if policy is not None:
            counted_1xn = policy.query_weight(jnp.ones((1, n), bool), jnp.arange(n)[None], jnp.array([n]))
            weight = weight.at[:n].set(counted_1xn[0])
        mass_K = jnp.einsum("hts,t->hs", probs, weight).reshape(K, H // K, T).sum(1)[:, :n]
        if policy is None:
            keep_K = jnp.ones((K, n), bool)
        else:
            keep_K = policy.keep(jnp.pad(mass_K, ((0, 0), (0, T)))[None, None], jnp.array([n]), jnp.array([budget]))
            keep_K = keep_K[0, 0, :, :n]
        visible = causal[None] & jnp.concatenate(
            [jnp.where(jnp.arange(T)[None, :, None] >= n, keep_K[:, None], True), jnp.ones((K, T, T - n), bool)], -1
        )
        logits = jnp.where(jnp.repeat(visible, H // K, 0), logits, -jnp.inf)
        out = jnp.einsum("hts,shd->thd", jax.nn.softmax(logits, -1), vh).reshape(T, H * D)
        x = x + out @ p["attn"]["o"].reshape(H * D, -1)
        h = _rms(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["mlp"]["gate"]) * (h @ p["mlp"]["up"])) @ p["mlp"]["down"]
        masses.append(mass_K)
        kept.append(keep_K)
    logits = _rms(x, params["final_norm"]["scale"], cfg.rms_norm_eps) @ params["embed"].T
    return jax.nn.log_softmax(logits, -1), jnp.stack(masses), jnp.stack(kept)


def streamed_nll(cfg, params, row, policy, budget, chunk):
    """-Σ log p(row[t + 1] | row[: t + 1]) under the streamed policy, brute force (see the module docstring)."""
    fed = np.asarray(row[:-1])
    logp = streamed_logp(cfg, params, fed, policy, budget, chunk)
    return -sum(float(logp[t, row[t + 1]]) for t in range(len(fed)))


def streamed_logp(cfg, params, ids, policy, budget, chunk, first=None):
    """log-probs [N, V] of `ids` [N] streamed in chunks: the first of `first` tokens (default `chunk`),
    then chunks of `chunk`; generation is first = the prompt's fed tokens, chunk = 1."""
    return np.asarray(_streamed_logp(cfg, params, jnp.asarray(ids), policy, budget, chunk, first or chunk))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))  # one compile per case, not op by op
def _streamed_logp(cfg, params, ids_N, policy, budget, chunk, first):
    N, H, K, D = len(ids_N), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    W = max(first, chunk)  # query rows per step: the longest chunk
    G, P = H // K, first + round_up(max(N - first, 0), chunk) + W  # positions padded past the last step's rows
    pos_P = jnp.arange(P)
    x = params["embed"][jnp.pad(ids_N, (0, P - N))]
    for i in range(cfg.num_layers):
        p = params[f"layer_{i}"]
        h = _rms(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
        q = rope(jnp.einsum("te,ehd->thd", h, p["attn"]["q"])[None], pos_P[None], cfg.rope_theta, 1.0)[0]
        k = rope(jnp.einsum("te,ekd->tkd", h, p["attn"]["k"])[None], pos_P[None], cfg.rope_theta, 1.0)[0]
        v = jnp.einsum("te,ekd->tkd", h, p["attn"]["v"])
        logits_HxPxP = jnp.einsum("thd,shd->hts", q, jnp.repeat(k, G, 1)) / np.sqrt(D)

        def one_chunk(carry, c, logits_HxPxP=logits_HxPxP, v=v):
            kept_KxP, mass_KxP, out_PxHD = carry
            lo = jnp.where(c == 0, 0, first + (c - 1) * chunk)
            end = jnp.minimum(lo + jnp.where(c == 0, first, chunk), N)
            qpos = lo + jnp.arange(W)  # rows from `end` on are not this chunk's: their output is dropped
            mine_TxP = (pos_P >= lo) & (pos_P <= qpos[:, None]) & (pos_P < end)  # own chunk, causal
            visible_KxTxP = kept_KxP[:, None] | mine_TxP[None]
            logits = jax.lax.dynamic_slice_in_dim(logits_HxPxP, lo, W, axis=1)
            probs_HxTxP = jax.nn.softmax(jnp.where(jnp.repeat(visible_KxTxP, G, 0), logits, -jnp.inf), -1)
            out_TxHxD = jnp.einsum("hts,shd->thd", probs_HxTxP, jnp.repeat(v, G, 1))
            out_PxHD = out_PxHD.at[qpos].add(jnp.where((qpos < end)[:, None], out_TxHxD.reshape(W, H * D), 0.0))
            weight_T = policy.query_weight((qpos < end)[None], qpos[None], end[None])[0]
            step_KxP = jnp.einsum("hts,t->hs", probs_HxTxP, weight_T.astype(jnp.float32)).reshape(K, G, P).sum(1)
            mass_KxP = step_KxP + (mass_KxP if policy.kind == "h2o" else 0.0)
            held_KxP = kept_KxP | ((pos_P >= lo) & (pos_P < end))
            n = held_KxP[0].sum()
            slot_KxP = jnp.argsort(~held_KxP, axis=-1, stable=True)  # position of each slot: kept ones, then the chunk
            keep = policy.keep(
                jnp.take_along_axis(mass_KxP, slot_KxP, -1)[None, None], n[None], jnp.minimum(budget, n)[None]
            )
            kept_KxP = jnp.zeros_like(kept_KxP).at[jnp.arange(K)[:, None], slot_KxP].set(keep[0, 0])
            return (kept_KxP, jnp.where(kept_KxP, mass_KxP, 0.0), out_PxHD), None

        start = (jnp.zeros((K, P), bool), jnp.zeros((K, P)), jnp.zeros((P, H * D)))
        (_, _, out), _ = jax.lax.scan(one_chunk, start, jnp.arange(1 + -(-max(N - first, 0) // chunk)))
        x = x + out @ p["attn"]["o"].reshape(H * D, -1)
        h = _rms(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["mlp"]["gate"]) * (h @ p["mlp"]["up"])) @ p["mlp"]["down"]
    logits = _rms(x[:N], params["final_norm"]["scale"], cfg.rms_norm_eps) @ params["embed"].T
    return jax.nn.log_softmax(logits, -1)
