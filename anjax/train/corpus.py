"""A larger offline training corpus: English prose from Debian's documentation packages.

    python -m anjax.corpus [--out data/corpus] [--cache data/corpus_cache]

Each package in `PACKAGES` is fetched with `apt-get download` (no root) and
unpacked with `dpkg-deb -x` into the cache (reused on a re-run). Every HTML page
becomes one document: the text of its paragraphs, list items and definitions
that read as prose (`html_paragraphs`, `is_prose`), without code blocks, tables,
navigation or scripts. Identical documents are kept once.

Decontamination (GPT-3 / lm-eval convention): a document is dropped when one of
its 13-grams (words of the lowercased text with punctuation deleted,
`words`) is a 13-gram of an evaluation document (all 8 tasks' scored and
demonstration documents, every text field of a document joined; LAMBADA too).

Validation is held out by document: sha256(f"{seed}:{doc_id}") decides, so the
split of a page never changes between builds. The output is a
`datasets.DatasetDict` saved with `save_to_disk` (splits train, validation,
column text), which `anjax.train.data.load_corpus` reads for `data.path=<out>`; it is
written to a temporary directory and moved into place, with the build summary in
`<out>/corpus_summary.json`.
"""

from __future__ import annotations

import glob
import hashlib
import html.parser
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

# package -> globs of its English HTML pages, relative to the unpacked package root
PACKAGES: dict[str, tuple[str, ...]] = {
    "python3.11-doc": ("usr/share/doc/python3.11/html/**/*.html",),
    "linux-doc-6.1": ("usr/share/doc/linux-doc-6.1/html/**/*.html",),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html/*.html",),
    "debian-handbook": ("usr/share/doc/debian-handbook/html/en-US/*.html",),
    "debian-reference-en": ("usr/share/debian-reference/*.en.html",),
    "gnu-standards": ("usr/share/doc/gnu-standards/*.html",),
    "git-doc": ("usr/share/doc/git-doc/*.html",),
    "python-django-doc": ("usr/share/doc/python-django-doc/html/**/*.html",),
    "gimp-help-en": ("usr/share/gimp/2.0/help/en/*.html",),
    "apache2-doc": ("usr/share/doc/apache2-doc/manual/en/**/*.html",),
    "sqlite3-doc": ("usr/share/doc/sqlite3/*.html",),
    "debian-policy": ("usr/share/doc/debian-policy/policy.html/*.html",),
    "debian-faq": ("usr/share/doc/debian/FAQ/*.en.html",),
    "maint-guide": ("usr/share/doc/maint-guide/html/*.en.html",),
}
SUMMARY_FILE = "corpus_summary.json"
NGRAM = 13
MIN_DOC_WORDS = 50

# ----------------------------------------------------------------------------- HTML -> prose

_SKIP_TAGS = {
    "script",
    "style",
    "pre",
    "table",
    "nav",
    "head",
    "header",
    "footer",
    "code-block",
    "svg",
    "math",
    "form",
    "select",
    "button",
    "samp",
    "kbd",
}
_SKIP_CLASS = re.compile(
    r"\b(sphinxsidebar|related|footer|header|headerlink|navheader|navfooter|nav-panel|"
    r"toc|toctree-wrapper|highlight|literal-block|listingblock|programlisting|screen|"
    r"synopsis|cmdsynopsis|funcsynopsis|example|verbatim|doctest|breadcrumb|"
    r"rst-versions|wy-nav-side|sig|versionmodified)\b"
)
_BLOCK_TAGS = {
    "p",
    "li",
    "dd",
    "dt",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "div",
    "td",
    "th",
    "section",
    "article",
    "body",
    "caption",
    "figcaption",
    "ul",
    "ol",
    "dl",
    "br",
    "hr",
    "tr",
}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "embed", "source"}


