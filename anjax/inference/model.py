"""A loaded model made ready for inference: the one path the engine and the scorer both take.

`prepare_model` resolves the anchor scheme (`anjax.text.anchors.resolve_scheme`: the model's own, each override
said on stderr), lays the layers out as the steps that run them read them, and places the weights on the
device or over a mesh (`anjax.inference.placement`). Layouts (the math is the same in both):
- "scan": the layers stacked, one layer body to compile (the scorer; the engine's scanned decode);
- "split": one tree per layer, q/k/v and gate/up fused (`anjax.core.params.fuse_projections`): the engine's
  unrolled decode (`EngineConfig.decode_layers`), which holds them per layer once instead of slicing a stack
  in every call.
"""

from __future__ import annotations

import jax

from anjax.core.config import ModelConfig
from anjax.core.params import Params, fuse_projections, with_scan_layers
from anjax.inference import placement
from anjax.text.anchors import AnchorScheme, resolve_scheme

LAYOUTS = ("scan", "split")


def prepare_model(
    cfg: ModelConfig,
    params: Params,
    tokenizer=None,
    *,
    layout: str,
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> tuple[AnchorScheme, ModelConfig, Params]:
    """(scheme, cfg, params) ready for the steps: the scheme resolved with `overrides` (the keyword arguments of
    `resolve_scheme`: mode, tokens, max_sentence_tokens, window, rule), the layers in `layout`, the weights
    placed on the device or split over `mesh`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    scheme, cfg, resolved = resolve_scheme(cfg, tokenizer, params, **overrides)
    assert resolved is not None  # given params come back
    cfg, params = with_scan_layers(cfg, resolved, layout == "scan")
    if layout == "split":
        cfg, params = fuse_projections(cfg, params)
    return scheme, cfg, placement.place_params(cfg, params, mesh)
