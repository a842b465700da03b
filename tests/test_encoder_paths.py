"""One encoder on every path: training, the engine, the scorer (docs/DESIGN.md Invariant 5).

Sentences split as pysbd splits the whole text (read in windows); the training encoding of a document
equals what the engine and the scorer make of the same text cut at a sentence boundary (hypothesis);
decoding forces `<AC>` as the encoder cuts (BOS not counted), also through a run's export; raw prompts.
The anchor scheme itself (anchor ids, `resolve_scheme`) is tests/test_anchor_scheme.py.
"""

from __future__ import annotations

import functools
import time
from unittest import mock

import jax
import numpy as np
import pytest
from conftest import make_tiny_tokenizer, slow_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from anjax.core.config import SENTENCE_SPLITTERS, tiny_config
from anjax.core.model import init_params
from anjax.inference.engine import Engine, EngineConfig
from anjax.inference.scoring import scoring_model
from anjax.text import anchors, encode, splitters
from anjax.text.encode import Encoder, ends_sentence, split_sentences


@functools.lru_cache(maxsize=1)
def _bpe() -> PreTrainedTokenizerFast:
    tok = make_tiny_tokenizer()
    anchors.add_ac_token(tok)
    return tok


@functools.lru_cache(maxsize=3)
def _paths(add_bos: bool, splitter: str = "pysbd-en"):
    """(training encoder, engine, scoring model) of one tiny AC model with the scheme stored in its config."""
    tok = _bpe()
    cfg = tiny_config(vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(0))
    scheme, cfg, params = anchors.resolve_scheme(cfg, tok, params, mode="ac", add_bos=add_bos, splitter=splitter)
    return Encoder(tok, scheme), Engine(cfg, params, tok), scoring_model(cfg, params, tok)


WORDS = [
    "the",
    "cat",
    "Dr.",
    "Smith",
    "e.g.",
    "U.S.",
    "3.14",
    "café",
    "naïve",
    "日本語",
    "😀",
    "a",
    "mat",
    "Mr.",
    "p.m.",
    "«quote»",
    "x",
]
ENDS = [".", "?", "!", "...", '."', ".”", "?)", "!'", "。"]
SEPS = [" ", "  ", "\n", "\n\n", " \n", "\n\n\n"]


@st.composite
def texts(draw) -> str:
    """Sentences of words with abbreviations, quotes after a full stop, Unicode, emoji; empty and
    whitespace sentences; maybe no final sentence end; maybe a trailing newline."""
    n = draw(st.integers(1, 5))
    parts = []
    for i in range(n):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=0, max_size=6))
        body = " ".join(words).capitalize() if words else draw(st.sampled_from(["", " ", "\t"]))
        last = i == n - 1
        end = draw(st.sampled_from(ENDS + ([""] if last else [])))
        parts.append(body + end)
        if not last:
            parts.append(draw(st.sampled_from(SEPS)))
    text = "".join(parts) + draw(st.sampled_from(["", "\n", "\n\n"]))
    return text if text.strip() else "x."


@st.composite
def paragraphs(draw, min_sentences=1, max_sentences=6) -> str:
    """Ordinary prose: sentences of WORDS ending in . ? ! or ..., some quoted ("He said "...""), joined by a
    space or a hard-wrapping newline."""
    parts = []
    for _ in range(draw(st.integers(min_sentences, max_sentences))):
        words = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))).capitalize()
        sentence = words + draw(st.sampled_from([".", "?", "!", "..."]))
        parts.append(f'He said "{sentence}"' if draw(st.booleans()) and len(parts) % 3 == 2 else sentence)
        parts.append(draw(st.sampled_from([" ", " ", "\n"])))
    return "".join(parts[:-1])


