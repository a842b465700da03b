"""Parameter surgery on the model's parameter tree: layer stacking and embedding rows for new tokens.

`stack_layers` / `with_scan_layers`: the one conversion between per-layer trees (`layer_0`, ...) and
one stacked tree `layers` [L, ...] (`ModelConfig.scan_layers`). `fuse_projections`: each layer's q/k/v and
gate/up kernels concatenated (`ModelConfig.fused_projections`). `resize_embeddings` grows the input (and
untied output) embedding matrices; `init_embedding_row` gives one token (`<AC>`) a fresh row. Host-side
numpy; shapes [V, E] (embed) and [E, V] (lm_head).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.config import ModelConfig

Params: TypeAlias = dict[str, Any]
"""The model's parameter tree, Flax's "params" collection: nested dicts of arrays (numpy on the host, jax.Array,
maybe sharded, on devices), the layers stacked as `layers` [L, ...] or one `layer_{i}` each (`with_scan_layers`)."""


def stack_layers(layers: list[dict]) -> dict:
    """L per-layer trees -> one tree whose leaves are stacked on a leading [L] axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def with_scan_layers(cfg: ModelConfig, params: Params, scan: bool) -> tuple[ModelConfig, Params]:
    """(cfg, params) with the layers stacked (`scan`) or one tree per layer; the math is the same.

    Unstacking also works under jit (each layer a slice of the stacked leaves)."""
    if cfg.scan_layers == scan:
        return cfg, params
    params = dict(params)
    if scan:
        params["layers"] = stack_layers([params.pop(f"layer_{i}") for i in range(cfg.num_layers)])
    else:
        stacked = params.pop("layers")
        params.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.num_layers)})
    return cfg.replace(scan_layers=scan), params


def fuse_projections(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """(cfg, params) with each layer's q, k, v kernels as one `qkv` [E, H + 2K, D] and gate, up as one `gate_up`
    [E, 2F] (`ModelConfig.fused_projections`); the math is the same, in fewer and larger matrix products (decode on
    CPU reads the weights faster so). Stacked or per-layer trees (a stacked leaf has a leading [L] axis)."""
    if cfg.fused_projections:
        return cfg, params

    def fuse(layer: dict) -> dict:
        attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
        attn["qkv"] = jnp.concatenate([attn.pop("q"), attn.pop("k"), attn.pop("v")], axis=-2)
        mlp["gate_up"] = jnp.concatenate([mlp.pop("gate"), mlp.pop("up")], axis=-1)
        return dict(layer, attn=attn, mlp=mlp)

    names = ["layers"] if cfg.scan_layers else [f"layer_{i}" for i in range(cfg.num_layers)]
    return cfg.replace(fused_projections=True), dict(params, **{n: fuse(params[n]) for n in names})


def resize_embeddings(
    cfg: ModelConfig, params: Params, new_vocab: int, init: str = "mean", copy_from: int | None = None
) -> tuple[ModelConfig, Params]:
    """Grow the input (and untied output) embeddings to `new_vocab` rows.

    New rows are the mean of the existing rows (`init="mean"`, the paper) or a copy
    of row `copy_from` (`init="copy"`, e.g. the "." token, the authors' code).
    """
    if new_vocab < cfg.vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {cfg.vocab_size} to {new_vocab}")
    if init not in ("mean", "copy") or (init == "copy" and copy_from is None):
        raise ValueError("init must be 'mean' or 'copy' (with copy_from=<token id>)")
    n = new_vocab - cfg.vocab_size

    def grow(w_VxE):
        w = np.asarray(w_VxE)
        row = w.mean(0, keepdims=True) if init == "mean" else w[copy_from][None]
        return np.concatenate([w, np.repeat(row, n, 0).astype(w.dtype)], 0)

    params = dict(params, embed=grow(params["embed"]))
    if not cfg.tie_embeddings:
        params["lm_head"] = grow(np.asarray(params["lm_head"]).T).T
    return cfg.replace(vocab_size=new_vocab), params


def init_embedding_row(
    cfg: ModelConfig, params: Params, row: int, init: str = "mean", copy_from: int | None = None
) -> tuple[ModelConfig, Params]:
    """Give token `row` (a new token, e.g. `<AC>`) a fresh embedding (and untied output) row.

    Past the matrix: `resize_embeddings` to row + 1. Inside it (a matrix padded past the
    tokenizer's length, the id lands on a padding row): that row is set like a new row,
    the mean of the rows before it (`init="mean"`) or a copy of row `copy_from` (`"copy"`).
    """
    if row >= cfg.vocab_size:
        return resize_embeddings(cfg, params, row + 1, init, copy_from)
    if init not in ("mean", "copy") or (init == "copy" and copy_from is None):
        raise ValueError("init must be 'mean' or 'copy' (with copy_from=<token id>)")

    def set_row(w_VxE):
        w = np.array(w_VxE)
        w[row] = w[:row].mean(0) if init == "mean" else w[copy_from]
        return w

    params = dict(params, embed=set_row(params["embed"]))
    if not cfg.tie_embeddings:
        params["lm_head"] = set_row(np.asarray(params["lm_head"]).T).T
    return cfg, params
