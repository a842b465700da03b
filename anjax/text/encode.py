"""The encoder: text → token ids with the anchors of an `AnchorScheme`, for every path.

Training documents (`anjax.train.data`), engine prompts (`anjax.inference.engine.Engine.encode`),
scoring contexts and continuations (`anjax.inference.scoring`), perplexity texts and the
lm-eval adapter all call `Encoder`, so the same text gives the same ids and anchor
flags everywhere. No heavy imports (the splitter's package on first use; the tokenizer is passed in).

The rules (named in the scheme: splitter "pysbd-en" | "sentencex-en", final_sentence "terminated"):
- Sentences: `split_sentences` by the scheme's splitter (`anjax.text.splitters`; a blank line always ends one).
- AC: `<AC>` after every sentence; the text is tokenized with the `<AC>`s in it, so
  each sentence is tokenized as in running text. A literal "<AC>" becomes an anchor.
  `max_sentence_tokens=N`: also an `<AC>` after every N tokens without one.
- EP, none: the plain tokenization (EP's anchors are punctuation ids in running text).
- BOS (`scheme.add_bos`) is prepended last and is never counted as a sentence token.
- The final sentence: a *document* (training text, a perplexity passage, a scored
  context + continuation) is complete, so its last sentence is closed. A *prompt*
  (generation) closes its last sentence iff `ends_sentence(text)`: it ends, trailing
  whitespace aside, with . ? ! … (optionally followed by closing quotes or brackets),
  or with a line break (the Alpaca prompt's "### Response:\\n"). A prompt cut from a
  document at such a sentence boundary thus encodes to that document's own prefix —
  where the splitter splits the prompt alone as it splits it inside the document (pysbd looks
  ahead: "Mr...." alone is one sentence, "Mr.", "..." before more text).
- Continuations (`pair`): lm-eval's split, `whole = document(context + continuation)`,
  context = the prefix of `whole` up to the last token that starts inside the context
  text, plus the `<AC>` that training puts right after it; continuation = the rest. Continuations therefore
  carry `<AC>` exactly where training puts them in the whole text; an `<AC>` is fed
  to the model but is never a scored target (it is not text).
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Sequence

from anjax.core.config import AC_TOKEN
from anjax.text.anchors import AnchorScheme
from anjax.text.splitters import WINDOWS, sentence_ends

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_LINE_BREAK = re.compile(r"(?<!\n)\n(?!\n)")
_SENTENCE_END = re.compile(r"(?:[.?!…][\"'”’»)\]]*|\n)\s*\Z")


_BLANK_LINE = re.compile(r"(?<=\S)\s*\n[^\S\n]*\n")


def split_sentences(text: str, splitter: str = "pysbd-en") -> list[str]:
    """The sentences of `text` by `splitter` (`anjax.text.splitters`), cut so that `"".join(result) == text`,
    in time linear in its length.

    Whitespace between two sentences opens the next one (" Next."), as BPE
    tokenizers attach a space to the following word. A single newline is read as
    a space (hard-wrapped paragraphs); a blank line always ends a sentence, so
    paragraphs are split one by one. A paragraph longer than the splitter's window
    (`splitters.WINDOWS`) is read a window at a time: the window's sentences that end
    in its first three quarters are kept (at least one, never the last: splitters look
    ahead) and the next window starts after them; a window holding no sentence end is
    cut at its last whitespace.
    """
    ends, window = sentence_ends(splitter), WINDOWS[splitter]
    cuts = [0, *(m.start() for m in _BLANK_LINE.finditer(text)), len(text)]
    return [s for a, b in zip(cuts[:-1], cuts[1:]) for s in _split_paragraph(text[a:b], ends, window)]


def _split_paragraph(text: str, ends: Callable[[str], list[int]], window: int | None) -> list[str]:
    """`_split_window` over windows of `text` (bounded work per window)."""
    out = []
    while window is not None and len(text) > window:
        head = _split_window(text[:window], ends)
        head_ends = list(itertools.accumulate(map(len, head[:-1])))  # the last sentence may go on past the window
        n = max(bisect.bisect_right(head_ends, window - window // 4), min(len(head_ends), 1))
        if n:
            out, taken = out + head[:n], head_ends[n - 1]
        else:  # no sentence end in a whole window: cut before its last whitespace (which opens the rest)
            taken = max(text.rfind(" ", 1, window), text.rfind("\n", 1, window))
            taken = taken if taken > 0 else window
            out.append(text[:taken])
        text = text[taken:]
    return out + _split_window(text, ends)


def _split_window(text: str, ends: Callable[[str], list[int]]) -> list[str]:
    """`text` cut after each sentence end that `ends` finds in it (single line breaks read as spaces)."""
    last = len(text.rstrip())
    cuts = [0]
    for end in ends(_LINE_BREAK.sub(" ", text)):
        if cuts[-1] < end < last:
            cuts.append(end)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def ends_sentence(text: str) -> bool:
    """A prompt's last sentence is closed: it ends with . ? ! … (+ closing quotes/brackets) or a line break."""
    return bool(_SENTENCE_END.search(text))


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt; the response follows it directly."""
    if input and input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _long_sentence_cuts(ids: list[int], ac_id: int, n: int) -> list[int]:
    """Indices of `ids` before which an `ac_id` goes so that no sentence runs longer than `n` tokens."""
    cuts, run = [], 0
    for i, t in enumerate(ids):
        if t == ac_id:
            run = 0
        elif run == n:
            cuts.append(i)
            run = 1
        else:
            run += 1
    return cuts


def _insert_at(xs: list, cuts: list[int], value) -> list:
    """`xs` with `value` inserted before each index in `cuts` (ascending)."""
    out, prev = [], 0
    for c in cuts:
        out += xs[prev:c] + [value]
        prev = c
    return out + xs[prev:]


class Encoder:
    """Text → ids under one `AnchorScheme` (module docstring: the rules)."""

    def __init__(self, tokenizer, scheme: AnchorScheme):
        if scheme.mode == "ac" and tokenizer.convert_tokens_to_ids(AC_TOKEN) != scheme.ac_id:
            raise ValueError(
                f"anchor mode 'ac' needs {AC_TOKEN} as id {scheme.ac_id} in the tokenizer: "
                "add it with anjax.text.anchors.add_ac_token"
            )
        self.tokenizer, self.scheme = tokenizer, scheme

    # ------------------------------------------------------------------ the one pipeline

    def _marked(self, text: str, close: bool) -> tuple[str, list[int]]:
        """(text with `<AC>` after each sentence (AC mode; the last one iff `close`), each sentence's start)."""
        if self.scheme.mode != "ac":
            return text, [0]
        sentences = split_sentences(text, self.scheme.splitter)
        starts = [0]
        for sentence in sentences[:-1]:
            starts.append(starts[-1] + len(sentence))
        return AC_TOKEN.join(sentences) + (AC_TOKEN if close and sentences else ""), starts

    def _finish(self, ids: list[int], flags: list[bool], bos: bool = True) -> tuple[list[int], list[bool]]:
        """Long-sentence `<AC>`s, then BOS (not counted in a sentence); each flag stays with its id, new ids False."""
        s = self.scheme
        if s.max_sentence_tokens and s.ac_id is not None:  # max_sentence_tokens implies AC (`AnchorScheme`)
            cuts = _long_sentence_cuts(ids, s.ac_id, s.max_sentence_tokens)
            ids, flags = _insert_at(ids, cuts, s.ac_id), _insert_at(flags, cuts, False)
        if bos and s.add_bos and s.bos_id is not None:  # add_bos implies a bos_id (`AnchorScheme`)
            ids, flags = [s.bos_id, *ids], [False, *flags]
        return ids, flags

    def _texts(self, texts: Sequence[str], close: bool, bos: bool = True) -> list[list[int]]:
        if not texts:
            return []
        marked = [self._marked(t, close)[0] for t in texts]
        rows = self.tokenizer(marked, add_special_tokens=False)["input_ids"]
        return [self._finish(list(x), [False] * len(x), bos)[0] for x in rows]

    # ------------------------------------------------------------------ kinds of text

    def documents(self, texts: Sequence[str], bos: bool = True) -> list[list[int]]:
        """Complete texts (training documents, passages): every sentence closed. Tokenized in one batch."""
        return self._texts(texts, close=True, bos=bos)

    def document(self, text: str, bos: bool = True) -> list[int]:
        return self.documents([text], bos)[0]

    def prompt(self, text: str, protect: Sequence[str] = ()) -> tuple[list[int], list[bool]]:
        """(ids of a generation prompt, per id: it overlaps an occurrence of a `protect` string).

        The last sentence is closed iff `ends_sentence(text)`. Every occurrence of each
        `protect` string is flagged; one that does not occur is an error.
        """
        spans = []
        for s in protect:
            if not isinstance(s, str) or not s or s not in text:
                raise ValueError(f"protected text {s!r} does not occur in the prompt")
            spans += [(m.start(), m.end()) for m in re.finditer(re.escape(s), text)]
        marked, starts = self._marked(text, ends_sentence(text))
        if self.scheme.mode == "ac":  # the spans' places in the text with <AC>s inserted
            shift = lambda i: i + len(AC_TOKEN) * (bisect.bisect_right(starts, i) - 1)
            spans = [(shift(a), shift(b - 1) + 1) for a, b in spans]
        if not spans:
            ids = list(self.tokenizer(marked, add_special_tokens=False)["input_ids"])
            return self._finish(ids, [False] * len(ids))
        enc = self.tokenizer(marked, add_special_tokens=False, return_offsets_mapping=True)
        flags = [any(a < e and s < b for a, b in spans) for s, e in enc["offset_mapping"]]
        return self._finish(list(enc["input_ids"]), flags)

    def alpaca(self, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
        """SFT: (prompt ids, response ids); the prompt ends with a line break, so it is closed like any prompt."""
        prompt = self.prompt(alpaca_prompt(instruction, input or ""))[0]
        return prompt, self.document(output, bos=False)

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's `_encode_pair` splits them, anchored as one document.

        Trailing whitespace of the context moves to the continuation. An empty context is
        the prefix token alone (BOS, else EOS), as in the harness.
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        tok = self.tokenizer
        if not context:
            prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            return [prefix], self.document(continuation, bos=False)
        marked, starts = self._marked(context + continuation, close=True)
        end = len(context) + len(AC_TOKEN) * (bisect.bisect_right(starts, len(context) - 1) - 1)
        enc = tok(marked, add_special_tokens=False, return_offsets_mapping=True)
        whole, in_context = self._finish(list(enc["input_ids"]), [s < end for s, _ in enc["offset_mapping"]])
        n = max(i + 1 for i, f in enumerate(in_context) if f) if any(in_context) else int(self.scheme.add_bos)
        if self.scheme.mode == "ac" and n < len(whole) and whole[n] == self.scheme.ac_id:
            n += 1
        return whole[:n], whole[n:]

    def anchor_flags(self, ids: Sequence[int]) -> list[bool]:
        """Per id: it is an anchor of the scheme."""
        anchors = set(self.scheme.ids)
        return [i in anchors for i in ids]
