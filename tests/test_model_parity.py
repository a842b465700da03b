"""Golden tests against transformers' LlamaForCausalLM (torch, CPU, fp32): layer, logits, round trip."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import slow_case

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from anjax.core.mask import token_metadata
from anjax.core.model import Llama, RMSNorm
from anjax.core.params import fuse_projections
from anjax.io import hf

CASES = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "rope_linear": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rope_theta=500.0,
    ),
}


def make_hf_model(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        **kw,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms so that a missing norm scale would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def anjax_logits(cfg, params, ids):
    ids = jnp.asarray(ids)
    meta = token_metadata(ids, jnp.ones_like(ids, bool))
    logits, _ = Llama(cfg).apply({"params": params}, ids, meta, full_attention=True)
    return np.asarray(logits)


@pytest.mark.parametrize(  # the fast tier scans one case's layers
    "scan,case",
    [(False, case) for case in sorted(CASES)]
    + [(True, c) if c == "gqa_tied" else slow_case(True, c) for c in sorted(CASES)],
)
def test_logits_match_transformers(tmp_path, case, scan):
    model = make_hf_model(tmp_path, **CASES[case])
    cfg, params = hf.load_hf_dir(tmp_path, scan_layers=scan)
    ids = np.random.default_rng(0).integers(0, 256, (2, 40))
    diff = np.abs(anjax_logits(cfg, params, ids) - hf_logits(model, ids)).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("scan", [False, True])
def test_fused_projections_match_transformers(tmp_path, scan):
    """q/k/v and gate/up as one kernel each (`fuse_projections`, what the engine decodes with on CPU): the same
    logits, on grouped-query heads (q, k, v of different widths)."""
    model = make_hf_model(tmp_path, **CASES["rope_linear"])
    cfg, params = fuse_projections(*hf.load_hf_dir(tmp_path, scan_layers=scan))
    layer = params["layers" if scan else "layer_0"]
    assert cfg.fused_projections and set(layer["attn"]) == {"qkv", "o"} and set(layer["mlp"]) == {"gate_up", "down"}
    ids = np.random.default_rng(2).integers(0, 256, (2, 40))
    diff = np.abs(anjax_logits(cfg, params, ids) - hf_logits(model, ids)).max()
    assert diff <= 1e-4, diff


def test_first_layer_matches_transformers(tmp_path):
    """Hidden state after layer 0 (layer-level golden test)."""
    model = make_hf_model(tmp_path, **CASES["gqa_tied"])
    cfg, params = hf.load_hf_dir(tmp_path)
    ids = np.random.default_rng(1).integers(0, 256, (1, 24))
    with torch.no_grad():
        want = model(torch.tensor(ids), output_hidden_states=True).hidden_states[1].numpy()
    one_layer = cfg.replace(num_layers=1)
    sub = {k: v for k, v in params.items() if k in ("embed", "layer_0")}
    captured = {}
    jids = jnp.asarray(ids)
    meta = token_metadata(jids, jnp.ones_like(jids, bool))

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, RMSNorm) and context.module.name == "final_norm":
            captured["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        Llama(one_layer).apply({"params": dict(sub, final_norm=params["final_norm"])}, jids, meta)
    assert np.abs(np.asarray(captured["x"]) - want).max() <= 1e-4


def test_export_roundtrip(tmp_path):
    model = make_hf_model(tmp_path / "src", **CASES["mha_untied"])
    cfg, params = hf.load_hf_dir(tmp_path / "src")
    hf.save_hf_dir(cfg, params, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, 256, (1, 32))
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids)).max() <= 1e-5
    cfg2, params2 = hf.load_hf_dir(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_shape_mismatch_names_tensor(tmp_path):
    make_hf_model(tmp_path, **CASES["gqa_tied"])
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(hf.ModelFormatError, match=r"model.layers.0.mlp.down_proj.weight has shape \(64, 128\)"):
        hf.load_hf_dir(tmp_path)
