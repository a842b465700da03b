"""The sentence splitters an anchor scheme may name (`AnchorScheme.splitter`), as sentence-end offsets.

    pysbd-en      pysbd 0.3.4, English, rule-based (the default; pure Python, ~0.1 MB/s)
    sentencex-en  sentencex 1.0.32, English (Rust; ~50x faster, see docs/training.md for how often it
                  agrees with pysbd)

Each splitter maps a paragraph without line breaks to the ascending offsets just after its
sentences' last characters (trailing whitespace left to the next sentence). `anjax.text.encode`
wraps them in the one set of rules (paragraphs, `WINDOWS`, whitespace); packages are imported on
first use, so a scheme naming a splitter whose package is missing is refused by `require`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

from anjax.core.config import SENTENCE_SPLITTERS

PACKAGES = {"pysbd-en": "pysbd==0.3.4", "sentencex-en": "sentencex==1.0.32"}  # as pinned in requirements.txt
assert tuple(PACKAGES) == SENTENCE_SPLITTERS
# characters of a paragraph a splitter reads at once (None: the whole paragraph). pysbd's time grows faster than
# linearly with a paragraph's length, so no paragraph (a 2.7 MB one-line corpus) may cost more than its windows;
# sentencex is linear (2.7 MB in 0.1 s), and its quotes pair across any window, so it reads whole paragraphs.
WINDOWS = {"pysbd-en": 2000, "sentencex-en": None}


def require(name: str) -> None:
    """ValueError in one line if `name` is no known splitter or its package is not installed."""
    if name not in PACKAGES:
        raise ValueError(f"unknown sentence splitter {name!r}; known: {', '.join(PACKAGES)}")
    package = PACKAGES[name].split("==")[0]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"sentence splitter {name!r} needs the package {package}: pip install {PACKAGES[name]}")


def sentence_ends(name: str) -> Callable[[str], list[int]]:
    """The splitter `name` as `flat text -> ascending sentence-end offsets` (after `require`)."""
    require(name)
    return _ENDS[name]


@functools.lru_cache(maxsize=1)
def _pysbd():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _pysbd_ends(flat: str) -> list[int]:
    """pysbd's sentences located left to right (linear; pysbd's own `char_span` search is quadratic). A sentence
    pysbd altered is not found and so merges with the next."""
    ends = [0]
    for sentence in _pysbd().processor(flat).process():
        start = flat.find(sentence, ends[-1])
        if start >= 0:
            ends.append(start + len(sentence))
    return ends[1:]


def _sentencex_ends(flat: str) -> list[int]:
    import sentencex

    boundaries = sentencex.get_sentence_boundaries("en", flat)  # pyright: ignore[reportAttributeAccessIssue]  (no stubs)
    return [b["start_index"] + len(b["text"].rstrip()) for b in boundaries]


_ENDS = {"pysbd-en": _pysbd_ends, "sentencex-en": _sentencex_ends}
