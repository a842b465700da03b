"""A run directory's plain files (no orbax): what identifies a run, its model config, its tokenizer.

RUN/config.yaml          the run config it started with (IDENTITY_KEYS are checked on resume)
RUN/model_config.json    anjax ModelConfig (vocabulary, anchor settings) of the checkpoints
RUN/tokenizer/           the tokenizer (with `<AC>` for AC runs)
RUN/checkpoints/<step>/  orbax checkpoints (`anjax.io.checkpoint`)

RUN is a local directory or a `gs://bucket/...` prefix (`storage_path`): etils.epath (gcsfs) serves the
plain files, orbax/tensorstore the checkpoints; the tokenizer goes through a local temporary directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from etils import epath

from anjax.core.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used; the message names it and says why."""


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def storage_path(path: str | os.PathLike, what: str) -> Path | epath.Path:
    """`path` as a local Path, or as an epath.Path for `gs://bucket/...`.

    Any other `scheme://`, or gs:// without the gcsfs package, raises ValueError (one line naming `what`):
    a URL is never turned into a local folder such as ./gs:/bucket/run.
    """
    text = os.fspath(path)
    if isinstance(path, epath.Path) or not (url := _URL.match(text)):
        return path if isinstance(path, epath.Path) else Path(text).expanduser()
    if url.group(1) != "gs":
        raise ValueError(f"{what}={text}: {url.group(1)}:// cannot be served; use a local path or gs://bucket/...")
    if importlib.util.find_spec("gcsfs") is None:
        raise ValueError(f"{what}={text}: gs:// needs the gcsfs package (pip install gcsfs==2026.8.2)")
    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(path)))


def upload_dir(local: Path, dest: Path | epath.Path) -> None:
    """Copy the files of the flat local directory `local` into `dest` (local or gs://)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in local.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model_config.json").is_file() and (path / "checkpoints").is_dir()


# Run-config fields that fix the parameter tree, the vocabulary and the anchor scheme: a run
# directory's checkpoints are resumed only by a config that agrees on all of them. A field that older
# run directories lack counts as its default there (LATER_KEYS).
IDENTITY_KEYS = (
    ("model", "path"),
    ("model", "from_scratch"),
    ("model", "arch"),
    ("model", "scan_layers"),
    ("anchors", "mode"),
    ("anchors", "tokens"),
    ("data", "add_bos"),
    ("data", "max_sentence_tokens"),
    ("anchors", "window"),
    ("anchors", "rule"),
)
LATER_KEYS = {("anchors", "window"): 0, ("anchors", "rule"): "ansan"}


def save_run_files(run_dir: Path | epath.Path, run_config: dict, cfg: ModelConfig, tokenizer) -> None:
    """config.yaml, model_config.json and tokenizer/ of a fresh run (call on one process)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    (run_dir / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        upload_dir(Path(tmp), run_dir / "tokenizer")


def check_resumable(run_dir: Path | epath.Path, run_config: dict) -> None:
    """Raise CheckpointError unless RUN/config.yaml agrees with `run_config` on every IDENTITY_KEYS field."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so the checkpoints in {run_dir} cannot be matched to this config; use another run.dir"
        )
    stored = yaml.safe_load(path.read_text()) or {}
    for section, key in IDENTITY_KEYS:
        was, now = stored.get(section, {}).get(key, LATER_KEYS.get((section, key))), run_config[section][key]
        if was != now:
            raise CheckpointError(
                f"the checkpoints in {run_dir} were trained with {section}.{key}={was!r}, this "
                f"config has {now!r}: use another run.dir (checkpoints are never overwritten)"
            )


def load_model_config(run_dir: str | os.PathLike, **overrides: Any) -> ModelConfig:
    path = storage_path(run_dir, "run directory") / "model_config.json"
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())).replace(**overrides)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e})") from None


def inference_config(run_dir: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig a run is loaded for inference with (the same as loading RUN/export): the training-time
    settings (dtype, param_dtype, scan_layers, remat, attention) take ModelConfig's defaults unless given in
    `overrides`."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.name in ("dtype", "param_dtype", "scan_layers", "remat", "attention")
    }
    return load_model_config(run_dir).replace(**{**defaults, **overrides})


def tokenizer(run_dir: str | os.PathLike):
    """The tokenizer saved in RUN/tokenizer/ (with `<AC>` for AC runs)."""
    from transformers import AutoTokenizer  # slow import, only when a run directory is loaded

    path = storage_path(run_dir, "run directory") / "tokenizer"
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (the run directory has no tokenizer)")
    if not is_remote(path):
        return AutoTokenizer.from_pretrained(str(path))
    tmp = Path(tempfile.mkdtemp())
    try:
        for f in path.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
        return AutoTokenizer.from_pretrained(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
