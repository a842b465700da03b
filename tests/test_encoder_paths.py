"""One anchoring for training, inference and evaluation (issue 11).

The training encoding of a document equals what the engine and the scorer make of the same
text cut at a sentence boundary (hypothesis); EP/AC anchors on a Llama-2-style SentencePiece
tokenizer; the forced `<AC>` rule with BOS; the capacity edge; `<AC>` in padding rows.
"""

from __future__ import annotations

import functools
import string
import time
from unittest import mock

import jax
import numpy as np
import pytest
from conftest import make_tiny_tokenizer, slow_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from anjax.core.config import AC_TOKEN, tiny_config
from anjax.core.model import init_params
from anjax.inference.engine import CacheOverflowError, Engine, EngineConfig
from anjax.inference.scoring import scoring_model
from anjax.text import anchors, encode
from anjax.text.encode import Encoder, ends_sentence, split_sentences


@functools.lru_cache(maxsize=1)
def _bpe() -> PreTrainedTokenizerFast:
    tok = make_tiny_tokenizer()
    anchors.add_ac_token(tok)
    return tok


@functools.lru_cache(maxsize=2)
def _paths(add_bos: bool):
    """(training encoder, engine, scoring model) of one tiny AC model with the scheme stored in its config."""
    tok = _bpe()
    cfg = tiny_config(vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(0))
    scheme, cfg, params = anchors.resolve_scheme(cfg, tok, params, mode="ac", add_bos=add_bos)
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(paragraphs(), min_size=1, max_size=4).map("\n\n".join), line=paragraphs(10, 40))
def test_paragraphs_and_windows_split_as_pysbd_splits_the_whole_text(text, line):
    assert split_sentences(text) == encode._split_window(text)  # paragraph by paragraph, as pysbd on the whole
    with mock.patch.object(encode, "WINDOW", 120):  # one long paragraph, read in windows
        assert split_sentences(line) == encode._split_window(line)


def test_a_huge_single_line_paragraph_splits_in_linear_time():
    text = " ".join(f"Sentence {i} is about Mr. Smith and the cat at 3 p.m. today." for i in range(3500))  # 220k
    t0 = time.perf_counter()
    sentences = split_sentences(text)
    assert time.perf_counter() - t0 < 60  # pysbd on the whole line: minutes
    assert "".join(sentences) == text and len(sentences) == 3500


@pytest.mark.parametrize("add_bos", [False, True])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts())
def test_training_engine_and_scorer_agree_at_every_sentence_boundary(add_bos, text):
    encoder, engine, model = _paths(add_bos)
    ac = encoder.scheme.ac_id
    doc = encoder.document(text)
    sentences = split_sentences(text)
    assert "".join(sentences) == text and doc.count(ac) == len(sentences)
    for k in range(1, len(sentences)):
        context, rest = "".join(sentences[:k]), "".join(sentences[k:])
        ctx, cont = model.encode_pair(context, rest)
        assert ctx + cont == doc  # scorer: the training ids, split
        if context.strip() == context:  # (trailing spaces move to the continuation)
            assert ctx[-1] == ac  # a context ending a sentence is closed
        if context.strip() and split_sentences(context) == sentences[:k]:  # pysbd looks ahead (encoding docs)
            prompt, _ = engine.encode(context)
            if ends_sentence(context):
                assert prompt == doc[: len(prompt)] and prompt[-1] == ac  # engine: the training prefix
            else:  # an unfinished prompt stays open
                assert prompt + [ac] == doc[: len(prompt) + 1]


