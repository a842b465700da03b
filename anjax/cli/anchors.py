"""`python -m anjax.anchors`: how a text is cut into anchored sentences (`anjax.text.anchors`).

python -m anjax.anchors --mode ac --text "One. Two? Three"        # table
python -m anjax.anchors --mode ep --anchors . '?' '!' , --text "One, two. Three" --json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from anjax import cli
from anjax.core.config import ANCHOR_MODES
from anjax.core.mask import token_metadata
from anjax.io.loading import load_tokenizer
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.text.encode import Encoder


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line message on bad input)."""
    p = cli.ArgumentParser(
        prog="python -m anjax.anchors", description="Show how a text is cut into anchored sentences."
    )
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: the embedded model)")
    p.add_argument("--mode", required=True, help="ep | ac | none")
    p.add_argument("--anchors", nargs="+", default=None, help="EP anchor strings (default: . ? !)")
    p.add_argument("--text", required=True)
    p.add_argument(
        "--max-sentence-tokens", type=int, default=None, help="AC: an <AC> every N tokens of a long sentence"
    )
    p.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend BOS (default: as the tokenizer itself does)",
    )
    p.add_argument("--json", action="store_true", help='print {"ids", "tokens", "seg", "anchor"}')
    args = p.parse_args(argv)
    try:
        if not args.text.strip():
            raise ValueError("--text is empty")
        if args.mode not in ANCHOR_MODES:
            raise ValueError(f"--mode must be one of {ANCHOR_MODES}, got {args.mode!r}")
        cli.check_range("--max-sentence-tokens", args.max_sentence_tokens, 1)
        tokenizer = load_tokenizer(args.model)
        if args.mode == "ac":
            add_ac_token(tokenizer)
        scheme = make_scheme(tokenizer, args.mode, args.anchors, args.bos, args.max_sentence_tokens)
        ids = Encoder(tokenizer, scheme).document(args.text)
        anchor_ids = scheme.ids
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ids_1xT = np.asarray([ids], np.int32)
    meta = token_metadata(ids_1xT, np.ones_like(ids_1xT, bool), None, anchor_ids=tuple(anchor_ids))
    seg, anchor = np.asarray(meta.seg[0]), np.asarray(meta.anchor[0])
    if args.json:
        print(
            json.dumps(
                {
                    "ids": ids,
                    "tokens": tokenizer.convert_ids_to_tokens(ids),
                    "seg": seg.tolist(),
                    "anchor": anchor.tolist(),
                }
            )
        )
        return 0
    print(f"{'i':>5} {'id':>7} {'seg':>4} {'anchor':>6}  text")
    for i, (t, s, a) in enumerate(zip(ids, seg, anchor)):
        print(f"{i:>5} {t:>7} {s:>4} {'*' if a else '':>6}  {tokenizer.decode([t])!r}")
    print(f"{len(ids)} tokens, {int(anchor.sum())} anchors, {int(seg[-1]) + 1 if len(ids) else 0} sentences")
    return 0
