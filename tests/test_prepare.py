"""The prepared corpus: the in-memory pipeline's ids and anchors, resumable shard by shard, refused
for another tokenizer or anchor scheme."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anjax import cli
from anjax.cli import prepare as prepare_cli
from anjax.text import anchors
from anjax.text.encode import Encoder
from anjax.train import data, prepare, run_config

WORDS = ["The", "cat", "sat", "Mr.", "Smith", "dog", "ran", "3.5", "mat", "é", "", " ", "\n\n", "yes"]
ENDS = [".", "?", "!", ",", "", "...", ".\n"]
document = st.lists(st.tuples(st.lists(st.sampled_from(WORDS), max_size=6), st.sampled_from(ENDS)), max_size=5).map(
    lambda sentences: "".join(" ".join(w) + e + " " for w, e in sentences)
)


_MISSING = "sentence splitter 'sentencex-en' needs the package sentencex: pip install sentencex==1.0.32"


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _tokenizer_and_scheme(mode):
    tok = make_tiny_tokenizer()
    if mode == "ac":
        anchors.add_ac_token(tok)
    return tok, anchors.make_scheme(tok, mode, max_sentence_tokens=5 if mode == "ac" else None)


def _digest(directory: Path) -> dict[str, str]:
    """sha256 of every shard file (the manifest, which records the source's modification time, aside, and the
    hidden temporaries a killed writer may leave, which nothing reads)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.parent != directory and not p.name.startswith(".")
    }


@pytest.mark.parametrize("mode", ["ac", "ep"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(document, min_size=1, max_size=9).filter(lambda ts: any(t.strip() for t in ts)))
def test_prepared_ids_and_anchors_equal_the_in_memory_pipeline(mode, texts):
    tok, scheme = _tokenizer_and_scheme(mode)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = data.DataConfig(path=_write_jsonl(Path(tmp) / "d.jsonl", texts))
        memory = data.tokenize_corpus(data.load_corpus(cfg), tok, scheme, cfg)
        prepare.prepare(cfg, tok, scheme, Path(tmp) / "p", {"train": "train"}, workers=1, shard_docs=2)
        disk = prepare.open_prepared(Path(tmp) / "p", "train")
        everything = np.arange(len(disk.tokens))
        np.testing.assert_array_equal(disk.tokens[everything], memory.tokens)
        np.testing.assert_array_equal(disk.offsets, memory.offsets)
        np.testing.assert_array_equal(disk.prompt_len, memory.prompt_len)
        assert disk.stats == memory.stats
        encoder = Encoder(tok, scheme)
        docs = [t for t in texts if t.strip()]
        for i, text in enumerate(docs):  # per document: the encoder's ids, and its anchor flags
            ids = disk.tokens[np.arange(disk.offsets[i], disk.offsets[i + 1])].tolist()
            assert ids == encoder.document(text)
            flags = np.isin(ids, scheme.ids).tolist()
            assert flags == encoder.anchor_flags(encoder.document(text))


def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, monkeypatch):
    tok, scheme = _tokenizer_and_scheme("ac")
    texts = [f"Line {i}. It is {'odd' if i % 2 else 'even'}? Yes!" for i in range(20)]
    cfg = data.DataConfig(path=_write_jsonl(tmp_path / "d.jsonl", texts))
    splits = {"train": "train[:80%]", "validation": "train[80%:]"}
    prepare.prepare(cfg, tok, scheme, tmp_path / "whole", splits, workers=1, shard_docs=3)

    write, written = prepare.write_shard, []

    def killed_after_two(stem, corpus):
        if len(written) == 2:
            stem.with_name(f".{stem.name}.tokens.npy.anjax-tmp.1").write_bytes(b"partial")  # a write cut short
            raise KeyboardInterrupt
        written.append(stem)
        return write(stem, corpus)

    monkeypatch.setattr(prepare, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg, tok, scheme, tmp_path / "cut", splits, workers=1, shard_docs=3)
    monkeypatch.setattr(prepare, "write_shard", write)
    assert not (tmp_path / "cut" / prepare.MANIFEST).exists()
    with pytest.raises(ValueError, match="unfinished prepared corpus"):
        prepare.open_prepared(tmp_path / "cut", "train")
    seen = []
    prepare.prepare(cfg, tok, scheme, tmp_path / "cut", splits, workers=1, shard_docs=3, log=seen.append)
    assert "train: 16 documents, 6 shards, 4 to encode with 1 processes" in seen
    assert _digest(tmp_path / "cut") == _digest(tmp_path / "whole")
    whole, cut = (json.loads((tmp_path / d / prepare.MANIFEST).read_text()) for d in ("whole", "cut"))
    assert whole == cut and whole["counts"]["validation"]["documents"] == 4
    with pytest.raises(ValueError, match="shard_docs differ"):
        prepare.prepare(cfg, tok, scheme, tmp_path / "cut", splits, workers=1, shard_docs=4)