def _llama2_style_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer (Metaspace "▁", prepend first) with both "." and "▁."."""
    words = "The cat sat One Two Three Hello world Is it Yes Mr Smith dog ran".split()
    punct = list(".?!,;:\"'")
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(p, -2.0) for p in punct] + [("▁" + p, -2.0) for p in punct]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits]
    pieces += [("▁" + c, -5.0) for c in string.ascii_letters] + [("▁", -6.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_sentencepiece_anchors_land_on_every_sentence_end(mode):
    tok = _llama2_style_tokenizer()
    text = "The cat sat. One? Two! Three."
    assert tok.convert_ids_to_tokens(tok.encode(".", add_special_tokens=False)) == ["▁."]  # the trap
    if mode == "ac":
        anchors.add_ac_token(tok)
    scheme = anchors.make_scheme(tok, mode)
    ids = Encoder(tok, scheme).document(text)
    pieces = tok.convert_ids_to_tokens(ids)
    flags = Encoder(tok, scheme).anchor_flags(ids)
    ends = [i for i, p in enumerate(pieces) if p in (".", "?", "!")]
    assert len(ends) == 4
    if mode == "ep":
        assert [pieces[i] for i in range(len(ids)) if flags[i]] == [".", "?", "!", "."]
        assert [i for i, f in enumerate(flags) if f] == ends
    else:
        assert [i for i, f in enumerate(flags) if f] == [i + 1 for i in ends]
    with pytest.raises(ValueError, match=r"'\.\.' is not one token in running text: .*pieces \['\.', '\.'\]"):
        anchors.make_scheme(tok, "ep", ["..", "?"])


def test_capacity_edge_and_peak_never_above_capacity():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt, new = list(range(8, 20)), 5
    need = len(prompt) + new - 1  # a full cache: every token fed (the last sampled one is not)
    for capacity, fails in ((need - 1, True), (need, False), (need + 1, False)):
        out = Engine(cfg, params, config=EngineConfig(cache="full", chunk_size=4, capacity=capacity)).generate(
            [prompt], max_new_tokens=new, stop_ids=(), raise_errors=False
        )[0]
        assert bool(out.error) == fails, (capacity, out.error)
        assert out.stats["peak_cache_slots"] <= capacity
        if not fails:
            assert out.stats["peak_cache_slots"] == need and len(out.ids) == len(prompt) + new
    with pytest.raises(CacheOverflowError, match=f"capacity is {need - 1}"):
        Engine(cfg, params, config=EngineConfig(cache="full", chunk_size=4, capacity=need - 1)).generate(
            [prompt], max_new_tokens=new, stop_ids=()
        )


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


@pytest.mark.parametrize("init", ["mean", "copy"])
def test_ac_in_padding_rows_is_initialised_like_a_new_row(init):
    tok = make_tiny_tokenizer()
    n = len(tok)
    cfg = tiny_config(vocab_size=n + 64, tie_embeddings=False)  # padded past the tokenizer
    params = init_params(cfg, jax.random.PRNGKey(0))
    scheme, cfg2, new = anchors.resolve_scheme(cfg, tok, params, mode="ac", ac_init=init)
    ac = scheme.ac_id
    assert ac == n and cfg2.vocab_size == cfg.vocab_size and AC_TOKEN in tok.get_vocab()
    embed, head = np.asarray(params["embed"]), np.asarray(params["lm_head"])
    want = (lambda w: w[:n].mean(0)) if init == "mean" else (lambda w: w[anchors.running_text_id(tok, ".")])
    np.testing.assert_allclose(new["embed"][ac], want(embed), rtol=1e-6)
    np.testing.assert_allclose(new["lm_head"][:, ac], want(head.T), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(new["embed"], ac, 0), np.delete(embed, ac, 0))


def test_scheme_travels_with_the_export_and_overrides_say_so(tmp_path, capsys):
    from anjax.io.hf import load_hf_dir, save_hf_dir

    tok = _bpe()
    cfg = tiny_config(vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(0))
    scheme, cfg, params = anchors.resolve_scheme(cfg, tok, params, mode="ac", add_bos=True, max_sentence_tokens=8)
    save_hf_dir(cfg, params, tok, tmp_path / "hf")
    cfg2, params2 = load_hf_dir(tmp_path / "hf")
    again, _, _ = anchors.resolve_scheme(cfg2, tok, params2)
    assert again == scheme and again.add_bos and again.max_sentence_tokens == 8
    assert capsys.readouterr().err == ""
    over, _, _ = anchors.resolve_scheme(cfg2, tok, params2, add_bos=False, max_sentence_tokens=4)
    err = capsys.readouterr().err
    assert "add_bos=False overrides the model's add_bos=True" in err and "max_sentence_tokens=4" in err
    assert not over.add_bos and over.max_sentence_tokens == 4


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
