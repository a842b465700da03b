"""Model shapes known without their weights, and the FLOPs and bytes counted from a shape."""

from __future__ import annotations

import json
from pathlib import Path

from anjax.core.config import AC_TOKEN, ModelConfig, matmul_params
from anjax.io.hf import config_from_hf
from anjax.train import run_config

# Shapes of models whose weights are not needed to size a job (HF config.json values).
MODEL_SHAPES = {
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "smollm2-135m": ModelConfig(),  # the defaults are SmolLM2-135M's
}
KNOWN_PATHS = {"meta-llama/Llama-2-7b-hf": "llama2-7b", None: "smollm2-135m"}


def model_config(rc: run_config.RunConfig, shape: str | None = None) -> ModelConfig:
    """The ModelConfig train.py would build for `rc`, from a shape table or config.json, without weights."""
    m = rc.model
    if shape is None and m.path is not None and (Path(m.path).expanduser() / "config.json").is_file():
        base = config_from_hf(json.loads((Path(m.path).expanduser() / "config.json").read_text()))
    else:
        shape = shape or KNOWN_PATHS.get(m.path)
        if shape not in MODEL_SHAPES:
            raise ValueError(
                f"model.path={m.path!r}: its shape is unknown without loading it; pass --model-shape "
                f"({', '.join(MODEL_SHAPES)}) or a local HF directory with config.json"
            )
        base = MODEL_SHAPES[shape]
    runtime = m.runtime()
    if m.from_scratch:  # train.py: defaults + the tokenizer's vocabulary and special ids + arch
        base = ModelConfig(
            vocab_size=base.vocab_size,
            bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
            pad_token_id=base.pad_token_id,
        )
    cfg = base.replace(**m.arch, **runtime)
    mode = rc.anchors.mode
    if mode == "ac":
        cfg = cfg.replace(vocab_size=cfg.vocab_size + 1)
        tokens, ids = (AC_TOKEN,), (cfg.vocab_size - 1,)
    elif mode == "ep":
        tokens = rc.anchors.tokens or (".", "?", "!")
        ids = tuple(range(3, 3 + len(tokens)))
    else:
        tokens, ids = (), ()
    return cfg.replace(anchor_mode=mode, anchor_tokens=tuple(tokens), anchor_ids=ids)


def forward_flops(cfg: ModelConfig, tokens: int, keys: int) -> float:
    """Forward FLOPs of `tokens` queries, each attending over `keys` slots (dense: masked ones count)."""
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys
    return tokens * (2 * matmul_params(cfg) + attention)
