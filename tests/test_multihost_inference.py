"""Multi-host inference: infer.py in 2 local processes x 2 CPU devices joined by jax.distributed (gloo), over
the global mesh data=2,tensor=2, writes the same greedy ids as one process on one device (ragged prompts,
anchor cache, sentences closed while decoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from cli_checks import assert_one_line_error
from test_multihost import free_port

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.io import hf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sat on the mat. Did the dog see it? It did", "One. Two", "It rained all day. We stayed in. Then"]


def infer(model: Path, out: Path, processes: int, devices: int, *extra: str) -> None:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # processes would write the same cache entries at once
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(processes))
    (out.parent / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cmd = [sys.executable, "infer.py", "--model", str(model), "--input", str(out.parent / "prompts.jsonl")]
    cmd += ["--output", str(out), "--cache", "anchor", "--anchor-mode", "ep", "--max-new-tokens", "12"]
    cmd += ["--batch-size", "4", "--chunk-size", "8", *extra]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, "\n".join(e[-3000:] for e in errs)


@pytest.mark.slow  # 3 processes
def test_two_processes_over_one_mesh_generate_one_devices_ids(tmp_path, tiny_tokenizer):
    cfg = tiny_config(vocab_size=len(tiny_tokenizer))
    model = hf.save_hf_dir(cfg, init_params(cfg, jax.random.key(3)), tiny_tokenizer, tmp_path / "tiny")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    infer(model, tmp_path / "one" / "out.jsonl", 1, 1)
    infer(model, tmp_path / "two" / "out.jsonl", 2, 2, "--mesh", "data=2,tensor=2")
    one, two = ([json.loads(x) for x in (tmp_path / d / "out.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [r["ids"] for r in two] == [r["ids"] for r in one] and len(one) == len(PROMPTS)
    assert any(r["stats"]["generated_tokens"] for r in one)


def test_the_server_refuses_a_multi_process_run(monkeypatch, capsys):
    from test_faults import run_main

    from anjax.cli import serve

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    assert_one_line_error(run_main(serve.main, [], capsys), "runs in one process", "JAX_COORDINATOR_ADDRESS")
