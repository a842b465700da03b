"""Data pipeline: sentences, anchors, packing, padding, labels, resumption, SFT, sources."""

import json
import os

import datasets
import numpy as np
import pytest

from anjax.core.config import AC_TOKEN
from anjax.text import anchors
from anjax.text import encode as encoding
from anjax.train import data, prepare

THREE = "The cat sat on the mat. Did the dog see it? Yes!"


@pytest.fixture
def ac_tok(tiny_tokenizer):
    anchors.add_ac_token(tiny_tokenizer)
    return tiny_tokenizer


def _corpus(tok, texts, mode="ac", **cfg):
    dc = data.DataConfig(**cfg)
    scheme = anchors.make_scheme(tok, mode, add_bos=dc.add_bos, max_sentence_tokens=dc.max_sentence_tokens)
    return data.tokenize_corpus(datasets.Dataset.from_dict({"text": texts}), tok, scheme, dc)


def _enc(tok, mode, add_bos=False, cap=None):
    return encoding.Encoder(tok, anchors.make_scheme(tok, mode, add_bos=add_bos, max_sentence_tokens=cap))


def _synthetic(lengths, prompt_len=None):
    """Doc i holds ids 1000*(i+1) + [0, 1, ...]: the next token in a document is always id + 1."""
    docs = [1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    plen = np.zeros(len(lengths), np.int32) if prompt_len is None else np.asarray(prompt_len, np.int32)
    return data.TokenizedCorpus(np.concatenate(docs).astype(np.int32), offsets, plen, stats=None)


# ----------------------------------------------------------------------------- sentences and anchors


def test_split_sentences_is_faithful():
    text = "Hello world.  This is Mr. Smith's test?\n\nYes! A wrapped\nline ends here. No end"
    sents = encoding.split_sentences(text)
    assert "".join(sents) == text
    assert sents == [
        "Hello world.",
        "  This is Mr. Smith's test?",
        "\n\nYes!",
        " A wrapped\nline ends here.",
        " No end",
    ]
    for doc in data.embedded_corpus("validation")["text"][:3]:
        assert "".join(encoding.split_sentences(doc)) == doc


def test_ac_three_sentences_exact_placement(ac_tok):
    ac = ac_tok.convert_tokens_to_ids(AC_TOKEN)
    ids = _enc(ac_tok, "ac", True).document(THREE)
    tokens = ac_tok.convert_ids_to_tokens(ids)
    assert ids[0] == ac_tok.bos_token_id and ids.count(ac) == 3
    assert [tokens[i - 1] for i, t in enumerate(ids) if t == ac] == [".", "?", "!"]
    assert ids[-1] == ac and _enc(ac_tok, "ac").document(THREE) == ids[1:]
    assert ac_tok.decode(ids, skip_special_tokens=True) == THREE  # whitespace kept
    assert [t for t in ids if t != ac] == [ac_tok.bos_token_id] + ac_tok.encode(THREE, add_special_tokens=False)


def test_no_sentence_end_still_ends_with_ac_and_open_prompt(ac_tok):
    ac = ac_tok.convert_tokens_to_ids(AC_TOKEN)
    ids = _enc(ac_tok, "ac").document("the cat sat on the mat")
    assert ids.count(ac) == 1 and ids[-1] == ac
    open_ids = _enc(ac_tok, "ac").prompt("The cat sat. The dog")[0]
    assert open_ids.count(ac) == 1 and open_ids[-1] != ac
    closed = _enc(ac_tok, "ac").prompt("The cat sat. The dog ran.")[0]
    assert closed.count(ac) == 2 and closed[-1] == ac


def test_ep_inserts_nothing(tiny_tokenizer):
    ids = _enc(tiny_tokenizer, "ep").document(THREE)
    assert ids == tiny_tokenizer.encode(THREE, add_special_tokens=False)
    corpus = _corpus(tiny_tokenizer, [THREE], mode="ep")
    assert corpus.stats.anchors == 3 and corpus.stats.sentences == 3
    with pytest.raises(ValueError, match="needs anchor mode 'ac'"):
        _enc(tiny_tokenizer, "ep", cap=4)


def test_max_sentence_tokens(ac_tok):
    ac = ac_tok.convert_tokens_to_ids(AC_TOKEN)
    text = "the cat sat on the mat and the dog sat on the mat too. Yes!"
    plain = _enc(ac_tok, "ac").document(text)
    capped = _enc(ac_tok, "ac", cap=4).document(text)
    runs = lambda ids: [len(r) for r in "".join("A" if t == ac else "x" for t in ids).split("A")]
    assert [t for t in capped if t != ac] == [t for t in plain if t != ac]
    assert max(runs(capped)) == 4 and runs(capped)[-1] == 0 and max(runs(plain)) > 4
    assert capped.count(ac) == sum(-(-n // 4) for n in runs(plain)[:-1])  # an <AC> after every 4 tokens


@pytest.mark.parametrize("mode,cap", [("none", None), ("ac", None), ("ac", 3)])
def test_protected_text_marks_exactly_its_tokens(ac_tok, mode, cap):
    ac = ac_tok.convert_tokens_to_ids(AC_TOKEN) if mode == "ac" else None
    text = THREE + " The dog sat on the mat"
    protect = ["mat. Did the", "dog"]  # across a sentence end; "dog" occurs twice
    enc = _enc(ac_tok, mode, True, cap)
    ids, flags = enc.prompt(text, protect)
    assert ids == enc.prompt(text)[0] and enc.document(text) == ids + ([ac] if mode == "ac" else [])
    covered = "".join(ac_tok.decode([t]) for t, f in zip(ids, flags) if f and t != ac)
    assert covered.replace(" ", "") == "mat.Didthedogdog"
    assert not flags[0]  # BOS
    if mode == "ac" and cap is None:  # the <AC> after "mat." lies inside the first span
        assert [f for t, f in zip(ids, flags) if t == ac] == [True, False, False]
    with pytest.raises(ValueError, match="does not occur"):
        enc.prompt(text, ["elephant"])


def test_stats_and_empty_documents_skipped(ac_tok):
    corpus = _corpus(ac_tok, [THREE, "", "   \n", "No end"], mode="ac")
    s = corpus.stats
    assert (s.documents, s.skipped, s.sentences, s.anchors) == (2, 2, 4, 4)
    assert s.tokens == len(corpus.tokens) == corpus.offsets[-1] and 0 < s.anchor_share < 1
    with pytest.raises(ValueError, match="no non-empty documents"):
        _corpus(ac_tok, ["", " "], mode="ac")


def test_bos_follows_the_tokenizer_unless_set(ac_tok):
    bos = ac_tok.bos_token_id
    assert not anchors.tokenizer_adds_bos(ac_tok)  # GPT-2/SmolLM2 style: no BOS of its own
    assert _corpus(ac_tok, [THREE]).tokens[0] != bos
    assert _corpus(ac_tok, [THREE], add_bos=True).tokens[0] == bos
    ac_tok.add_bos_token = True  # Llama style
    assert anchors.tokenizer_adds_bos(ac_tok) and _corpus(ac_tok, [THREE]).tokens[0] == bos


def test_ac_mode_with_tokenizer_lacking_ac(tiny_tokenizer):
    with pytest.raises(ValueError, match="add_ac_token"):
        scheme = anchors.AnchorScheme(mode="ac", tokens=(AC_TOKEN,), ids=(7,))
        data.tokenize_corpus(datasets.Dataset.from_dict({"text": [THREE]}), tiny_tokenizer, scheme)


# ----------------------------------------------------------------------------- batches


def test_packing_keeps_documents_apart():
    from anjax.core.mask import token_metadata

    corpus = _synthetic([5, 9, 3, 12, 7])
    L = 8
    it = data.BatchIterator(corpus, batch_size=2, seq_len=L, packing=True, seed=1)
    assert it.steps_per_epoch == 36 // L // 2
    rows = [it.batch(s) for s in range(it.steps_per_epoch)]
    tok = np.concatenate([b["tokens"] for b in rows])
    doc = np.concatenate([b["doc"] for b in rows])
    assert np.concatenate([b["valid"] for b in rows]).all()
    # the rows cut one stream of whole documents, back to back in a shuffled order
    runs = np.split(tok.reshape(-1), np.flatnonzero(tok.reshape(-1) % 1000 == 0)[1:])
    lengths = [5, 9, 3, 12, 7]
    for i, run in enumerate(runs):
        d = run[0] // 1000
        np.testing.assert_array_equal(run, d * 1000 + np.arange(len(run)))
        assert len(run) == lengths[d - 1] or i == len(runs) - 1
    assert len({r[0] for r in runs}) == len(runs) and [r[0] for r in runs] != sorted(r[0] for r in runs)
    for b in rows:
        same = b["doc"][:, 1:] == b["doc"][:, :-1]
        assert (same == (b["tokens"][:, 1:] // 1000 == b["tokens"][:, :-1] // 1000)).all()
        m = b["loss_mask"]
        assert (b["labels"][m] == b["tokens"][m] + 1).all()  # next token of the same doc
        assert not m[:, :-1][~same].any()  # no loss across a boundary
        assert (m == (np.concatenate([b["tokens"][:, 1:], b["labels"][:, -1:]], 1) == b["tokens"] + 1)).all()
        meta = token_metadata(b["tokens"], b["valid"], b["doc"])
        assert (
            np.asarray(meta.pos) == b["tokens"] % 1000 - np.where(b["doc"] == 0, b["tokens"][:, :1] % 1000, 0)
        ).all()
    assert doc.max() >= 1


def test_one_document_per_row_truncates_and_pads():
    corpus = _synthetic([3, 10, 6])
    b = data.BatchIterator(corpus, batch_size=3, seq_len=6, shuffle=False).batch(0)
    np.testing.assert_array_equal(b["valid"].sum(1), [3, 6, 6])
    np.testing.assert_array_equal(b["doc"][0], [0, 0, 0, -1, -1, -1])
    assert (b["tokens"][~b["valid"]] == 0).all() and (b["doc"][b["valid"]] == 0).all()
    np.testing.assert_array_equal(b["loss_mask"].sum(1), [2, 6, 5])  # truncated doc: its 7th token is the last label
    assert b["labels"][1, 5] == 2006 and not b["loss_mask"][2, 5]
    assert (b["labels"][b["loss_mask"]] == b["tokens"][b["loss_mask"]] + 1).all()
    assert (b["labels"][~b["loss_mask"]] == 0).all()


def test_determinism_and_resume_across_epochs():
    corpus = _synthetic(list(range(3, 20)))
    make = lambda seed=0: data.BatchIterator(corpus, batch_size=2, seq_len=8, packing=True, seed=seed)
    a, b = make(), make()
    first = [next(a) for _ in range(5)]
    for x, y in zip(first, [next(b) for _ in range(5)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    state = json.loads(json.dumps(a.state()))  # survives a checkpoint round trip
    expected = [next(a) for _ in range(2 * a.steps_per_epoch)]  # crosses epoch boundaries
    c = make()
    c.restore(state)
    for x, y in zip(expected, [next(c) for _ in range(len(expected))]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a.epoch == 2 + 5 // a.steps_per_epoch
    other = make(seed=1)
    assert any((x["tokens"] != next(other)["tokens"]).any() for x in first)
    e0 = np.concatenate([a.batch(s)["tokens"] for s in range(a.steps_per_epoch)])
    e1 = np.concatenate([a.batch(s + a.steps_per_epoch)["tokens"] for s in range(a.steps_per_epoch)])
    assert (e0 != e1).any()  # each epoch reshuffles


def test_eval_pass_covers_every_document_once():
    corpus = _synthetic([4, 2, 7, 3, 5])
    it = data.BatchIterator(corpus, batch_size=2, seq_len=8, shuffle=False, repeat=False)
    batches = list(it)
    assert len(batches) == 3 and not batches[-1]["valid"][1].any()
    firsts = [b["tokens"][r, 0] for b in batches for r in range(2) if b["valid"][r, 0]]
    assert firsts == [1000, 2000, 3000, 4000, 5000]
    packed = list(data.BatchIterator(corpus, batch_size=2, seq_len=8, packing=True, shuffle=False, repeat=False))
    assert sum(int(b["valid"].sum()) for b in packed) == 21 and sum(int(b["loss_mask"].sum()) for b in packed) == 16


def test_ac_in_loss_switch(ac_tok):
    ac = ac_tok.convert_tokens_to_ids(AC_TOKEN)
    corpus = _corpus(ac_tok, [THREE], mode="ac")
    for in_loss in (True, False):
        b = data.BatchIterator(corpus, 1, 32, ac_id=ac, ac_in_loss=in_loss).batch(0)
        assert (b["labels"][b["loss_mask"]] == ac).sum() == (3 if in_loss else 0)
        assert b["loss_mask"].sum() == int(b["valid"].sum()) - 1 - (0 if in_loss else 3)


def test_too_small_for_one_batch():
    with pytest.raises(ValueError, match="does not fill one batch"):
        data.BatchIterator(_synthetic([3, 4]), batch_size=4, seq_len=8)


# ----------------------------------------------------------------------------- SFT and sources


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_sft_prompt_tokens_are_not_targets(ac_tok, tmp_path, mode):
    rows = [
        {"instruction": "Say yes.", "input": "", "output": "Yes! The cat sat."},
        {"instruction": "Count.", "input": "1, 2", "output": "3"},
        {"instruction": "Nothing.", "input": "", "output": ""},
    ]
    cfg = data.DataConfig(
        path=_write_jsonl(tmp_path / "sft.jsonl", rows),
        format="alpaca",
        seq_len=256,
        batch_size=2,
        shuffle=False,
        add_bos=True,
    )
    scheme = anchors.make_scheme(ac_tok, mode, add_bos=True)
    it = prepare.make_batches(cfg, ac_tok, scheme)
    assert it.corpus.stats.skipped == 1
    ac = scheme.ids[0]
    for r, row in enumerate(rows[:2]):
        b = it.batch(0)
        plen = int(it.corpus.prompt_len[r])
        ids = b["tokens"][r]
        prompt = encoding.Encoder(ac_tok, scheme).prompt(encoding.alpaca_prompt(row["instruction"], row["input"]))[0]
        assert ids[:plen].tolist() == prompt
        assert not b["loss_mask"][r, : plen - 1].any() and b["loss_mask"][r, plen - 1]
        n = int(b["valid"][r].sum())
        assert b["loss_mask"][r].sum() == n - plen and ids[n - 1] == ac_tok.eos_token_id
        response = ac_tok.decode(ids[plen:n], skip_special_tokens=True)
        assert response == row["output"]
        if mode == "ac":
            assert ids[plen - 1] == ac and ids[n - 2] == ac


def test_local_files_and_text_field(tiny_tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"body": "The cat sat."}, {"body": "Yes!"}, {"body": ""}])
    (tmp_path / "b.txt").write_text("A dog. A cat.\n")
    cfg = data.DataConfig(path=path, text_field="body")
    assert len(data.load_corpus(cfg)) == 3
    with pytest.raises(ValueError, match=r"needs column\(s\) \['text'\]; the dataset has \['body'\]"):
        data.tokenize_corpus(
            data.load_corpus(data.DataConfig(path=path)), tiny_tokenizer, anchors.make_scheme(tiny_tokenizer, "ep")
        )
    assert data.load_corpus(data.DataConfig(path=str(tmp_path / "*.txt")))["text"] == ["A dog. A cat.\n"]
    with pytest.raises(ValueError, match="files of one kind"):
        data.load_corpus(data.DataConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="split 'validation' of local files"):
        data.load_corpus(cfg, "validation")
    assert len(data.load_corpus(cfg, "train[:2]")) == 2


def test_json_files_whose_other_columns_differ(tmp_path):
    """RedPajama's files: `meta` has another structure in each source; only the text is read, in file order."""
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "A. B.", "meta": {"url": "x", "timestamp": "t"}}])
    _write_jsonl(
        tmp_path / "b.jsonl", [{"text": f"C{i}?", "meta": {"arxiv_id": "1", "timestamp": 3}} for i in range(3)]
    )
    cfg = data.DataConfig(path=str(tmp_path / "*.jsonl"))
    assert data.load_corpus(cfg)["text"] == ["A. B.", "C0?", "C1?", "C2?"]
    assert data.load_corpus(cfg, "train[-2:]")["text"] == ["C1?", "C2?"]
    assert data.load_corpus(cfg, "train[:25%]+train[-1:]")["text"] == ["A. B.", "C2?"]


@pytest.mark.parametrize(
    "path, message",
    [
        ("/nonexistent/corpus.jsonl", "no such file or directory"),
        ("./missing_dir", "no such file or directory"),
        ("/nonexistent/*.jsonl", "no files match"),
    ],
)
def test_missing_path(path, message):
    with pytest.raises(ValueError, match=message):
        data.load_corpus(data.DataConfig(path=path))


def test_hosts_read_their_rows_of_one_global_order(tiny_tokenizer, tmp_path):
    """Hosts holding rows {0, 1}, {2} and {3, 4} of a global batch of 5 together read exactly the batches of
    one process; validation past the end of the split is padding, never the first documents again."""
    texts = [f"Doc {i} says {'yes' if i % 2 else 'no'}." for i in range(12)]
    cfg = data.DataConfig(
        path=_write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]), seq_len=16, batch_size=5
    )
    scheme = anchors.make_scheme(tiny_tokenizer, "ep")
    for train in (True, False):
        whole = prepare.make_batches(cfg, tiny_tokenizer, scheme, train=train, split="train")
        hosts = [
            prepare.make_batches(cfg, tiny_tokenizer, scheme, train=train, split="train", rows=np.asarray(r))
            for r in ([0, 1], [2], [3, 4])
        ]
        for step in range(4):
            for k, v in whole.batch(step).items():
                np.testing.assert_array_equal(np.concatenate([h.batch(step)[k] for h in hosts]), v)
    assert whole.steps_per_epoch == 3
    seen = [
        tiny_tokenizer.decode(b["tokens"][r][b["valid"][r]]) for b in whole for r in range(5) if b["valid"][r].any()
    ]
    assert sorted(seen) == sorted(texts)
    assert not whole.batch(3)["valid"].any() and not whole.batch(2)["valid"][2:].any()


def test_embedded_corpus_splits():
    train, val = data.embedded_corpus("train")["text"], data.embedded_corpus("validation")["text"]
    train, val = list(train), list(val)
    assert len(train) >= 100 and 10 <= len(val) < len(train) / 5
    assert all(t.strip() for t in train + val) and list(data.embedded_corpus("validation")["text"]) == val
    paragraphs = lambda docs: {p for d in docs for p in d.split("\n\n") if len(p) > 80}
    assert not paragraphs(train) & paragraphs(val)  # held out: no shared paragraph
    assert sum(len(t.split()) for t in train + val) > 40_000
    with pytest.raises(ValueError, match="splits train and validation"):
        data.embedded_corpus("test")


def test_real_tokenizer_anchors():
    gguf_import = pytest.importorskip("anjax.io.gguf_import")
    path = gguf_import.default_model_path()
    if not path or not os.path.exists(path):
        pytest.skip("embedded GGUF model absent")
    tok = gguf_import.gguf_tokenizer(path)
    _, ep_ids = anchors.resolve_anchor_ids(tok, "ep", [".", "?", "!", ",", ";"])
    assert len(set(ep_ids)) == 5
    ac = anchors.add_ac_token(tok)
    assert ac == 49152
    ids = _enc(tok, "ac").document(THREE)
    assert ids.count(ac) == 3 and [t for t in ids if t != ac] == tok.encode(THREE, add_special_tokens=False)
