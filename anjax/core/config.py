"""Model configuration: one frozen, hashable dataclass shared by every module.

The anchor scheme (`anchor_mode`, `anchor_tokens`, `anchor_ids`, `add_bos`,
`max_sentence_tokens`, `sentence_splitter`, `final_sentence`, `anchor_window`, `anchor_rule`; see
`anjax.text.anchors.AnchorScheme`) lives here so that it travels with checkpoints and
HF exports: a reloaded model is still the same AnLLM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

ANCHOR_MODES = ("none", "ep", "ac")
# model.attention: the Pallas kernel is opt-in ("kernel": the platform's) until a device check passes on hardware;
# "kernel:gpu" / "kernel:tpu" name one whatever the platform (AOT for a target), "-interpret" runs it in Pallas
# interpret mode (CPU rehearsal)
ATTENTION_CHOICES = ("dense", "sparse", "auto", "kernel") + tuple(
    f"kernel:{k}{m}" for k in ("gpu", "tpu") for m in ("", "-interpret")
)
ANCHOR_RULES = ("ansan", "sepllm")  # anjax.core.mask.attention_allowed: may an anchor see earlier anchors (sepllm)
AC_TOKEN = "<AC>"
# The ModelConfig fields that store the anchor scheme (anjax.text.anchors.AnchorScheme); the HF export's "anjax" block.
ANCHOR_SCHEME_FIELDS = (
    "anchor_mode",
    "anchor_tokens",
    "anchor_ids",
    "add_bos",
    "max_sentence_tokens",
    "sentence_splitter",
    "final_sentence",
    "anchor_window",
    "anchor_rule",
)
SENTENCE_SPLITTERS = ("pysbd-en", "sentencex-en")  # anjax.text.splitters
FINAL_SENTENCE_RULES = ("terminated",)  # anjax.text.encode.ends_sentence


DTYPES = ("float32", "bfloat16")  # inference --dtype: parameters and compute (softmax, norms, logits stay float32)


def parse_mesh(text: str) -> dict[str, int]:
    """Inference `--mesh` text `data=D,tensor=T` -> {"data": D, "tensor": T}; either may be left out (1). Parts
    may also be joined by ":" (`data=2:tensor=2`), the form that fits inside lm-eval's comma-separated model_args.
    ValueError on anything else."""
    sizes = {"data": 1, "tensor": 1}
    for part in text.replace(":", ",").split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"expected data=D,tensor=T with positive integers, got {text!r}")
        sizes[name.strip()] = int(value)
    return sizes


def check_ranges(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """ValueError naming `prefix.field` for the first of `values` outside its interval in `cls.RANGES`.

    RANGES maps a numeric field to an interval "[low, high)" ("(" / ")" open, "inf" allowed); None passes,
    NaN never does.
    """
    for name, interval in cls.RANGES.items():
        value = values.get(name)
        if value is None:
            continue
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):  # NaN fails both
            want = f"{'>=' if interval[0] == '[' else '>'} {low:g}" if math.isinf(high) else f"in {interval}"
            raise ValueError(f"{prefix}{name} must be {want}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder hyper-parameters (HF names in comments)."""

    RANGES: ClassVar[dict[str, str]] = {  # checked by check_ranges
        **dict.fromkeys(
            ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"),
            "[1, inf)",
        ),
        **dict.fromkeys(("max_position_embeddings",), "[1, inf)"),
        **dict.fromkeys(("rope_theta", "rope_scaling_factor", "rms_norm_eps"), "(0, inf)"),
    }

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30  # num_hidden_layers
    num_heads: int = 9  # num_attention_heads
    num_kv_heads: int = 3  # num_key_value_heads
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_scaling_factor: float = 1.0  # rope_scaling {"rope_type": "linear", "factor": f}
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # tie_word_embeddings
    max_position_embeddings: int = 8192
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    scan_layers: bool = False  # nn.scan over the layer stack
    fused_projections: bool = False  # q/k/v as one "qkv" [E, H + 2K, D], gate/up as one "gate_up" [E, 2F] kernel
    remat: str = "none"  # none | full | dots (activation checkpointing policy)
    # dense | sparse (anjax.core.sparse_attention, tiled pure JAX) | auto (sparse for long inputs) | kernel (sparse
    # with the platform's Pallas kernel; kernel:gpu | kernel:tpu name one, e.g. for AOT; anjax.core.flash_kernels)
    attention: str = "auto"
    anchor_mode: str = "none"  # none | ep (punctuation anchors) | ac (<AC> token)
    anchor_tokens: tuple[str, ...] = ()  # token strings that are anchors
    anchor_ids: tuple[int, ...] = ()  # their ids in the vocabulary (as they occur in running text)
    add_bos: bool | None = None  # texts start with BOS (data.add_bos); None: not recorded, the tokenizer's way
    max_sentence_tokens: int | None = None  # AC: an <AC> after every N tokens of a sentence (BOS not counted)
    sentence_splitter: str = "pysbd-en"
    final_sentence: str = "terminated"  # a prompt's last sentence is closed iff it ends one
    anchor_window: int = 0  # every query also sees the keys of its last n positions (SepLLM's neighbours); 0: the paper
    anchor_rule: str = "ansan"  # ansan (an anchor never sees earlier anchors) | sepllm (every token sees them)

    def __post_init__(self):
        check_ranges(ModelConfig, vars(self), "")
        if self.anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor_mode must be one of {ANCHOR_MODES}, got {self.anchor_mode!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none|full|dots, got {self.remat!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {'|'.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if len(self.anchor_tokens) != len(self.anchor_ids):
            raise ValueError("anchor_tokens and anchor_ids must have the same length")
        if self.sentence_splitter not in SENTENCE_SPLITTERS or self.final_sentence not in FINAL_SENTENCE_RULES:
            raise ValueError(
                f"unknown anchoring: sentence_splitter={self.sentence_splitter!r} (known "
                f"{SENTENCE_SPLITTERS}), final_sentence={self.final_sentence!r} (known {FINAL_SENTENCE_RULES})"
            )
        if self.anchor_window < 0 or self.anchor_rule not in ANCHOR_RULES:
            raise ValueError(
                f"anchor_window must be >= 0 and anchor_rule one of {ANCHOR_RULES}, "
                f"got {self.anchor_window} and {self.anchor_rule!r}"
            )
        if self.max_sentence_tokens is not None and (self.max_sentence_tokens < 1 or self.anchor_mode != "ac"):
            raise ValueError(f"max_sentence_tokens={self.max_sentence_tokens} needs anchor mode 'ac' and a value >= 1")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_tokens"] = list(self.anchor_tokens)
        d["anchor_ids"] = list(self.anchor_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("anchor_tokens", "anchor_ids"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def tiny_config(**changes: Any) -> ModelConfig:
    """The test-sized model: 2 layers, width 64, GQA 4/2 heads."""
    base = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return base.replace(**changes)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (every weight but the embedding lookup and norms)."""
    E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return cfg.num_layers * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + E * cfg.vocab_size


def num_params(cfg: ModelConfig) -> int:
    """Every parameter of the model (norms and an untied output head included)."""
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return matmul_params(cfg) + norms + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def kv_bytes(cfg: ModelConfig, batch: int, slots: int) -> int:
    """Bytes of the keys and values of every layer for `batch` rows of `slots` slots, in the compute dtype."""
    import jax.numpy as jnp  # this module stays importable without jax

    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * slots * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
