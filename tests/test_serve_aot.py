"""Serving AOT (`anjax.aot.serve`): the engine's prefill and decode and the server's step compiled for a v5e:2x2
(data 2, tensor 2) mesh in bf16 through libtpu (.venv-tpu): each device holds half the weights and a quarter of
the cache."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import jax
import pytest
from cli_checks import assert_one_line_error

from anjax.aot import shapes
from anjax.core.model import init_params
from anjax.train import run_config

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
TINY = ["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--set", "anchors.mode=ep", "--dtype", "bfloat16"]
SIZES = ["--batch", "4", "--capacity", "256", "--chunk", "64", "--new-tokens", "8"]

pytestmark = [
    pytest.mark.skipif(not TPU_PYTHON.exists(), reason="no .venv-tpu: run `bash scripts/setup_tpu_aot.sh`"),
    pytest.mark.slow,  # libtpu compiles in a subprocess
]


def run_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TPU_PYTHON), "-m", "anjax.aot", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_prefill_decode_and_serve_argument_bytes_are_the_split_weights_and_cache():
    steps = ["--step", "prefill", "--step", "decode", "--step", "serve"]
    proc = run_aot(*TINY, *SIZES, *steps, "--mesh", "data=2,tensor=2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"]["inference_dtype"] == "bfloat16"
    cfg = shapes.model_config(run_config.load("configs/tiny.yaml", ["anchors.mode=ep"]))
    n_params = sum(
        math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    )
    assert report["provenance"]["command"].startswith("python -m anjax.aot --config configs/tiny.yaml")
    for step, slots in zip(report["steps"], (256 + 64, 256, 256 + 1), strict=True):
        assert step["mesh"] == {"data": 2, "tensor": 2} and step["fits"] and step["rows_per_device"] == 2
        weights = 2 * n_params / 2  # bf16, every matrix split over tensor 2 (the norms are small)
        cache = 2 * cfg.num_layers * 4 * cfg.num_kv_heads * slots * cfg.head_dim * 2 / 4  # bf16 over 4 devices
        assert step["argument_bytes_by_group"]["params"] == pytest.approx(weights, rel=0.02)
        meta = 2 * slots * 32  # the 2 rows' per-slot metadata (6 small fields), replicated over tensor
        assert cache <= step["argument_bytes_by_group"]["state"] < cache + meta
    assert report["steps"][2]["alias_bytes"] >= cache  # the server's slots are donated: updated in place


def test_a_tensor_size_that_does_not_divide_the_heads_is_one_line():
    assert_one_line_error(run_aot(*TINY, *SIZES, "--step", "decode", "--mesh", "tensor=4"), "must divide")
