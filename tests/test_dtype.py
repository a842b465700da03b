"""--dtype: the loaders return the dtype asked for (never upcast), and bf16 generation is the bf16 full forward's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import slow_case
from test_engine import EP_IDS, RUNTIME, ep_row, reference_logits
from test_gguf_import import write_tiny_gguf

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.inference.engine import Engine, EngineConfig
from anjax.io.gguf_import import read_gguf
from anjax.io.hf import save_hf_dir
from anjax.io.loading import load_model

BF16 = jnp.dtype("bfloat16")


def test_loaders_return_the_dtype_asked_for(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    save_hf_dir(cfg, params, None, tmp_path / "hf")
    loaded_cfg, loaded, _ = load_model(tmp_path / "hf", "bfloat16", scan_layers=True)
    assert (loaded_cfg.dtype, loaded_cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {BF16}
    np.testing.assert_array_equal(loaded["embed"], np.asarray(params["embed"]).astype(BF16))
    assert {x.dtype for x in jax.tree.leaves(load_model(tmp_path / "hf")[1])} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(load_model(tmp_path / "hf", param_dtype="bfloat16")[1])} == {BF16}
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        load_model(tmp_path / "hf", "float16")
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")  # cast tensor by tensor as read
    _, state = read_gguf(tmp_path / "tiny.gguf", "bfloat16")
    for name, w in expected.items():
        assert state[name].dtype == BF16
        np.testing.assert_array_equal(state[name], w.astype(BF16), err_msg=name)


@pytest.mark.parametrize("cache", ["anchor", slow_case("full")])
def test_bf16_greedy_ids_equal_the_bf16_full_forward(cache):
    """The engine holds bf16 weights and a bf16 cache; its greedy ids are the argmax of one bf16 forward
    pass under the mask (float32 logits), compaction during decode included."""
    cfg = tiny_config(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!"), dtype="bfloat16")
    cfg = cfg.replace(param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(3))
    eng = Engine(cfg, params, config=EngineConfig(cache=cache, chunk_size=4), runtime=RUNTIME)
    assert {x.dtype for x in jax.tree.leaves(eng.params)} == {BF16}
    rng = np.random.default_rng(7)
    prompts = [ep_row(rng, 13), ep_row(rng, 6)]
    pre = eng.prefill(prompts, 2, 4, 64)
    assert pre.state.cache.keys[0].dtype == BF16
    decoded_anchors = 0
    for out in eng.generate(prompts, max_new_tokens=10, stop_ids=()):
        new = out.ids[len(out.prompt_ids) :]
        decoded_anchors += sum(t in EP_IDS for t in new[:-1])
        logits = reference_logits(cfg, params, out.ids[:-1], EP_IDS, full=cache == "full")
        assert logits.dtype == np.float32
        assert new == np.argmax(logits, -1)[len(out.prompt_ids) - 1 :].tolist()
    assert cache == "full" or decoded_anchors > 0  # a sentence closed during decode
