"""Ahead-of-time compilation for a TPU topology (the anjax.aot package) through libtpu, in .venv-tpu
(scripts/setup_tpu_aot.sh, run by setup.sh): the tiny config's real train step compiled for v5e:2x2
with a 2x2 (fsdp, tensor) mesh."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import jax
import pytest
from cli_checks import assert_one_line_error

from anjax.aot import shapes, target
from anjax.core.model import init_params
from anjax.train import run_config

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
TINY_2X2 = [
    "--config",
    "configs/tiny.yaml",
    "--topology",
    "v5e:2x2",
    "--set",
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "anchors.mode=ep",
]

pytestmark = pytest.mark.skipif(not TPU_PYTHON.exists(), reason="no .venv-tpu: run `bash scripts/setup_tpu_aot.sh`")


def run_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TPU_PYTHON), "-m", "anjax.aot", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_tiny_train_step_argument_bytes_are_the_sharded_params_and_adam_state():
    proc = run_aot(*TINY_2X2, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    train = report["steps"][0]
    assert train["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and train["fits"] is True
    # The vocabulary (49152 in EP mode) and every other sharded dimension divide 2, so each device holds a
    # quarter of every weight matrix; params + Adam's two moments are 3 fp32 copies.
    cfg = shapes.model_config(run_config.load("configs/tiny.yaml", ["anchors.mode=ep"]))
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    expected = 3 * 4 * n_params / 4
    assert abs(train["argument_bytes"] - expected) / expected < 0.10, (train["argument_bytes"], expected)
    assert train["alias_bytes"] >= 0.9 * expected  # the donated state is updated in place
    assert train["total_bytes"] < train["hbm_bytes"] == 16 * 2**30
    tokens = 8 * 64  # data.batch_size x data.seq_len
    assert train["model_flops"] == pytest.approx(3 * shapes.forward_flops(cfg, tokens, 64) / 4)


def test_unknown_topology_is_one_line():
    assert_one_line_error(run_aot("--config", "configs/tiny.yaml", "--topology", "v9:2x2"), "unknown topology 'v9:2x2'")


def test_mesh_that_does_not_divide_the_devices_is_one_line():
    proc = run_aot(
        "--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--set", "mesh.data=1", "mesh.fsdp=3", "mesh.tensor=1"
    )
    assert_one_line_error(proc, "mesh data x fsdp x tensor = [1, 3, 1]", "but there are 4")


def test_attention_kernel_is_bound_to_the_target_platform():
    """`attention=kernel` becomes the target's kernel (the host that compiles is a CPU); other choices stay."""
    cfg = shapes.MODEL_SHAPES["smollm2-135m"]
    tpu, gpu = (
        target.Target(name, platform, (), 0, 0.0, 0.0) for name, platform in (("v5e:2x2", "tpu"), ("h100:1", "gpu"))
    )
    assert target.target_attention(cfg.replace(attention="kernel"), tpu).attention == "kernel:tpu"
    assert target.target_attention(cfg.replace(attention="kernel"), gpu).attention == "kernel:gpu"
    assert target.target_attention(cfg.replace(attention="sparse"), gpu).attention == "sparse"
    assert "Mosaic" in target.attention_path(cfg.replace(attention="kernel:tpu"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "topology,mesh,attention,calls",
    [
        ("v5e:2x2", ("1", "2", "2"), "kernel", True),  # Mosaic, per device under shard_map (fsdp x tensor)
        ("v5e:2x2", ("1", "2", "2"), "sparse", False),  # the tiled path: XLA only
        ("h100:1", ("1", "1", "1"), "kernel", True),  # Triton
    ],
)
def test_kernel_compiles_for_the_target(topology, mesh, attention, calls):
    """The train step with `attention=kernel` compiles the target's Pallas kernels (forward, dK/dV, dQ)."""
    overrides = [f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)]
    overrides += ["anchors.mode=ep", f"model.attention={attention}", "data.seq_len=512"]
    proc = run_aot("--config", "configs/tiny.yaml", "--topology", topology, "--set", *overrides, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    train = report["steps"][0]
    assert train["fits"] is True
    assert (train["pallas_kernel_calls"] >= 3 * 2) == calls and (train["pallas_kernel_calls"] == 0) != calls  # 2 layers
    kind = {"v5e:2x2": "Mosaic TPU", "h100:1": "Triton GPU"}[topology]
    assert (kind in report["model"]["attention_path"]) == calls