def test_another_tokenizer_or_scheme_is_refused(tmp_path):
    tok, scheme = _tokenizer_and_scheme("ep")
    cfg = data.DataConfig(path=_write_jsonl(tmp_path / "d.jsonl", ["One. Two?", "Three!"]), batch_size=1, seq_len=8)
    prepare.prepare(cfg, tok, scheme, tmp_path / "p", {"train": "train"}, workers=1)
    run = data.DataConfig(path=str(tmp_path / "p"), batch_size=1, seq_len=8)
    it = prepare.make_batches(run, tok, scheme)
    assert it.corpus.stats.documents == 2 and it.batch(0)["valid"].any()
    with pytest.raises(ValueError, match=r"another anchor scheme: tokens=\['.', '\?', '!'\] \(model: \['.'\]\)"):
        prepare.make_batches(run, tok, anchors.make_scheme(tok, "ep", ["."]))
    ac_tok, ac_scheme = _tokenizer_and_scheme("ac")
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        prepare.make_batches(run, ac_tok, ac_scheme)
    with pytest.raises(ValueError, match="format 'text' documents, data.format is 'alpaca'"):
        prepare.make_batches(data.DataConfig(path=str(tmp_path / "p"), format="alpaca"), tok, scheme)
    with pytest.raises(ValueError, match="has no split 'validation'; it has train"):
        prepare.make_batches(run, tok, scheme, train=False, split="validation")


def test_cli_prepares_what_a_run_reads(tmp_path, capsys):
    tok = make_tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    texts = ["The cat sat. The dog ran?", "Yes! No.", "Mr. Smith sat."]
    source = _write_jsonl(tmp_path / "d.jsonl", texts)
    argv = ["--data", source, "--tokenizer", str(tmp_path / "tok"), "--anchors", "ac", "--out", str(tmp_path / "p")]
    assert prepare_cli.main([*argv, "--eval-split", "train[2:]", "--split", "train[:2]"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["train"]["documents"] == 2 and out["counts"]["validation"]["documents"] == 1
    ac_tok = make_tiny_tokenizer()
    anchors.add_ac_token(ac_tok)
    scheme = anchors.make_scheme(ac_tok, "ac")
    memory = data.tokenize_corpus(data.load_corpus(data.DataConfig(path=source)), ac_tok, scheme)
    disk = prepare.open_prepared(tmp_path / "p", "validation")
    np.testing.assert_array_equal(disk.tokens, memory.tokens[memory.offsets[2] :])
    with pytest.raises(ValueError, match="other settings"):
        prepare_cli.main([*argv, "--anchors", "ep"])


@pytest.mark.parametrize(
    "splitter, message",
    [("nltk", "unknown sentence splitter 'nltk'; known: pysbd-en, sentencex-en"), ("sentencex-en", _MISSING)],
)
def test_an_unknown_or_missing_splitter_is_one_line_exit_2(splitter, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sentencex", None)  # as if not installed
    with pytest.raises(SystemExit) as stop:
        cli.run(prepare_cli.main, ["--anchors", "ac", "--splitter", splitter, "--out", "unused"])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: --splitter: {message}"]
    with pytest.raises(ValueError, match=f"^anchors.splitter: {message}$"):
        run_config.load(None, [f"anchors.splitter={splitter}"])


@pytest.mark.slow  # python -m anjax.prepare twice, with 2 worker processes each
def test_cli_killed_with_workers_resumes_to_the_shards_of_one_process(tmp_path):
    """kill -9 of the whole command (parent and spawned workers) mid-way; the rerun completes the same shards
    that one process writes uninterrupted."""
    tok = make_tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    texts = [f"Doc {i}. It says {'yes' if i % 3 else 'no'}? Maybe! " * (1 + i % 4) for i in range(120)]
    source = _write_jsonl(tmp_path / "d.jsonl", texts)
    argv = ["--data", source, "--tokenizer", str(tmp_path / "tok"), "--anchors", "ac", "--shard-docs", "4"]
    cmd = [sys.executable, "-m", "anjax.prepare", *argv, "--workers", "2", "--out", str(tmp_path / "cut")]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while len(list((tmp_path / "cut" / "train").glob("*.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "cut" / "train").glob("*.json")))
    assert done < 30 and not (tmp_path / "cut" / prepare.MANIFEST).exists()
    rerun = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"train: 120 documents, 30 shards, {30 - done} to encode with 2 processes" in rerun.stderr
    assert prepare_cli.main([*argv, "--workers", "1", "--out", str(tmp_path / "whole")]) == 0
    assert _digest(tmp_path / "cut") == _digest(tmp_path / "whole")
