"""scripts/device_check.sh --dry-run: every stage of the device check at tiny sizes on the CPU (the kernel in
Pallas interpret mode), each correctness check asserting, the JSON result complete."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.heavy
def test_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET": "1500", "PY": str(ROOT / ".venv" / "bin" / "python")}
    env["PYTHONPATH"] = str(ROOT)  # anjax, where the venv lacks its editable install
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--dry-run", "--stage1", "1200"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    names = [c["name"] for c in result["checks"]]
    assert names == [
        "kernel_fp32",
        "kernel_bf16",
        "engine_exact",
        "train_3_steps",
        "prefill_train_256",
        "decode_b1",
        "decode_b2",
    ]
    assert result["passed"] and result["kernel"] == "kernel:gpu-interpret"
    assert all(c["status"] == "pass" for c in result["checks"] if c["stage"] == 1)
    train = next(c for c in result["checks"] if c["name"] == "train_3_steps")
    assert train["kernel"] == pytest.approx(train["dense"], rel=1e-4)
    decode = next(c for c in result["checks"] if c["name"] == "decode_b2")
    assert decode["anchor_cache_slots"] < decode["full_cache_slots"]
