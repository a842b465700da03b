"""Dense vs block-sparse attention in the training step (forward + backward), side by side (not a test).

    python benchmarks/bench_attention.py [--lengths 512 2048 4096 8192] [--layers 4] [--steps 3]

Model: the SmolLM2-135M shape (hidden 576, 9 heads, 3 KV heads, head_dim 64, vocab 49153) with
`--layers` layers (random weights), fp32 (`--dtype`), batch 1, AnLLM-AC rows (~4% anchors, as the embedded
corpus) trained under the anchor mask, as `anjax.train.trainer` does. One step = value and gradient of
the summed token loss (no optimizer). For each length, dense and sparse are compiled and timed in
alternation (best of `--steps`, after one warm-up step), so the ratio is measured under the same
machine load. Memory: the compiled step's temporary buffers (XLA memory_analysis: activations kept
for the backward pass and workspace; parameters and gradients excluded, they are the same in both).
A configuration whose compiled temporaries exceed `--max-gib` is compiled but not run. The full
30-layer model (`--memory-layers`, layers scanned) is compiled only, for its memory.
First prints, per length and for EP and AC rows, the fraction of (query block, key block) pairs the Pallas
band kernels compute (`anjax.core.flash_kernels.band_blocks`) beside dense (`--blocks-only`: only that).
Prints a table and saves bench_attention.png and .json in benchmarks/results/ (or `--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import RESULTS, begin, pyplot, save

from anjax.core import flash_kernels, sparse_attention
from anjax.core.config import ModelConfig
from anjax.core.mask import token_metadata
from anjax.core.model import init_params
from anjax.train.trainer import loss_sums

ANCHOR_ID = 49152


EP_IDS = (13, 30, 0)  # stand-ins for ".", "?", "!" (ids change nothing but which tokens are anchors)


def anchor_ids(mode: str) -> tuple[int, ...]:
    return (ANCHOR_ID,) if mode == "ac" else EP_IDS


def packed_batch(mode: str, L: int, rng: np.random.Generator, rows: int = 1, pad: int = 0) -> dict[str, jax.Array]:
    """`rows` packed rows of L tokens: documents of 200-2,000 tokens, sentences of 4-48 tokens (crossing every
    block boundary), each closed by an anchor, an EP punctuation id or `<AC>` (`mode` ep | ac; ~4% anchors
    in AC as the embedded corpus), the last `pad` tokens padding (doc -1)."""
    ends = anchor_ids(mode)
    tokens = rng.integers(100, ANCHOR_ID, (rows, L)).astype(np.int32)
    doc = np.zeros((rows, L), np.int32)
    for r in range(rows):
        t, d = 0, 0
        while t < L:
            doc_end = min(L, t + int(rng.integers(200, 2000)))
            doc[r, t:doc_end] = d
            while t < doc_end:
                t = min(doc_end, t + int(rng.integers(4, 48)))
                tokens[r, t - 1] = ends[int(rng.integers(len(ends)))]
            d += 1
    valid = np.arange(L)[None, :] < L - pad
    doc = np.where(valid, doc, -1)
    return {
        k: jnp.asarray(v)
        for k, v in {
            "tokens": tokens,
            "doc": doc,
            "valid": np.broadcast_to(valid, (rows, L)),
            "labels": np.roll(tokens, -1, axis=1),
            "loss_mask": np.broadcast_to(valid, (rows, L)),
        }.items()
    }


def blocks_computed(mode: str, L: int, seed: int = 0) -> dict[str, float]:
    """Per kernel (GPU blocks of 64, TPU of 128): the (query block, key block) pairs the band kernel computes
    on a packed `mode` row of L tokens (what it consumes: `band_blocks`), as a fraction of the n^2 blocks of
    dense attention and of the n(n+1)/2 of causal flash attention."""
    batch = packed_batch(mode, L, np.random.default_rng(seed))
    meta = token_metadata(batch["tokens"], batch["valid"], batch["doc"], anchor_ids=anchor_ids(mode))
    start = sparse_attention.band_starts(meta, False)
    row = {"mode": mode, "seq_len": L, "anchors": int(meta.anchor.sum())}
    for name in flash_kernels.KERNELS:
        block = flash_kernels.block_multiple(flash_kernels.Kernel(name))
        n = L // block
        computed = int(flash_kernels.block_mask(flash_kernels.band_blocks(start, block)[0]).sum())
        row[f"{name}_blocks"] = computed
        row[f"{name}_of_dense"] = computed / n**2
        row[f"{name}_of_causal"] = computed / (n * (n + 1) / 2)
    return row


def print_blocks(rows: list[dict]) -> None:
    print("band kernel: (query block, key block) pairs computed, as a fraction of dense (n^2) / causal (n(n+1)/2)")
    print(
        f"{'mode':>4} {'seq':>6} {'anchors':>8} "
        + " ".join(f"{k + ' blocks':>11} {'of dense':>9} {'of causal':>9}" for k in flash_kernels.KERNELS)
    )
    for r in rows:
        cells = " ".join(
            f"{r[k + '_blocks']:>11} {r[k + '_of_dense']:>9.3f} {r[k + '_of_causal']:>9.3f}"
            for k in flash_kernels.KERNELS
        )
        print(f"{r['mode']:>4} {r['seq_len']:>6} {r['anchors']:>8} {cells}")


def compile_step(cfg: ModelConfig, params, batch):
    """The jitted, compiled value-and-gradient of the anchor-mask loss, and its temporary bytes."""
    step = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(cfg, p, b, False)[0]))
    compiled = step.lower(params, batch).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (best kept)")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument(
        "--tile",
        type=int,
        default=sparse_attention.TILE,
        help="sparse attention query tile in anchor mode (keys: a quarter of it; full mode and short blocks: 4x it)",
    )
    p.add_argument("--max-gib", type=float, default=8.0, help="run only steps whose temporaries fit in this")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the .json and .png")
    p.add_argument("--memory-layers", type=int, default=30, help="also compile (not run) this deep a model; 0: off")
    p.add_argument("--scan-layers", action="store_true", help="scan the layers (a deep model compiles faster)")
    p.add_argument("--blocks-only", action="store_true", help="only the kernels' fraction of blocks computed")
    args = p.parse_args()
    prov = begin(__file__)
    sparse_attention.TILE = args.tile
    blocks = [blocks_computed(mode, L, seed=L + len(mode)) for L in args.lengths for mode in ("ep", "ac")]
    print_blocks(blocks)
    if args.blocks_only:
        return

    base = ModelConfig(
        vocab_size=ANCHOR_ID + 1,
        num_layers=args.layers,
        dtype=args.dtype,
        anchor_mode="ac",
        anchor_tokens=("<AC>",),
        anchor_ids=(ANCHOR_ID,),
        scan_layers=args.scan_layers,
    )
    params = init_params(base, jax.random.PRNGKey(0))
    rows = []
    for L in args.lengths:
        batch = packed_batch("ac", L, np.random.default_rng(L))
        steps, row = {}, {"seq_len": L}
        for attention in ("dense", "sparse"):
            steps[attention], row[f"{attention}_temp_gib"] = compile_step(
                base.replace(attention=attention), params, batch
            )
            row[f"{attention}_temp_gib"] /= 2**30
        times = {a: [] for a in steps}
        for i in range(args.steps + 1):  # alternate dense and sparse: the same load for both
            for attention, compiled in steps.items():
                if row[f"{attention}_temp_gib"] > args.max_gib:
                    continue
                t = time.perf_counter()
                loss, grads = compiled(params, batch)
                jax.block_until_ready(grads)
                if i:
                    times[attention].append(time.perf_counter() - t)
                row[f"{attention}_loss"] = float(loss)
        for attention in steps:
            row[f"{attention}_s"] = min(times[attention]) if times[attention] else None
        del steps
        if args.memory_layers:  # compile only, from abstract parameters
            deep = base.replace(num_layers=args.memory_layers, scan_layers=True)
            abstract = jax.eval_shape(functools.partial(init_params, deep), jax.random.PRNGKey(0))
            for attention in ("dense", "sparse"):
                _, temp = compile_step(deep.replace(attention=attention), abstract, batch)
                row[f"{attention}_temp_gib_deep"] = temp / 2**30
        rows.append(row)
        args.out.mkdir(parents=True, exist_ok=True)  # each length as it finishes (a time limit keeps the rest)
        (args.out / "bench_attention.json").write_text(json.dumps({"partial": True, "rows": rows}, indent=2))

    print(
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {args.dtype}, batch 1, SmolLM2-135M shape with "
        f"{args.layers} layers, sparse tile {args.tile}; step = loss + gradient, anchor mask; best of {args.steps}"
    )
    print(
        f"{'seq':>6} {'dense s':>8} {'sparse s':>9} {'speed-up':>9} {'dense GiB':>10} {'sparse GiB':>11} "
        f"{'mem ratio':>10} {'loss diff':>10}",
        end="",
    )
    deep_header = f"GiB dense / sparse / ratio at {args.memory_layers} layers"
    print(f" {deep_header:>40}" if args.memory_layers else "")
    fmt = lambda x, f: "n/a" if x is None else format(x, f)
    for r in rows:
        speed = r["dense_s"] / r["sparse_s"] if r["dense_s"] and r["sparse_s"] else None
        diff = abs(r["dense_loss"] - r["sparse_loss"]) if "dense_loss" in r and "sparse_loss" in r else None
        r["speedup"], r["mem_ratio"] = speed, r["sparse_temp_gib"] / r["dense_temp_gib"]
        print(
            f"{r['seq_len']:>6} {fmt(r['dense_s'], '8.2f'):>8} {fmt(r['sparse_s'], '9.2f'):>9} "
            f"{fmt(speed, '8.2f') + 'x':>9} {r['dense_temp_gib']:>10.2f} {r['sparse_temp_gib']:>11.2f} "
            f"{r['mem_ratio']:>10.2f} {fmt(diff, '10.1e'):>10}",
            end="",
        )
        if args.memory_layers:
            dense, sparse = r["dense_temp_gib_deep"], r["sparse_temp_gib_deep"]
            print(f" {dense:>20.2f} / {sparse:.2f} / {sparse / dense:.2f}", end="")
        print()

    meta = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "layers": args.layers,
        "memory_layers": args.memory_layers,
        "tile": args.tile,
        "steps": args.steps,
        "rows": rows,
        "kernel_blocks": blocks,
    }
    save(args.out / "bench_attention", meta, prov, plot=plot)


def plot(data: dict, file) -> None:
    rows = data["rows"]
    fig, (ax_t, ax_m) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    x = np.arange(len(rows))
    for offset, attention in ((-0.2, "dense"), (0.2, "sparse")):
        ax_t.bar(x + offset, [r[f"{attention}_s"] or 0 for r in rows], 0.4, label=attention)
        ax_m.bar(x + offset, [r[f"{attention}_temp_gib"] for r in rows], 0.4, label=attention)
    for ax, label in ((ax_t, "s / step (fwd + bwd)"), (ax_m, "compiled temporaries (GiB)")):
        ax.set_xticks(x, [str(r["seq_len"]) for r in rows])
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"dense vs sparse attention, {data['layers']}-layer SmolLM2-135M shape, {data['dtype']}, batch 1")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


if __name__ == "__main__":
    main()
