"""Multi-host training: 2 local processes x 2 CPU devices joined by jax.distributed (gloo) against one
process with 4 devices. Every mesh trains on the same global batches (the per-step losses agree), a
checkpoint written by 2 processes resumes on 1 with the batches an uninterrupted run would have seen
(the mesh runs read a prepared corpus, `anjax.prepare`), and a SIGTERM to one process makes both save at
one step, exit 0 and resume bit-identically. One test: the launches (process start, jax.distributed,
compiling) are its cost, so the mesh runs and the uninterrupted run share one.

The `__main__` half is the worker: `python tests/test_multihost.py ROOT NAME...` runs train.py's whole run
(`anjax.train.loop.train`) for each named mesh of MESHES in ROOT/NAME, one after another in one process, on
the prepared corpus ROOT/corpus when there is one, but for the cut and long runs (the embedded corpus, which
process 0 prepares into the run directory while the other waits); the d2f2 run also exports (process 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# name -> (data, fsdp, tensor); "resumed" continues a copy of the 2-process d2f2 run on 1 process
# "cut" and "long" (LONG_STEPS, no validation or periodic checkpoint): a run a signal interrupts, one it does not
MESHES = {"d2f2": (2, 2, 1), "f4": (1, 4, 1), "t4": (1, 1, 4), "d2t2": (2, 1, 2), "d4": (4, 1, 1), "resumed": (4, 1, 1)}
MESHES["cut"] = MESHES["long"] = MESHES["d2f2"]
STEPS = 6
OVERRIDES = [
    "data.seq_len=32",
    f"train.steps={STEPS}",
    "eval.every=3",
    "eval.batches=1",
    "checkpoint.every=3",
    "checkpoint.export_hf=false",
    "log.every=1",
]
LONG_STEPS = 40
LONG = [*OVERRIDES, f"train.steps={LONG_STEPS}", f"checkpoint.every={LONG_STEPS}", "eval.every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def prepare_corpus(root: Path) -> None:
    """The tiny config's corpus (embedded, AC, SmolLM2's tokenizer) prepared into ROOT/corpus."""
    from anjax.io.loading import load_tokenizer
    from anjax.text.anchors import add_ac_token, make_scheme
    from anjax.train import prepare
    from anjax.train.data import DataConfig

    tokenizer = load_tokenizer(None)
    add_ac_token(tokenizer)
    splits = {"train": "train", "validation": "validation"}
    prepare.prepare(DataConfig(), tokenizer, make_scheme(tokenizer, "ac"), root / "corpus", splits, workers=1)


def launch(root: Path, names: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
    """`processes` workers, each with `devices` CPU devices, training the meshes `names` under `root`."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # processes would write the same cache entries at once
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(processes))
    cmd = [sys.executable, __file__, str(root), *names]
    return [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(err[-3000:] for _, err in outs)
    return outs


def history(run_dir: Path) -> dict[int, dict]:
    """{step: record} of RUN/metrics.jsonl."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def losses(run_dir: Path, first: int = 1, last: int = STEPS) -> list[float]:
    recs = history(run_dir)
    return [recs[s]["loss"] for s in range(first, last + 1)]


@pytest.mark.slow  # train.py's run in 2 + 2 + 2 + 1 subprocesses
@pytest.mark.heavy
def test_every_mesh_trains_on_the_global_batches_and_a_sigterm_resumes_bit_identically(tmp_path):
    prepare_corpus(tmp_path)
    meshes = launch(tmp_path, ["d2f2", "f4", "t4", "d2t2", "long"], processes=2, devices=2)
    procs = launch(tmp_path, ["cut"], processes=2, devices=2)
    deadline = time.time() + 900
    while not (tmp_path / "cut" / "metrics.jsonl").exists() or 2 not in history(tmp_path / "cut"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended before step 2"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # not the process that logs and leads
    outs = finish(procs)
    stopped = [int(out.split(" at step ")[1].split(":")[0]) for out, _ in outs]
    saved = [int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()]
    assert stopped[0] == stopped[1] == saved[0] and len(saved) == 1 and 2 <= saved[0] < LONG_STEPS, (stopped, saved)
    finish(launch(tmp_path, ["cut"], processes=2, devices=2))
    (lead_out, _), (other_out, _) = finish(meshes)
    assert losses(tmp_path / "cut", last=LONG_STEPS) == losses(tmp_path / "long", last=LONG_STEPS)

    assert "validation loss" in lead_out and "validation loss" not in other_out  # process 0 alone logs
    assert (tmp_path / "d2f2" / "export" / "model.safetensors").exists()  # and exports, gathering the shards
    resumed = tmp_path / "resumed"  # the 2-process d2f2 run cut back to its step-3 checkpoint
    shutil.copytree(tmp_path / "d2f2", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    ((out, _),) = finish(launch(tmp_path, ["d4", "resumed"], processes=1, devices=4))
    reference = losses(tmp_path / "d4")
    assert reference[-1] < reference[0]
    for name in ("d2f2", "f4", "t4", "d2t2"):
        np.testing.assert_allclose(losses(tmp_path / name), reference, rtol=2e-5, err_msg=name)
        for step in (0, 3, 6):
            for key in ("val_loss_full", "val_loss_anchor"):
                np.testing.assert_allclose(
                    history(tmp_path / name)[step][key], history(tmp_path / "d4")[step][key], rtol=2e-5
                )
    assert "resuming checkpoint" in out and "'processes': 2" in out
    np.testing.assert_allclose(losses(resumed, first=4), reference[3:], rtol=2e-5)


def test_a_checkpoint_without_its_layout_resumes_on_one_process_only(monkeypatch):
    """Checkpoints of older anjax (data {"step": n}, read per process from document shards) prove nothing
    about the data order they saw: accepted on 1 process (where both orders agree), refused on 2."""
    import jax

    from anjax.core import sharding
    from anjax.io.run_dir import CheckpointError
    from anjax.train import setup
    from anjax.train.data import BatchIterator, CorpusStats, TokenizedCorpus

    stats = CorpusStats(documents=2, skipped=0, sentences=2, tokens=64, anchors=0)
    corpus = TokenizedCorpus(np.arange(64, dtype=np.int32), np.array([0, 32, 64]), np.zeros(2, np.int32), stats)
    it = BatchIterator(corpus, batch_size=2, seq_len=8, packing=True)
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    setup.restore_data(it, {"step": 7}, mesh, "checkpoint X")
    assert it.step == 7 and setup.data_record(it, mesh) == {
        "iterator": {"step": 7},
        "processes": 1,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }
    setup.restore_data(it, {"iterator": {"step": 9}, "processes": 2, "mesh": {"data": 2}}, mesh, "checkpoint X")
    assert it.step == 9  # a layout record: the global order, whatever processes and mesh wrote it
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(CheckpointError, match="^checkpoint X does not record how many processes wrote it"):
        setup.restore_data(it, {"step": 7}, mesh, "checkpoint X")


if __name__ == "__main__":  # launched with PYTHONPATH=ROOT (`launch`)
    from anjax.train import loop, run_config

    root, names = Path(sys.argv[1]), sys.argv[2:]
    for name in names:
        mesh = dict(zip(("data", "fsdp", "tensor"), MESHES[name]))
        long = name in ("cut", "long")
        sets = [*(LONG if long else OVERRIDES), f"run.dir={root / name}"]
        sets += [f"mesh.{k}={v}" for k, v in mesh.items()]
        sets += [f"data.path={root / 'corpus'}"] if (root / "corpus").is_dir() and not long else []
        sets += ["checkpoint.export_hf=true"] if name == "d2f2" else []
        assert loop.train(run_config.load(ROOT / "configs" / "tiny.yaml", sets)) == 0
