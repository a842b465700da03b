"""Bad model inputs: one line on stderr naming the problem, exit code 2, no traceback."""

import json
import subprocess
import sys

import jax
import pytest
from cli_checks import assert_one_line_error

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.io import hf

pytestmark = pytest.mark.slow  # python -m anjax.export in subprocesses


def run_export(model, out):
    return subprocess.run(
        [sys.executable, "-m", "anjax.export", "--model", str(model), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("tiny") / "model"
    hf.save_hf_dir(cfg, init_params(cfg, jax.random.key(0)), None, path)
    return path


def test_missing_path(tmp_path):
    assert_one_line_error(run_export(tmp_path / "nope", tmp_path / "out"), "no such file or directory")


def test_directory_without_config(tmp_path):
    assert_one_line_error(run_export(tmp_path, tmp_path / "out"), "no config.json")


def test_non_llama_architecture(tmp_path, tiny_hf_dir):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    conf = json.loads((tiny_hf_dir / "config.json").read_text())
    conf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (bad / "config.json").write_text(json.dumps(conf))
    assert_one_line_error(run_export(bad, tmp_path / "out"), "not a Llama-family model", "gpt2")


def test_truncated_safetensors(tmp_path, tiny_hf_dir):
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_export(bad, tmp_path / "out")
    assert_one_line_error(proc, "model.safetensors", "cannot read safetensors")
    assert not (tmp_path / "out").exists()


def test_export_of_valid_model_works(tmp_path, tiny_hf_dir):
    proc = run_export(tiny_hf_dir, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