@pytest.mark.parametrize("splitter", SENTENCE_SPLITTERS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(paragraphs(), min_size=1, max_size=4).map("\n\n".join), line=paragraphs(10, 40))
def test_paragraphs_and_windows_split_as_the_splitter_splits_the_whole_text(splitter, text, line):
    ends = splitters.sentence_ends(splitter)
    assert split_sentences(text, splitter) == encode._split_window(text, ends)  # paragraph by paragraph
    # one long paragraph, read in windows (sentencex reads whole paragraphs). Equal whenever a window's look-ahead
    # (its last quarter, 100 chars here) holds the longest sentence (< 80 chars here): with 30 chars, pysbd read
    # 'He said "Mr.' as a sentence that the whole text continues with ' e.g. the the the the the the."'
    small = {splitter: 400} if splitters.WINDOWS[splitter] else {}
    with mock.patch.dict(splitters.WINDOWS, small):
        assert split_sentences(line, splitter) == encode._split_window(line, ends)


@pytest.mark.parametrize("splitter", SENTENCE_SPLITTERS)
def test_a_huge_single_line_paragraph_splits_in_linear_time(splitter):
    text = " ".join(f"Sentence {i} is about Mr. Smith and the cat at 3 p.m. today." for i in range(3500))  # 220k
    t0 = time.process_time()  # CPU seconds: a loaded machine does not move them
    sentences = split_sentences(text, splitter)
    assert time.process_time() - t0 < 20  # pysbd-en: ~1.5 s; on the whole line (no windows) 54 s
    assert "".join(sentences) == text and len(sentences) == 3500


@pytest.mark.parametrize(("add_bos", "splitter"), [(False, "pysbd-en"), (True, "pysbd-en"), (False, "sentencex-en")])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts())
def test_training_engine_and_scorer_agree_at_every_sentence_boundary(add_bos, splitter, text):
    encoder, engine, model = _paths(add_bos, splitter)
    ac = encoder.scheme.ac_id
    doc = encoder.document(text)
    sentences = split_sentences(text, splitter)
    assert "".join(sentences) == text and doc.count(ac) == len(sentences)
    for k in range(1, len(sentences)):
        context, rest = "".join(sentences[:k]), "".join(sentences[k:])
        ctx, cont = model.encode_pair(context, rest)
        assert ctx + cont == doc  # scorer: the training ids, split
        if context.strip() == context:  # (trailing spaces move to the continuation)
            assert ctx[-1] == ac  # a context ending a sentence is closed
        if context.strip() and split_sentences(context, splitter) == sentences[:k]:  # splitters look ahead
            prompt, _ = engine.encode(context)
            if ends_sentence(context):
                assert prompt == doc[: len(prompt)] and prompt[-1] == ac  # engine: the training prefix
            else:  # an unfinished prompt stays open
                assert prompt + [ac] == doc[: len(prompt) + 1]


def _runs(ids, ac, bos=None):
    """Lengths of the runs of non-<AC> ids (BOS not counted)."""
    out, run = [], 0
    for t in ids:
        if t == ac:
            out, run = out + [run], 0
        elif t != bos:
            run += 1
    return out + [run]


@pytest.mark.parametrize(
    "add_bos,cache", [slow_case(False, None), (True, None), (True, "window"), slow_case(True, "h2o")]
)
def test_forced_ac_counts_like_training(add_bos, cache):
    """Decoding forces `<AC>` after N sentence tokens, BOS not counted, exactly as the encoder cuts; also
    under a cache policy whose budget (4 slots) evicts the open sentence's tokens (counted in the state)."""
    tok, n = _bpe(), 6
    cfg = tiny_config(vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(1))
    scheme, cfg, params = anchors.resolve_scheme(cfg, tok, params, mode="ac", add_bos=add_bos, max_sentence_tokens=n)
    params = dict(params, embed=np.asarray(params["embed"]).copy())
    params["embed"][scheme.ac_id] = 0.0  # logit 0: the model never picks <AC> itself, every <AC> is forced
    config = EngineConfig() if cache is None else EngineConfig(cache=cache, budget=4, policy_sink=1)
    out = Engine(cfg, params, tok, config).generate(["The cat"], max_new_tokens=20, stop_ids=())[0]
    assert (out.ids[0] == tok.bos_token_id) == add_bos
    runs = _runs(out.ids, scheme.ac_id, tok.bos_token_id if add_bos else None)
    assert runs[:-1] == [n] * (len(runs) - 1) and len(runs) >= 3 and runs[-1] <= n
    assert Encoder(tok, scheme).prompt("The cat sat on the mat and the dog")[0][: n + 1 + add_bos][-1] == scheme.ac_id


