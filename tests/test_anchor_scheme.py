"""The anchor scheme: anchor ids (EP punctuation as it occurs in running text, the `<AC>` token, a
SentencePiece tokenizer's "▁." trap) and `resolve_scheme` (overrides said on stderr, the scheme stored with
the model, its export and run directory, `<AC>` embedding rows). The encoder that applies it on every path is
tests/test_encoder_paths.py; the segmentation command is tests/test_anchors_cli.py."""

import json
import string

import jax
import numpy as np
import pytest
from conftest import make_tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from anjax.core.config import AC_TOKEN, ANCHOR_SCHEME_FIELDS, SENTENCE_SPLITTERS, tiny_config
from anjax.core.model import init_params
from anjax.io import hf, run_dir
from anjax.text import anchors
from anjax.text.encode import Encoder
from anjax.train import run_config


def test_ep_default_and_custom_tokens(tiny_tokenizer):
    tokens, ids = anchors.resolve_anchor_ids(tiny_tokenizer, "ep")
    assert tokens == (".", "?", "!")
    assert [tiny_tokenizer.decode([i]) for i in ids] == [".", "?", "!"]
    tokens, ids = anchors.resolve_anchor_ids(tiny_tokenizer, "ep", [".", ","])
    assert tokens == (".", ",") and len(set(ids)) == 2
    assert anchors.resolve_anchor_ids(tiny_tokenizer, "none") == ((), ())


def test_ep_anchor_that_is_not_one_token(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"'Hello world' is not one token in running text: .* pieces \["):
        anchors.resolve_anchor_ids(tiny_tokenizer, "ep", [".", "Hello world"])


def test_bad_mode(tiny_tokenizer):
    with pytest.raises(ValueError, match="anchor mode must be one of"):
        anchors.resolve_anchor_ids(tiny_tokenizer, "punct")


def test_ac_needs_the_token_then_add_is_idempotent(tiny_tokenizer):
    with pytest.raises(ValueError, match="no <AC> token; add it with anjax.text.anchors.add_ac_token"):
        anchors.resolve_anchor_ids(tiny_tokenizer, "ac")
    n = len(tiny_tokenizer)
    ac_id = anchors.add_ac_token(tiny_tokenizer)
    assert anchors.add_ac_token(tiny_tokenizer) == ac_id and len(tiny_tokenizer) == n + 1
    assert anchors.resolve_anchor_ids(tiny_tokenizer, "ac") == ((AC_TOKEN,), (ac_id,))
    ids = tiny_tokenizer.encode(f"Hi.{AC_TOKEN} Yes", add_special_tokens=False)
    assert ids.count(ac_id) == 1  # never split
    assert AC_TOKEN not in tiny_tokenizer.decode(ids, skip_special_tokens=True)  # special


def test_window_and_rule_are_stored_with_the_model_and_old_models_load_as_the_paper(tiny_tokenizer, tmp_path):
    """The scheme's window and anchor rule ride in the model config, the HF export's "anjax" block and the run
    directory; an export or run written before they existed loads as window 0, rule "ansan" (the paper)."""
    notes = []
    scheme, cfg, _ = anchors.resolve_scheme(
        tiny_config(vocab_size=len(tiny_tokenizer)),
        tiny_tokenizer,
        mode="ep",
        window=16,
        rule="sepllm",
        note=notes.append,
    )
    assert (scheme.window, scheme.rule, cfg.anchor_window, cfg.anchor_rule) == (16, "sepllm", 16, "sepllm")
    assert notes == [
        "anchor window=16 overrides the model's anchor window=0",
        "anchor rule=sepllm overrides the model's anchor rule=ansan",
    ]
    block = hf.hf_config_from(cfg)["anjax"]
    assert hf.config_from_hf(hf.hf_config_from(cfg)) == cfg
    old = {k: v for k, v in block.items() if k not in ("anchor_window", "anchor_rule")}
    assert set(block) == set(ANCHOR_SCHEME_FIELDS)
    reloaded = hf.config_from_hf({**hf.hf_config_from(cfg), "anjax": old})
    assert (reloaded.anchor_window, reloaded.anchor_rule) == (0, "ansan")
    assert anchors.resolve_scheme(reloaded, tiny_tokenizer)[0].window == 0
    # a run directory from before: its config.yaml lacks anchors.window / rule -> resumable by the defaults only
    rc = run_config.RunConfig().to_dict()
    stored = json.loads(json.dumps(rc))
    del stored["anchors"]["window"], stored["anchors"]["rule"]
    (tmp_path / "config.yaml").write_text(json.dumps(stored))
    run_dir.check_resumable(tmp_path, rc)
    with pytest.raises(run_dir.CheckpointError, match="anchors.window"):
        run_dir.check_resumable(tmp_path, run_config.load(None, ["anchors.window=16"]).to_dict())
    with pytest.raises(ValueError, match="anchors.rule"):
        run_config.load(None, ["anchors.rule=window"])


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


@pytest.mark.parametrize("splitter", SENTENCE_SPLITTERS)
def test_scheme_travels_with_the_export_and_overrides_say_so(tmp_path, capsys, splitter):
    tok = make_tiny_tokenizer()
    anchors.add_ac_token(tok)
    cfg = tiny_config(vocab_size=len(tok))
    params = init_params(cfg, jax.random.PRNGKey(0))
    scheme, cfg, params = anchors.resolve_scheme(
        cfg, tok, params, mode="ac", add_bos=True, max_sentence_tokens=8, splitter=splitter
    )
    hf.save_hf_dir(cfg, params, tok, tmp_path / "hf")
    cfg2, params2 = hf.load_hf_dir(tmp_path / "hf")
    again, _, _ = anchors.resolve_scheme(cfg2, tok, params2)
    assert again == scheme and again.add_bos and again.max_sentence_tokens == 8 and again.splitter == splitter
    assert capsys.readouterr().err == ""
    other = next(s for s in SENTENCE_SPLITTERS if s != splitter)
    over, _, _ = anchors.resolve_scheme(cfg2, tok, params2, add_bos=False, max_sentence_tokens=4, splitter=other)
    err = capsys.readouterr().err
    assert "add_bos=False overrides the model's add_bos=True" in err and "max_sentence_tokens=4" in err
    assert f"sentence splitter={other} overrides the model's sentence splitter={splitter}" in err
    assert not over.add_bos and over.max_sentence_tokens == 4 and over.splitter == other
