"""Offline corpus builder: HTML -> prose, 13-gram decontamination, document split, output layout."""

import html
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anjax.cli import corpus as corpus_cli
from anjax.train import corpus, data

PAGE = """<html><head><title>Title words here</title><script>var x = "Hidden sentence in a script.";</script></head>
<body><div class="related">Navigation: previous page | next page | index of all modules here.</div>
<div class="body" role="main">
<h1>Sockets<a class="headerlink" href="#s">¶</a></h1>
<p>A socket is one endpoint of a two-way link between two programs on the network.</p>
<div class="highlight"><pre>sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # code.</pre></div>
<table><tr><td>This cell is a sentence inside a table and must go.</td></tr></table>
<ul><li>Each list item that reads as a sentence is kept as prose.</li><li>x = f(y)</li></ul>
<p>The <code>connect</code> method opens a connection &amp; blocks until it is made.<br>It returns None.</p>
<p>Short one.</p>
<p>{"json": [1, 2, 3], "key": value} is data, not prose at all.</p>
</div><div class="footer">Copyright 2001 the Python Software Foundation and its many contributors.</div>
</body></html>"""


def test_html_document_keeps_prose_only():
    assert corpus.html_document(PAGE).split("\n\n") == [
        "A socket is one endpoint of a two-way link between two programs on the network.",
        "Each list item that reads as a sentence is kept as prose.",
        "The connect method opens a connection & blocks until it is made.",
    ]


def test_html_paragraphs_skip_code_tables_navigation():
    paragraphs = corpus.html_paragraphs(PAGE)
    assert "Sockets" in paragraphs and "It returns None." in paragraphs
    joined = " ".join(paragraphs)
    for gone in ("Hidden", "Navigation", "sock =", "cell", "Copyright", "¶", "Title words"):
        assert gone not in joined


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=200))
@settings(max_examples=200, deadline=None)
def test_html_paragraphs_roundtrip_escaped_text(text):
    expect = [" ".join(text.split())] if text.split() else []
    assert corpus.html_paragraphs(f"<p>{html.escape(text)}</p>") == expect


@pytest.mark.parametrize(
    "paragraph, prose",
    [
        ("The quick brown fox jumps over the lazy dog.", True),
        ("Configure the server as follows:", False),  # 5 words
        ("Configure the new server exactly as follows:", True),
        ("see the socket module for details and more", False),  # no sentence end
        ("--enable-shared builds a shared library instead of a static one.", False),  # starts with a symbol
        ("Call foo(bar[0], {baz: 1}) and then qux(x=y) to get <z>.", False),  # code characters
        ("1234 5678 9012 3456 7890 1234 5678.", False),  # digits, not words
    ],
)
def test_is_prose(paragraph, prose):
    assert corpus.is_prose(paragraph) is prose


def test_words_normalisation():
    assert corpus.words("Don't PANIC: it's (only) a test—really!") == [
        "dont",
        "panic",
        "its",
        "only",
        "a",
        "test—really",
    ]


THIRTEEN = "one two three four five six seven eight nine ten eleven twelve thirteen"


def test_contamination_counts_shared_13grams():
    eval_ngrams = corpus.ngram_hashes(f"Question: {THIRTEEN} fourteen?")  # 2 distinct 13-grams
    docs = [
        "Intro text. ONE, two; three four five six seven eight nine ten eleven twelve Thirteen! Outro.",
        "one two three four five six seven eight nine ten eleven twelve",  # a 12-gram only
        f"{THIRTEEN} fourteen and {THIRTEEN} again",  # both, one repeated
        "Completely unrelated text about something else entirely with many more words than needed.",
    ]
    assert corpus.contamination(docs, eval_ngrams) == [1, 0, 2, 0]
    assert corpus.ngram_hashes("too short to have one") == set()


@given(st.text(max_size=80), st.text(max_size=80))
@settings(max_examples=100, deadline=None)
def test_contamination_found_inside_any_document(prefix, suffix):
    eval_ngrams = corpus.ngram_hashes(THIRTEEN)
    assert corpus.contamination([f"{prefix} {THIRTEEN.upper()} {suffix}"], eval_ngrams) == [1]


def test_held_out_is_stable_and_near_fraction():
    ids = [f"pkg/page{i}.html" for i in range(20000)]
    first = [corpus.held_out(i, 0, 0.02) for i in ids]
    assert first == [corpus.held_out(i, 0, 0.02) for i in ids]
    assert 0.015 < sum(first) / len(ids) < 0.025
    assert first != [corpus.held_out(i, 1, 0.02) for i in ids]


def test_output_is_read_by_load_corpus(tmp_path):
    out = tmp_path / "corpus"
    splits = {"train": ["First training document.", "Second one."], "validation": ["Held out."]}
    corpus._write(out, splits, {"documents": 3})
    cfg = data.DataConfig(path=str(out))
    assert data.load_corpus(cfg)["text"] == splits["train"]
    assert data.load_corpus(cfg, cfg.eval_split)["text"] == splits["validation"]
    corpus._write(out, {"train": ["Rebuilt."], "validation": ["Again."]}, {"documents": 2})  # a rebuild replaces it
    assert data.load_corpus(cfg)["text"] == ["Rebuilt."]
    assert json.loads((out / corpus.SUMMARY_FILE).read_text()) == {"documents": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary left behind


def test_cli_refuses_foreign_output_and_bad_args(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a corpus this script built"):
        corpus._write(mine, {"train": ["x"], "validation": ["y"]}, {})
    assert (mine / "notes.txt").read_text() == "keep me"
    assert corpus_cli.main(["--packages", "nonexistent-doc"]) == 2
    assert corpus_cli.main(["--validation-fraction", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