class _ProseParser(html.parser.HTMLParser):
    """Collects the text of block elements; skips the subtrees `_SKIP_TAGS` / `_SKIP_CLASS` name."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipping from here)
        self._buffer: list[str] = []

    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.paragraphs.append(text)
        self._buffer = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK_TAGS and not self._skipping():
            self._flush()
        if tag in _VOID_TAGS:
            return
        a = dict(attrs)
        skip = (
            self._skipping()
            or tag in _SKIP_TAGS
            or bool(_SKIP_CLASS.search(f"{a.get('class') or ''} {a.get('id') or ''}"))
        )
        self._stack.append((tag, skip))

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS or not any(t == tag for t, _ in self._stack):
            return
        while self._stack:
            if self._stack.pop()[0] == tag:
                break
        if tag in _BLOCK_TAGS and not self._skipping():
            self._flush()

    def handle_data(self, data):
        if not self._skipping():
            self._buffer.append(data)


def html_paragraphs(html: str) -> list[str]:
    """The whitespace-collapsed text blocks of an HTML page, outside code, tables and navigation."""
    parser = _ProseParser()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs


_SENTENCE_END = re.compile(r"[.!?:][\"')\]]?$")
_CODE_CHARS = set("{}[]()<>=;_/\\|$#*`~^@")


def is_prose(paragraph: str, min_words: int = 6) -> bool:
    """A paragraph of sentences: ≥ `min_words` words, ends like a sentence, starts with a
    letter, mostly letters, few code characters."""
    words = paragraph.split()
    if len(words) < min_words or not _SENTENCE_END.search(paragraph) or not paragraph[0].isalpha():
        return False
    visible = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    code = sum(c in _CODE_CHARS for c in visible)
    return letters >= 0.75 * len(visible) and code <= 0.03 * len(visible)


def html_document(html: str) -> str:
    """One document: the prose paragraphs of a page joined by blank lines ("" if it has none)."""
    return "\n\n".join(p for p in html_paragraphs(html) if is_prose(p))


# ----------------------------------------------------------------------------- 13-gram decontamination

_DELETE_PUNCT = str.maketrans("", "", string.punctuation)


def words(text: str) -> list[str]:
    """The lm-eval janitor's normal form: lowercased, punctuation deleted, split on whitespace."""
    return text.lower().translate(_DELETE_PUNCT).split()


def ngram_hashes(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the word n-grams of `text` (none when it has fewer than n words)."""
    w = words(text)
    return {hash(" ".join(w[i : i + n])) for i in range(len(w) - n + 1)}


def strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def contamination(documents: Iterable[str], eval_ngrams: set[int]) -> list[int]:
    """Per document, how many of its distinct 13-grams are evaluation 13-grams."""
    return [len(ngram_hashes(d) & eval_ngrams) for d in documents]


# ----------------------------------------------------------------------------- packages


def fetch_package(package: str, cache: Path) -> Path:
    """The unpacked root of `package` in `cache` (apt-get download + dpkg-deb -x, once)."""
    root = cache / "unpacked" / package
    if root.is_dir():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(debs / f"{package}_*.deb")):
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True, text=True)
    (deb,) = glob.glob(str(debs / f"{package}_*.deb"))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=root.parent))
    subprocess.run(["dpkg-deb", "-x", deb, str(tmp)], check=True, capture_output=True, text=True)
    os.replace(tmp, root)
    return root


def package_documents(package: str, root: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of each page of `package` with ≥ MIN_DOC_WORDS words of prose."""
    for pattern in PACKAGES[package]:
        for path in sorted(glob.glob(str(root / pattern), recursive=True)):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = html_document(f.read())
            if len(text.split()) >= MIN_DOC_WORDS:
                yield f"{package}/{os.path.relpath(path, root)}", text


def held_out(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether `doc_id` is in the validation split (stable: depends on the id and seed only)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ----------------------------------------------------------------------------- build


def _write(out: Path, splits: dict[str, list[str]], summary: dict) -> None:
    """Save the splits to `out` atomically; a previous build there is replaced, anything else refused."""
    import datasets

    if out.exists() and not (out / SUMMARY_FILE).is_file():
        raise ValueError(
            f"{out} exists and is not a corpus this script built ({SUMMARY_FILE} missing); choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(tmp))
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "corpus")
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def build(
    out: Path, cache: Path, packages: list[str], seed: int, validation_fraction: float, evaluation: list[str], tokenizer
) -> dict:
    """Fetch, extract, decontaminate against the `evaluation` texts, split, count (tokens of `tokenizer`)
    and save; returns the summary."""
    t0 = time.time()
    docs: dict[str, str] = {}  # text -> doc_id (identical pages kept once)
    per_package = {}
    for package in packages:
        n = 0
        for doc_id, text in package_documents(package, fetch_package(package, cache)):
            if text not in docs:
                docs[text], n = doc_id, n + 1
        per_package[package] = n
        print(f"{package}: {n} documents", file=sys.stderr)
    eval_ngrams = set().union(*(ngram_hashes(t) for t in evaluation))
    hits = contamination(docs, eval_ngrams)
    kept = {t: i for (t, i), h in zip(docs.items(), hits) if h == 0}
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for text, doc_id in sorted(kept.items(), key=lambda x: x[1]):
        splits["validation" if held_out(doc_id, seed, validation_fraction) else "train"].append(text)
    count = lambda texts: sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    summary = {
        "packages": per_package,
        "documents": {k: len(v) for k, v in splits.items()},
        "tokens": {k: sum(count(v[i : i + 1000]) for i in range(0, len(v), 1000)) for k, v in splits.items()},
        "words": {k: sum(len(t.split()) for t in v) for k, v in splits.items()},
        "eval_documents": len(evaluation),
        "eval_13grams": len(eval_ngrams),
        "contaminated_13grams": sum(hits),
        "contaminated_documents_dropped": sum(h > 0 for h in hits),
        "seed": seed,
        "validation_fraction": validation_fraction,
    }
    summary["wall_seconds"] = round(time.time() - t0, 1)
    _write(out, splits, summary)
    return summary
