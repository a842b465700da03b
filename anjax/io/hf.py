"""Hugging Face Llama-family directories: config and tensor maps, import and export.

The key map is declarative: one table from HF tensor names to our per-layer
parameter paths, each with a reversible reshape. Import checks the full key set
and every shape before anything is copied and names the first offending tensor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from anjax.core.config import ANCHOR_SCHEME_FIELDS, ModelConfig
from anjax.core.params import Params, stack_layers
from anjax.io import outputs

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


class ModelFormatError(ValueError):
    """A model file or directory that anjax cannot use; the message names the problem."""


# ---------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4 or 5 layout); rejects non-Llama models."""
    arch = (hf.get("architectures") or [None])[0]
    if hf.get("model_type") != "llama" and arch not in LLAMA_ARCHITECTURES:
        raise ModelFormatError(
            f"not a Llama-family model: model_type={hf.get('model_type')!r}, architectures={hf.get('architectures')}"
        )
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ModelFormatError(f"unsupported Llama variant: {key}={hf[key]!r} (anjax supports {key}={ok!r})")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ModelFormatError(f"unsupported rope scaling {rope_type!r} (anjax supports default and linear)")
    heads = hf["num_attention_heads"]
    anchor = hf.get("anjax", {})
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **scheme_from_block(anchor),
    ).replace(**overrides)


def scheme_from_block(block: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` anchor-scheme fields of a config.json "anjax" block (older blocks lack some)."""
    known = set(ANCHOR_SCHEME_FIELDS)
    if unknown := sorted(set(block) - known):
        raise ModelFormatError(f'config.json "anjax" block has unknown keys {unknown}: written by a newer anjax?')
    out = {k: v for k, v in block.items()}
    for k in ("anchor_tokens", "anchor_ids"):
        out[k] = tuple(block.get(k, ()))
    return out


def _first(x):
    return x[0] if isinstance(x, list) else x


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for LlamaForCausalLM; the anchor settings ride along under "anjax"."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        "anjax": {k: v for k, v in cfg.to_dict().items() if k in ANCHOR_SCHEME_FIELDS},
    }


# ---------------------------------------------------------------- tensors

Reshape = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Reshape]]:
    """HF name inside `model.layers.{i}.` -> (our path inside the layer, (hf->ours, ours->hf))."""
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = (lambda w: w.T, lambda w: w.T)
    ident = (lambda w: w, lambda w: w)

    def heads(n):  # [n*D, E] <-> [E, n, D]
        return (lambda w: w.T.reshape(E, n, D), lambda w: w.reshape(E, n * D).T)

    return {
        "self_attn.q_proj.weight": (("attn", "q"), heads(H)),
        "self_attn.k_proj.weight": (("attn", "k"), heads(K)),
        "self_attn.v_proj.weight": (("attn", "v"), heads(K)),
        "self_attn.o_proj.weight": (("attn", "o"), (lambda w: w.T.reshape(H, D, E), lambda w: w.reshape(H * D, E).T)),
        "mlp.gate_proj.weight": (("mlp", "gate"), t),
        "mlp.up_proj.weight": (("mlp", "up"), t),
        "mlp.down_proj.weight": (("mlp", "down"), t),
        "input_layernorm.weight": (("attn_norm", "scale"), ident),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), ident),
    }


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its shape."""
    E, F, H, K, D, V = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    per_layer = {
        "self_attn.q_proj.weight": (H * D, E),
        "self_attn.k_proj.weight": (K * D, E),
        "self_attn.v_proj.weight": (K * D, E),
        "self_attn.o_proj.weight": (E, H * D),
        "mlp.gate_proj.weight": (F, E),
        "mlp.up_proj.weight": (F, E),
        "mlp.down_proj.weight": (E, F),
        "input_layernorm.weight": (E,),
        "post_attention_layernorm.weight": (E,),
    }
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, E)
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def check_state(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ModelFormatError naming the first missing, unexpected or mis-shaped tensor."""
    want = expected_hf_shapes(cfg)
    ignorable = {k for k in shapes if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints still store the copy
    for name in sorted(want):
        if name not in shapes:
            raise ModelFormatError(f"missing tensor {name} (expected shape {want[name]})")
        if tuple(shapes[name]) != want[name]:
            raise ModelFormatError(f"tensor {name} has shape {tuple(shapes[name])}, expected {want[name]}")
    extra = sorted(set(shapes) - set(want) - ignorable)
    if extra:
        raise ModelFormatError(f"unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")


def params_from_hf_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> Params:
    """Our parameter tree (numpy, cfg.param_dtype) from an HF state dict; checked first."""
    check_state(cfg, {k: v.shape for k, v in state.items()})
    dt = jnp.dtype(cfg.param_dtype)  # numpy has bfloat16 through ml_dtypes: stored as asked, never upcast
    cast = lambda w: np.asarray(w, dtype=dt)
    layers = []
    for i in range(cfg.num_layers):
        layer: dict = {}
        for hf_name, (path, (to_ours, _)) in _layer_map(cfg).items():
            layer.setdefault(path[0], {})[path[1]] = cast(to_ours(state[f"model.layers.{i}.{hf_name}"]))
        layers.append(layer)
    params: Params = {
        "embed": cast(state["model.embed_tokens.weight"]),
        "final_norm": {"scale": cast(state["model.norm.weight"])},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = cast(state["lm_head.weight"]).T
    if cfg.scan_layers:
        params["layers"] = stack_layers(layers)
    else:
        params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    return params


def hf_state_from_params(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy) of our parameters; inverse of `params_from_hf_state`."""
    f32 = lambda x: np.asarray(x, dtype=np.float32)
    state = {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = f32(params["lm_head"]).T
    for i in range(cfg.num_layers):
        layer = params["layers"] if cfg.scan_layers else params[f"layer_{i}"]
        for hf_name, (path, (_, to_hf)) in _layer_map(cfg).items():
            w = f32(layer[path[0]][path[1]])
            state[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(to_hf(w[i] if cfg.scan_layers else w))
    return state


# ---------------------------------------------------------------- files


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    from safetensors.numpy import load_file

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, np.ndarray] = {}
    for name in files:
        path = model_dir / name
        if not path.exists():
            raise ModelFormatError(f"{path}: missing weights file (expected model.safetensors or an index)")
        try:
            state.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for truncation/corruption
            raise ModelFormatError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    return state


def load_hf_dir(model_dir: str | Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """(config, params) from an HF Llama-family directory."""
    cfg = read_hf_config(model_dir, **overrides)
    return cfg, params_from_hf_state(cfg, read_safetensors(Path(model_dir)))


def read_hf_config(model_dir: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of an HF Llama-family directory's config.json (no tensor is read)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise ModelFormatError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    return config_from_hf(json.loads(cfg_path.read_text()), **overrides)


def save_hf_dir(cfg: ModelConfig, params: Params, tokenizer, out_dir: str | Path, force: bool = False) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files.

    Built in a hidden sibling directory and swapped into place (`anjax.io.outputs.replace_dir`),
    so `out_dir` is either the previous directory or the complete new one. An existing
    `out_dir` is replaced only when anjax wrote it; `force` moves any other one aside.
    """
    from safetensors.numpy import save_file

    out_dir = outputs.check_replaceable(out_dir, force)
    tmp = outputs.make_temp_dir(out_dir)
    try:
        state = hf_state_from_params(cfg, params)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_from(cfg), indent=2))
        gen = {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
            "do_sample": False,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        outputs.replace_dir(tmp, out_dir, [p.name for p in tmp.iterdir()], force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
