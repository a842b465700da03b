"""`python -m anjax.prepare`: documents -> anchored token ids, once, in parallel (`anjax.train.prepare`).

    python -m anjax.prepare --data 'data/redpajama/*.jsonl' --tokenizer MODEL --anchors ac \\
        --split 'train[:99.9%]' --eval-split 'train[99.9%:]' --out data/redpajama-ac

The directory holds splits `train` and (with --eval-split) `validation`: train with
`--set data.path=DIR data.split=train data.eval_split=validation`. A rerun resumes an interrupted
prepare shard by shard; the tokenizer and anchors (`--splitter` included) must be the model's (training
refuses others). DIR may be gs://bucket/... (encoded in a local staging copy, then uploaded).
"""

from __future__ import annotations

import argparse
import json
import sys

from anjax import cli
from anjax.core.config import ANCHOR_MODES, SENTENCE_SPLITTERS
from anjax.io import run_dir
from anjax.io.loading import load_tokenizer
from anjax.text import splitters
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.train import prepare
from anjax.train.data import DataConfig


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m anjax.prepare", description=cli.summary(__doc__))
    p.add_argument(
        "--data",
        default=None,
        help="local json/jsonl/txt/parquet files, dir or glob; a hub name; default: the embedded corpus",
    )
    p.add_argument("--name", default=None, help="hub dataset config name")
    p.add_argument("--split", default="train", help="source split prepared as `train` (slicing works)")
    p.add_argument("--eval-split", default=None, help="source split prepared as `validation` (default: none)")
    p.add_argument("--format", default="text", help="text | alpaca")
    p.add_argument("--text-field", default="text", help="column holding the text (format text)")
    p.add_argument("--text-sample-by", default="document", help=".txt files: document | paragraph | line")
    p.add_argument("--tokenizer", default=None, help="the model: HF dir, GGUF file or run dir (default: embedded)")
    p.add_argument("--anchors", required=True, help="ac | ep | none")
    p.add_argument("--anchor-tokens", nargs="+", default=None, help="EP anchor strings (default: . ? !)")
    p.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend BOS (default: as the tokenizer itself does)",
    )
    p.add_argument("--max-sentence-tokens", type=int, default=None, help="AC: an <AC> every N tokens of a sentence")
    p.add_argument(
        "--splitter",
        default="pysbd-en",
        help=f"AC sentence splitter, stored in the scheme: {' | '.join(SENTENCE_SPLITTERS)} (faster)",
    )
    p.add_argument("--out", required=True, help="the prepared directory, local or gs:// (data.path for training)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: every core)")
    p.add_argument("--shard-docs", type=int, default=prepare.SHARD_DOCS, help="documents per shard")
    args = p.parse_args(argv)

    if args.anchors not in ANCHOR_MODES:
        raise cli.UsageError(f"--anchors must be one of {'|'.join(ANCHOR_MODES)}, got {args.anchors!r}")
    if args.anchors == "ac" or args.splitter not in SENTENCE_SPLITTERS:  # the package matters where AC splits
        try:
            splitters.require(args.splitter)
        except ValueError as e:
            raise cli.UsageError(f"--splitter: {e}") from None
    cli.check_range("--workers", args.workers, 1)
    cli.check_range("--shard-docs", args.shard_docs, 1)
    cli.check_range("--max-sentence-tokens", args.max_sentence_tokens, 1)
    if run_dir.is_remote(run_dir.storage_path(args.out, "--out")):  # gs:// (another scheme:// is refused)
        cli.check_writable_dir(prepare.local_data_cache(), "the local staging cache")
    else:
        cli.check_writable_dir(args.out, "--out")
    cfg = DataConfig(
        path=args.data,
        name=args.name,
        format=args.format,
        text_field=args.text_field,
        text_sample_by=args.text_sample_by,
        num_proc=args.workers,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    if args.anchors == "ac":
        add_ac_token(tokenizer)
    scheme = make_scheme(tokenizer, args.anchors, args.anchor_tokens, args.bos, args.max_sentence_tokens, args.splitter)
    splits = {"train": args.split, **({"validation": args.eval_split} if args.eval_split else {})}
    log = lambda message: print(message, file=sys.stderr, flush=True)
    manifest = prepare.prepare(cfg, tokenizer, scheme, args.out, splits, shard_docs=args.shard_docs, log=log)
    counts = {
        k: {f: v[f] for f in ("documents", "skipped", "tokens", "anchors", "shards")}
        for k, v in manifest["counts"].items()
    }
    print(json.dumps({"out": args.out, "scheme": scheme.to_dict(), "counts": counts}, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
