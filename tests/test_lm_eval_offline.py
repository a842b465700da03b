"""The README's adapter command works offline: the harness's own task YAMLs read the local benchmark data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import slow_case

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.eval import tasks
from anjax.io import hf

lm_eval = pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(
    not (tasks.DEFAULT_DATA_DIR / "hf_datasets").is_dir(),
    reason="local benchmark data missing (scripts/fetch_eval_data.sh)",
)


@needs_data
@pytest.mark.parametrize("name", [slow_case("arc_easy"), "winogrande"])  # the README command reads arc_easy
def test_harness_task_reads_the_local_documents(tmp_path, monkeypatch, name):
    """Our YAML wins over the built-in one of the same name; its documents are anjax.eval.tasks' local ones."""
    import lm_eval.tasks

    from anjax.eval.lm_eval_tasks import write_local_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    harness_name = tasks.get_task(name).harness_name
    manager = lm_eval.tasks.TaskManager(include_path=str(write_local_tasks(tmp_path)))
    task = manager.load(harness_name)["tasks"][harness_name]
    docs = list(task.eval_docs)
    local = tasks.load_task(name)
    assert len(docs) == len(local) and [dict(d) for d in docs[:5]] == [dict(d.fields) for d in local[:5]]


@needs_data
@pytest.mark.slow  # the harness CLI in a subprocess; in-process: test_harness_task_reads_the_local_documents
def test_readme_command_offline(tmp_path):
    """`python -m anjax.lm_eval_adapter --model anjax ... --tasks arc_easy` with no network."""
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = tiny_config(vocab_size=len(tok))
    model = hf.save_hf_dir(cfg, init_params(cfg, jax.random.key(0)), tok, tmp_path / "model")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anjax.lm_eval_adapter",
            "--model",
            "anjax",
            "--model_args",
            f"model={model},cache=anchor,anchor_mode=ep",
            "--tasks",
            "arc_easy",
            "--limit",
            "3",
            "--output_path",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|arc_easy|" in proc.stdout.replace(" ", "")
    (result,) = (tmp_path / "results").rglob("results_*.json")
    assert json.loads(result.read_text())["n-samples"]["arc_easy"]["effective"] == 3
