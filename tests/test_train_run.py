"""train.py end to end (subprocesses, tiny config): resume after kill -9, SIGTERM, NaN, bad checkpoints,
bad data, and a short version of the default SmolLM2 config with its Hugging Face export."""

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # train.py in subprocesses

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.seq_len=32", "eval.batches=1", "eval.every=8", "checkpoint.every=4", "train.steps=24"]


def command(run_dir, *overrides, config="tiny.yaml"):
    return [sys.executable, "train.py", "--config", f"configs/{config}", "--set", f"run.dir={run_dir}", *overrides]


def run(run_dir, *overrides, config="tiny.yaml", timeout=600):
    return subprocess.run(
        command(run_dir, *overrides, config=config), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def start(run_dir, *overrides):
    return subprocess.Popen(
        command(run_dir, *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc, run_dir, step, timeout=300):
    """Poll metrics.jsonl until `step` is logged; the process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step and "loss" in r for r in records(run_dir)):
            assert proc.poll() is None, "the run finished before it could be interrupted"
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def losses(recs):
    return [{k: r.get(k) for k in ("step", "loss", "val_loss_full", "val_loss_anchor")} for r in recs]


def tree_digest(path):
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The train.py subprocesses share a persistent XLA compilation cache: reruns of a config skip compiling."""
    saved = dict(os.environ)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jit-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run, started in the background; call the fixture's value to wait for it."""
    run_dir = tmp_path_factory.mktemp("run") / "full"
    proc = start(run_dir, *FAST)

    @functools.cache
    def finished():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        return run_dir

    yield finished
    if proc.poll() is None:
        proc.kill()


def test_kill9_resume_logs_the_same_losses(finished_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start(run_dir, *FAST)
    wait_for_step(proc, run_dir, 14)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = max(r["step"] for r in records(run_dir))
    out = run(run_dir, *FAST)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = losses(records(run_dir)), losses(records(finished_run()))
    assert [r["step"] for r in got] == [r["step"] for r in want] and resumed_from < 24
    assert got == want  # bit-identical: same data order, same restored params, optimizer state and RNG
    assert (run_dir / "export" / "model.safetensors").exists() and (run_dir / "loss.png").exists()
    assert any((run_dir / "tb").iterdir())


@pytest.mark.heavy
def test_distill_run_resumes_with_the_starting_model_as_teacher(finished_run, tmp_path):
    """A distillation run from a pretrained model (the finished run's export) killed and resumed logs the same
    losses and KL terms as an uninterrupted one: the teacher is rebuilt from model.path, not the resumed student."""
    distill = [
        *FAST,
        f"model.path={finished_run() / 'export'}",
        "model.from_scratch=false",
        "train.distill_weight=1.0",
        "train.steps=16",
    ]
    whole = start(tmp_path / "whole", *distill)
    run_dir = tmp_path / "killed"
    proc = start(run_dir, *distill)
    wait_for_step(proc, run_dir, 9)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert max(r["step"] for r in records(run_dir)) < 16
    out = run(run_dir, *distill)
    assert out.returncode == 0, out.stderr[-3000:]
    assert whole.wait(timeout=600) == 0, whole.communicate()[1][-3000:]
    keys = ("step", "loss", "kl", "val_loss_full", "val_loss_anchor", "val_kl")
    got, want = ([{k: r.get(k) for k in keys} for r in records(d)] for d in (run_dir, tmp_path / "whole"))
    assert got == want and all(r["kl"] > 0 for r in want if r["loss"] is not None) and want[0]["val_kl"] > 0


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    run_dir = tmp_path / "term"
    proc = start(run_dir, "data.seq_len=32", "train.steps=100000", "checkpoint.every=100000", "eval.every=0")
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last = max(r["step"] for r in records(run_dir))
    assert f"SIGTERM at step {last}: checkpoint saved" in stdout
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [last]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    out = run(
        run_dir,
        "data.seq_len=32",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.clip_norm=null",
        "checkpoint.every=1",
        "checkpoint.async_save=false",
        "eval.every=0",
        "train.steps=20",
    )
    assert out.returncode == 1, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()[-1]
    assert "at step" in message and "is intact" in message, message
    bad_step = int(message.split("at step ")[1].split(":")[0])
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and kept[-1] == bad_step - 1
    from anjax.io.checkpoint import load_for_inference

    _, params, _ = load_for_inference(run_dir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_damaged_or_incompatible_checkpoint_is_reported_not_overwritten(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run(), run_dir)
    data_file = max((run_dir / "checkpoints" / "24" / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(data_file, "r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 256)
    before = tree_digest(run_dir / "checkpoints")
    out = run(run_dir, *FAST, "train.steps=28")
    assert out.returncode == 2
    assert "checkpoints/24" in out.stderr and "damaged" in out.stderr, out.stderr[-2000:]
    assert tree_digest(run_dir / "checkpoints") == before

    out = run(run_dir, *FAST, "train.steps=28", "model.arch.num_layers=3")
    assert out.returncode == 2 and "model.arch" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
    "data, message",
    [
        ("/nonexistent/corpus.jsonl", "no such file"),
        ("EMPTY", "no non-empty documents"),
    ],
)
def test_missing_or_empty_dataset(tmp_path, data, message):
    if data == "EMPTY":
        data = tmp_path / "empty.jsonl"
        data.write_text('{"text": ""}\n{"text": "   "}\n')
    out = run(tmp_path / "r", f"data.path={data}", "data.split=train", "data.eval_split=null")
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()[-1]) < 400


@pytest.mark.heavy
def test_default_config_short_run_exports_for_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "smol"
    out = run(
        run_dir,
        "train.steps=2",
        "data.seq_len=32",
        "data.batch_size=2",
        "eval.every=2",
        "eval.batches=1",
        "checkpoint.every=2",
        config="smollm2-135m-ac.yaml",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "2").is_dir()
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [0, 1, 2] and "val_loss_anchor" in recs[-1]
    export = run_dir / "export"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer) == 49153
    ids = tokenizer("One. Two.<AC> Three", return_tensors="pt").input_ids
    assert tokenizer.convert_tokens_to_ids("<AC>") in ids[0].tolist()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    cfg = json.loads((export / "config.json").read_text())["anjax"]
    assert cfg["anchor_mode"] == "ac" and cfg["anchor_tokens"] == ["<AC>"]

    from anjax.io.loading import load_model  # infer.py and the evaluation take the run dir or its export

    (cfg_run, params_run, _), (cfg_export, params_export, _) = load_model(run_dir), load_model(export)
    assert cfg_run == cfg_export and cfg_run.anchor_ids == (49152,)
    for a, b in zip(jax.tree.leaves(params_run), jax.tree.leaves(params_export), strict=True):
        np.testing.assert_array_equal(a, b)
