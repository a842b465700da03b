"""`python -m anjax.cli.data`: statistics of the training data as a run config builds it (`anjax.train.data`)."""

from __future__ import annotations

import argparse
import sys
import time

from anjax import cli
from anjax.io.loading import load_tokenizer
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.train.data import BatchIterator, DataConfig, load_corpus, tokenize_corpus


def main(argv=None) -> int:
    """Print corpus statistics and pipeline speed: python -m anjax.cli.data --mode ac [--path ...] [--model ...]."""
    p = argparse.ArgumentParser(prog="python -m anjax.cli.data", description=main.__doc__)
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: the embedded model)")
    p.add_argument("--mode", default="ac", help="none | ep | ac")
    p.add_argument("--anchors", nargs="+", default=None, help="EP anchor strings")
    p.add_argument("--path", default=None, help="data source (default: embedded corpus)")
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--packing", action="store_true")
    args = p.parse_args(argv)

    try:
        tokenizer = load_tokenizer(args.model)
        if args.mode == "ac":
            add_ac_token(tokenizer)
        scheme = make_scheme(tokenizer, args.mode, args.anchors)
        cfg = DataConfig(
            path=args.path,
            split=args.split,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            packing=args.packing,
        )
        ds = load_corpus(cfg)
        t0 = time.perf_counter()
        corpus = tokenize_corpus(ds, tokenizer, scheme, cfg)
        t1 = time.perf_counter()
        it = BatchIterator(corpus, cfg.batch_size, cfg.seq_len, packing=cfg.packing)
        n = min(it.steps_per_epoch, 200)
        for _ in range(n):
            next(it)
        t2 = time.perf_counter()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = corpus.stats
    print(
        f"{args.mode}: {s.documents} documents ({s.skipped} skipped), {s.sentences} sentences, {s.tokens} tokens, "
        f"{s.anchors} anchors ({100 * s.anchor_share:.2f}% of tokens)"
    )
    print(
        f"speed: tokenize {t1 - t0:.2f} s, {s.tokens / (t1 - t0):,.0f} tokens/s; "
        f"batches: {n * cfg.batch_size * cfg.seq_len / (t2 - t1):,.0f} slots/s"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
