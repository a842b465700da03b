"""Anchor settings: which token ids close a sentence.

AnLLM-EP uses endpoint punctuation tokens as anchors (default ".", "?", "!"),
AnLLM-AC a new special token `<AC>` that the data pipeline appends after every
sentence (`anjax.data`). The mask itself lives in `anjax.mask`.

CLI, to see how a text is segmented:

    python -m anjax.anchors --mode ac --text "One. Two? Three"        # table
    python -m anjax.anchors --mode ep --anchors . '?' '!' , --text "One, two. Three" --json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from anjax import cli
from anjax.config import AC_TOKEN, ANCHOR_MODES

EP_DEFAULT_TOKENS = (".", "?", "!")


def _single_id(tokenizer, token: str) -> int:
    """The one id that `token` encodes to (no special tokens), else ValueError."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"anchor {token!r} is not a single token: it tokenizes to {len(ids)} tokens "
                         f"{pieces} (ids {ids}); choose strings that are one token each")
    return int(ids[0])


def resolve_anchor_ids(tokenizer, mode: str, tokens=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(anchor token strings, their ids) for `mode` none | ep | ac.

    ep: `tokens` (default ".", "?", "!"), each must be exactly one token.
    ac: the `<AC>` special token, which must already be in the vocabulary
        (`add_ac_token`); `tokens` must be None or (AC_TOKEN,).
    """
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {mode!r}")
    if mode == "none":
        return (), ()
    if mode == "ac":
        if tokens not in (None, (), [], (AC_TOKEN,), [AC_TOKEN]):
            raise ValueError(f"anchor mode 'ac' uses only {AC_TOKEN}, got anchor tokens {list(tokens)}")
        ac_id = tokenizer.convert_tokens_to_ids(AC_TOKEN)
        if AC_TOKEN not in tokenizer.get_vocab() or ac_id is None or ac_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {AC_TOKEN} token; add it with anjax.anchors.add_ac_token(tokenizer) "
                             "and resize the embeddings with anjax.hf.resize_embeddings")
        return (AC_TOKEN,), (int(ac_id),)
    tokens = tuple(tokens) if tokens else EP_DEFAULT_TOKENS
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"anchor tokens repeat: {list(tokens)}")
    return tokens, tuple(_single_id(tokenizer, t) for t in tokens)


def add_ac_token(tokenizer) -> int:
    """Add `<AC>` as an additional special token (idempotent); return its id.

    The vocabulary may grow by one: resize the model's embeddings to
    `len(tokenizer)` (anjax.hf.resize_embeddings).
    """
    if AC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [AC_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(AC_TOKEN))


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line message on bad input)."""
    p = cli.ArgumentParser(prog="python -m anjax.anchors", description="Show how a text is cut into anchored sentences.")
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: the embedded model)")
    p.add_argument("--mode", required=True, help="ep | ac | none")
    p.add_argument("--anchors", nargs="+", default=None, help='EP anchor strings (default: . ? !)')
    p.add_argument("--text", required=True)
    p.add_argument("--max-sentence-tokens", type=int, default=None, help="AC: an <AC> every N tokens of a long sentence")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS (default: as the tokenizer itself does)")
    p.add_argument("--json", action="store_true", help='print {"ids", "tokens", "seg", "anchor"}')
    args = p.parse_args(argv)
    try:
        from anjax.data import encode_text, tokenizer_adds_bos
        from anjax.loading import load_tokenizer

        if not args.text.strip():
            raise ValueError("--text is empty")
        if args.mode not in ANCHOR_MODES:
            raise ValueError(f"--mode must be one of {ANCHOR_MODES}, got {args.mode!r}")
        cli.check_range("--max-sentence-tokens", args.max_sentence_tokens, 1)
        tokenizer = load_tokenizer(args.model)
        if args.mode == "ac":
            add_ac_token(tokenizer)
        _, anchor_ids = resolve_anchor_ids(tokenizer, args.mode, args.anchors)
        ids = encode_text(tokenizer, args.text, args.mode, anchor_ids[0] if args.mode == "ac" else None,
                          add_bos=tokenizer_adds_bos(tokenizer) if args.bos is None else args.bos,
                          max_sentence_tokens=args.max_sentence_tokens)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from anjax.mask import token_metadata

    ids_1xT = np.asarray([ids], np.int32)
    meta = token_metadata(ids_1xT, np.ones_like(ids_1xT, bool), None, anchor_ids=tuple(anchor_ids))
    seg, anchor = np.asarray(meta.seg[0]), np.asarray(meta.anchor[0])
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids), "seg": seg.tolist(),
                          "anchor": anchor.tolist()}))
        return 0
    print(f"{'i':>5} {'id':>7} {'seg':>4} {'anchor':>6}  text")
    for i, (t, s, a) in enumerate(zip(ids, seg, anchor)):
        print(f"{i:>5} {t:>7} {s:>4} {'*' if a else '':>6}  {tokenizer.decode([t])!r}")
    print(f"{len(ids)} tokens, {int(anchor.sum())} anchors, {int(seg[-1]) + 1 if len(ids) else 0} sentences")
    return 0


if __name__ == "__main__":
    cli.run(main)
