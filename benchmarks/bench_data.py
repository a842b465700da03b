"""Data rates against what training consumes (not a test): prepare tokens/s per core (EP, and AC with each
sentence splitter), loader tokens/s per host from a prepared corpus, and one v5p-64 host's consumption
running the 7B recipe.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_data.py [--data PATH] [--split train] [--tokenizer MODEL] \
        [--loader-batches 4]

Prepare: `anjax.train.prepare.prepare` with one process (one core) on the documents of --data (default:
the embedded corpus), in EP mode and in AC mode with each splitter of `anjax.text.splitters`; tokens/s
counts the ids written (AC: the <AC>s too). EP does not split sentences, so AC minus EP is the sentence
splitter's share; "1B tokens on 16 cores" assumes 16 worker processes at the per-core rate. An untimed EP
prepare runs first (the first one pays for loading and caching the source).
Loader: the AC corpus tiled into shards of ~8M ids until it holds --loader-batches global batches of
the 7B recipe (512 rows x 4,096, packed), opened memory-mapped as training opens it; one host of a
v5p-64 (16 hosts x 4 chips) reads its 32 rows of each global batch; tokens/s = 32 x 4,096 per batch.
Consumption: 512 x 4,096 tokens / 16 hosts / the step time of README's AOT table for v5p:4x4x4
(4.39 s, a roofline bound at 100% of peak: a real step is slower, so this overstates what a host needs).
On a shared machine the wall-clock rate includes waiting for a core; the CPU-time rate (the process's
own CPU seconds) is what one free core would do. Prints a table; saves benchmarks/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anjax.core.config import SENTENCE_SPLITTERS
from anjax.eval import provenance
from anjax.io.loading import load_tokenizer
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.train import prepare
from anjax.train.data import BatchIterator, CorpusStats, DataConfig, TokenizedCorpus

RESULTS = Path(__file__).parent / "results"
ROWS, SEQ_LEN, HOSTS = 512, 4096, 16  # configs/llama2-7b-*.yaml on v5p:4x4x4 (64 chips, 4 per host)
SHARD_TOKENS = 8_000_000


def prepare_rate(cfg: DataConfig, tokenizer, mode: str, splitter: str, split: str, out: Path) -> dict:
    """Prepare `split` in one process; its tokens, documents, wall and CPU seconds."""
    if mode == "ac":
        add_ac_token(tokenizer)
    scheme = make_scheme(tokenizer, mode, splitter=splitter)
    t0, cpu0 = time.perf_counter(), time.process_time()
    manifest = prepare.prepare(cfg, tokenizer, scheme, out, {"train": split}, workers=1, shard_docs=10**9)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    counts = manifest["counts"]["train"]
    return {
        "mode": mode,
        "splitter": splitter if mode == "ac" else None,
        "tokens": counts["tokens"],
        "documents": counts["documents"],
        "seconds": seconds,
        "cpu": cpu,
    }


def tiled(corpus: TokenizedCorpus, copies: int) -> TokenizedCorpus:
    """`copies` copies of `corpus` back to back."""
    tokens = np.tile(np.asarray(corpus.tokens[np.arange(len(corpus.tokens))], np.int32), copies)
    starts = np.arange(copies, dtype=np.int64)[:, None] * int(corpus.offsets[-1])
    offsets = np.concatenate([(corpus.offsets[:-1][None, :] + starts).reshape(-1), [len(tokens)]])
    stats = CorpusStats.total([corpus.stats] * copies)
    return TokenizedCorpus(tokens, offsets, np.tile(corpus.prompt_len, copies), stats)


def loader_rate(prepared: Path, batches: int, out: Path) -> dict:
    """Seconds per batch of one host's 32 rows (and of all 512 rows) from the tiled, memory-mapped corpus."""
    small = prepare.open_prepared(prepared, "train")
    per_shard = max(SHARD_TOKENS // small.stats.tokens, 1)
    shards = -(-batches * ROWS * (SEQ_LEN + 1) // (per_shard * small.stats.tokens))
    (out / "train").mkdir(parents=True)
    shard = tiled(small, per_shard)
    for k in range(shards):
        prepare.write_shard(prepare.shard_stem(out, "train", k), shard)
    plan = json.loads((prepared / prepare.PLAN).read_text())
    prepare.write_manifest(out, {**plan, "splits": {"train": f"{per_shard * shards} copies"}}, {"train": shards})
    corpus = prepare.open_prepared(out, "train")
    result = {"corpus_tokens": corpus.stats.tokens, "shards": shards}
    for name, rows in (("host", np.arange(ROWS // HOSTS)), ("global", None)):
        it = BatchIterator(corpus, ROWS, SEQ_LEN, packing=True, seed=0, rows=rows)
        steps = 2 * it.steps_per_epoch  # two epochs: each one computes its permutation once
        t0 = time.perf_counter()
        for step in range(steps):
            batch = it.batch(step)
        seconds = (time.perf_counter() - t0) / steps
        assert batch["valid"].all()
        result[name] = {
            "rows": len(it.rows),
            "seconds_per_batch": seconds,
            "tokens_per_s": len(it.rows) * SEQ_LEN / seconds,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="documents to prepare (default: the embedded corpus)")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", default=None, help="HF dir or GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--loader-batches", type=int, default=4, help="global batches in the loader's corpus")
    p.add_argument("--step-seconds", type=float, default=4.39, help="7B step on v5p:4x4x4 (README AOT table)")
    args = p.parse_args(argv)
    prov = provenance.begin("python benchmarks/bench_data.py", argv)
    cfg = DataConfig(path=args.data)
    runs = [("ep", SENTENCE_SPLITTERS[0])] + [("ac", s) for s in SENTENCE_SPLITTERS]
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        tmp = Path(tmp)
        prepare_rate(cfg, load_tokenizer(args.tokenizer), "ep", SENTENCE_SPLITTERS[0], args.split, tmp / "warm-up")
        rates = [prepare_rate(cfg, load_tokenizer(args.tokenizer), m, s, args.split, tmp / f"{m}-{s}") for m, s in runs]
        loader = loader_rate(tmp / f"ac-{SENTENCE_SPLITTERS[0]}", args.loader_batches, tmp / "loader")
    consume = ROWS * SEQ_LEN / HOSTS / args.step_seconds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"
    )
    print("| measure | tokens/s | per | vs one v5p-64 host's consumption |")
    print("|---|---|---|---|")
    for r in rates:
        for clock in ("seconds", "cpu"):
            rate = r["tokens"] / r[clock]
            how = f"AC, {r['splitter']}" if r["splitter"] else r["mode"].upper()
            print(
                f"| prepare {how} ({r['documents']} documents, {r['tokens']:,} ids; "
                f"{r[clock]:.1f} s {'wall' if clock == 'seconds' else 'of CPU'}) "
                f"| {rate:,.0f} | core | 1B tokens on 16 cores: {1e9 / (rate * 16) / 60:.0f} min |"
            )
    for name in ("host", "global"):
        x = loader[name]
        print(
            f"| loader, {x['rows']} rows x {SEQ_LEN} of each global batch ({x['seconds_per_batch'] * 1e3:.1f} ms) "
            f"| {x['tokens_per_s']:,.0f} | host | {x['tokens_per_s'] / consume:.0f}x |"
        )
    print(
        f"| 7B recipe on v5p-64: {ROWS} x {SEQ_LEN} / {HOSTS} hosts / {args.step_seconds} s "
        f"| {consume:,.0f} | host | 1x |"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "prepare": rates,
        "loader": loader,
        "consumption_per_host": consume,
        "step_seconds": args.step_seconds,
        "provenance": prov.finish(),
    }
    (RESULTS / "bench_data.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
