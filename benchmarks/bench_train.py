"""Training throughput and MFU of the sharded train step (not a test).

    python benchmarks/bench_train.py [--seq-len 512] [--batch-sizes 1 2 4] [--dtype float32]

Model: the SmolLM2-135M architecture (random weights; speed does not depend on
them) with AnSAN anchors. Model FLOPs per token = 6 x (matmul parameters incl.
the tied LM head) + 12 x layers x seq_len x heads x head_dim (attention scores
and values, forward + backward; the full L x L square is counted, as computed).
MFU = model FLOP/s / the machine's matmul peak, which the script measures
itself: a jitted 4096^3 matmul in the same dtype, best of 5, re-measured before
every configuration and at the end, the best kept. Step times are the best of
the timed steps too, so that on a shared machine both describe the hardware.
Prints a table and saves benchmarks/results/bench_train_<backend>.png and .json.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import RESULTS, begin, matmul_peak, pyplot, save

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.train.run_config import TrainSection
from anjax.train.trainer import Trainer


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    E, F, H, K, D, V = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    matmul_params = cfg.num_layers * (E * (H + 2 * K) * D + H * D * E + 3 * E * F) + E * V
    return 6 * matmul_params + 12 * cfg.num_layers * seq_len * H * D


def synthetic_batch(B: int, L: int, vocab: int, anchor_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens = rng.integers(3, vocab, (B, L)).astype(np.int32)
    tokens[rng.random((B, L)) < 0.04] = anchor_id  # ~ the embedded corpus's anchor share
    valid = np.ones((B, L), bool)
    return {
        "tokens": tokens,
        "doc": np.zeros((B, L), np.int32),
        "valid": valid,
        "labels": np.roll(tokens, -1, axis=1),
        "loss_mask": valid,
    }


def bench(cfg: ModelConfig, B: int, L: int, steps: int) -> float:
    """Seconds per train step: the best of `steps` timed steps after one compile step."""
    mesh = sharding.make_mesh(-1, 1, 1)
    trainer = Trainer(cfg, TrainSection(steps=steps + 1, warmup_steps=1), mesh)
    state = trainer.init_state()
    batch = sharding.host_batch_to_global(
        synthetic_batch(B, L, cfg.vocab_size, cfg.anchor_ids[0], np.random.default_rng(0)), mesh
    )
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        state, m = trainer.train_step(state, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--remat", default="none", help="none | full | dots")
    p.add_argument("--scan-layers", action="store_true")
    args = p.parse_args()
    prov = begin(__file__)

    backend = jax.default_backend()
    cfg = ModelConfig(
        vocab_size=49153,
        dtype=args.dtype,
        remat=args.remat,
        scan_layers=args.scan_layers,
        anchor_mode="ac",
        anchor_tokens=("<AC>",),
        anchor_ids=(49152,),
    )
    per_token = flops_per_token(cfg, args.seq_len)
    peaks, timings = [], []
    for B in args.batch_sizes:  # the peak is re-measured around every configuration; the best is kept
        peaks.append(matmul_peak(args.dtype))
        timings.append((B, bench(cfg, B, args.seq_len, args.steps)))
    peak = max(peaks + [matmul_peak(args.dtype)])
    print(
        f"{backend} ({jax.devices()[0].device_kind}), {jax.device_count()} device(s); "
        f"measured {args.dtype} matmul peak {peak / 1e9:,.1f} GFLOP/s; "
        f"model {per_token / 1e6:,.0f} MFLOP per training token at L={args.seq_len}"
    )
    print(f"{'batch':>5} {'seq':>5} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>6}")
    rows = []
    for B, dt in timings:
        tps = B * args.seq_len / dt
        row = {
            "batch": B,
            "seq_len": args.seq_len,
            "s_per_step": dt,
            "tokens_per_s": tps,
            "gflops": tps * per_token / 1e9,
            "mfu": tps * per_token / peak,
        }
        rows.append(row)
        print(f"{B:>5} {args.seq_len:>5} {dt:>8.2f} {tps:>10,.0f} {row['gflops']:>9,.1f} {100 * row['mfu']:>5.1f}%")

    meta = {
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "peak_gflops": peak / 1e9,
        "remat": args.remat,
        "scan_layers": args.scan_layers,
        "rows": rows,
    }
    save(RESULTS / f"bench_train_{backend}", meta, prov, plot=plot)


def plot(data: dict, file) -> None:
    rows = data["rows"]
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.bar([str(r["batch"]) for r in rows], [100 * r["mfu"] for r in rows])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['tokens_per_s']:,.0f} tok/s", (i, 100 * r["mfu"]), ha="center", va="bottom")
    ax.set_xlabel(f"batch (sequences of {data['seq_len']})")
    ax.set_ylabel(f"MFU, % of {data['peak_gflops']:,.0f} GFLOP/s")
    ax.set_title(f"SmolLM2-135M training, {data['backend']} {data['dtype']}")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


if __name__ == "__main__":
    main()