@pytest.mark.slow
def test_tiny_ac_run_export_keeps_bos_and_forced_anchor_rule(tmp_path):
    """train.py (tiny AC, data.add_bos=true, data.max_sentence_tokens=8) → export → a fresh infer.py
    process and anjax.eval.evaluate's loader use the run's BOS and forced-<AC> rule (asserted on ids).

    The subprocess smoke test of `python train.py` and `python infer.py` (slow: the fast tier checks the
    scheme's round trip in-process, `test_scheme_travels_with_the_export_and_overrides_say_so`); the
    loader runs in this process, which never trained."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from anjax.cli import evaluate

    root, run_dir = Path(__file__).resolve().parents[1], tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/tiny.yaml",
            "--set",
            f"run.dir={run_dir}",
            "train.steps=2",
            "eval.every=0",
            "checkpoint.every=2",
            "data.seq_len=32",
            "data.add_bos=true",
            "data.max_sentence_tokens=8",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    export = run_dir / "export"
    block = json.loads((export / "config.json").read_text())["anjax"]
    assert block["add_bos"] is True and block["max_sentence_tokens"] == 8 and block["anchor_mode"] == "ac"
    assert json.loads((run_dir / "model_config.json").read_text())["max_sentence_tokens"] == 8
    prompt = "The cat sat on the mat and the dog sat on the mat too and then"
    out = subprocess.run(
        [sys.executable, "infer.py", "--model", str(export), "--prompt", prompt, "--json", "--max-new-tokens", "24"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stderr.count("note:") == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    m = evaluate.load_model_for(evaluate.build_parser().parse_args(["--model", str(export)]), ["anchor"])
    ev = {"scheme": m.scheme.to_dict(), "ctx": m.encode_pair(prompt, " x.")[0], "prompt": m.encode_context(prompt)}
    scheme = ev["scheme"]
    bos, ac = scheme["bos_id"], scheme["ids"][0]
    assert scheme["add_bos"] and scheme["max_sentence_tokens"] == 8
    assert got["prompt_ids"] == ev["prompt"]  # the same ids on both paths
    full_run = _runs(got["prompt_ids"], ac, bos)[-1] == 8  # training cuts before the next token,
    assert ev["ctx"] == got["prompt_ids"] + [ac] * full_run  # the scorer keeps that <AC> in the context,
    if full_run:
        assert got["generated_ids"][0] == ac  # and decoding forces it first
    ids = got["prompt_ids"] + got["generated_ids"]
    assert ids[0] == bos and ids[1 + 8] == ac  # BOS, then <AC> after 8 text tokens
    assert max(_runs(ids, ac, bos)) <= 8  # decoding forces it as training cuts


def test_raw_prompts_are_plain_tokens_with_protect_flags():
    encoder, engine, _ = _paths(True)
    raw = Engine(engine.cfg, engine.params, _bpe(), config=EngineConfig(raw_prompts=True))
    ids, flags = raw.encode("The cat sat. The dog", protect=["dog"])
    tok = _bpe()
    assert ids == [tok.bos_token_id] + tok.encode("The cat sat. The dog", add_special_tokens=False)
    assert tok.decode([t for t, f in zip(ids, flags) if f]).strip() == "dog"
    assert encoder.scheme.ac_id not in ids and engine.encode("The cat sat. The dog")[0].count(encoder.scheme.ac_id) == 1
