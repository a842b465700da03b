"""The decode step's attention alone, XLA:CPU against PyTorch, side by side in one run.

    python -m benchmarks.investigations.cpu_decode.bench_decode_attention   # batch 1 and 16, 1k and 4k slots

One layer of SmolLM2-135M's decode attention (K = 3 KV heads, G = 3 query heads per KV head, head dim 64):
one query per row against C cached slots, softmax(q kᵀ / √D) v, called for 30 layers in a row, each layer with
its own keys and values (as a decode step reads them: from memory, not from the CPU's caches).
- xla: jitted `einsum` with the keys as the cache stores them, [B, K, C, D] (anjax's layout);
- xla, keys [D, C]: the same with the keys stored transposed (the q kᵀ operand in the dot's own layout);
- torch: the same einsums, and `scaled_dot_product_attention`, with --threads torch threads.
KV GB/s = keys and values read / time: the step is memory-bound, so this is its efficiency. -> OUT.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from anjax.io import outputs  # noqa: E402

HERE = Path(__file__).resolve().parent  # this investigation's result files
K, G, D, LAYERS = 3, 3, 64, 30  # SmolLM2-135M


def xla_attention(q_BxKxGxD, k, v_BxKxCxD, keys_dc: bool):
    scores = jnp.einsum("bkgd,bkdc->bkgc" if keys_dc else "bkgd,bkcd->bkgc", q_BxKxGxD, k) * D**-0.5
    return jnp.einsum("bkgc,bkcd->bkgd", jax.nn.softmax(scores, -1), v_BxKxCxD)


def xla_ms(B: int, C: int, keys_dc: bool, repeats: int) -> float:
    """ms per layer: LAYERS calls chained in one jitted function (each query is the last layer's output)."""
    rng = np.random.default_rng(0)
    layer = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    ks = [layer((B, K, D, C) if keys_dc else (B, K, C, D)) for _ in range(LAYERS)]
    vs = [layer((B, K, C, D)) for _ in range(LAYERS)]
    q = jnp.ones((B, K, G, D), jnp.float32)

    def layers(q, ks, vs):
        for k, v in zip(ks, vs):
            q = xla_attention(q, k, v, keys_dc)
        return q

    run = jax.jit(layers)
    jax.block_until_ready(run(q, ks, vs))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, ks, vs))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / LAYERS


def torch_ms(B: int, C: int, sdpa: bool, threads: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    ks, vs = ([torch.randn(B, K, C, D, generator=gen) for _ in range(LAYERS)] for _ in range(2))
    q = torch.ones(B, K, G, D)

    def attend(q, k, v):
        if sdpa:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        scores = torch.einsum("bkgd,bkcd->bkgc", q, k) * D**-0.5
        return torch.einsum("bkgc,bkcd->bkgd", torch.softmax(scores, -1), v)

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            x = q
            for k, v in zip(ks, vs):
                x = attend(x, k, v)
            best = min(best, time.perf_counter() - t0)
    return 1e3 * best / LAYERS


def markdown(rows: list[dict], args) -> str:
    head = (
        f"SmolLM2-135M decode attention (K={K}, G={G}, D={D}), one query per row, {jax.default_backend()}; "
        f"ms per layer, best of {args.repeats}; torch with {args.threads} threads\n\n"
        "| batch | slots | KV MB | xla | xla, keys [D, C] | torch einsum | torch sdpa | xla / best torch "
        "| xla KV GB/s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        torch_best = min(r["torch_einsum_ms"], r["torch_sdpa_ms"])
        lines.append(
            f"| {r['batch']} | {r['slots']} | {r['kv_mb']:.1f} | {r['xla_ms']:.2f} | {r['xla_keys_dc_ms']:.2f} | "
            f"{r['torch_einsum_ms']:.2f} | {r['torch_sdpa_ms']:.2f} | {r['xla_ms'] / torch_best:.2f} | "
            f"{r['kv_mb'] / r['xla_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--slots", type=int, nargs="+", default=[1024, 4096], help="KV cache slots per row")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "bench_decode_attention"), help="path stem for .json and .md")
    args = p.parse_args()
    if min(args.batches) < 1 or min(args.slots) < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--batches, --slots, --repeats and --threads must be >= 1")

    rows = []
    for B in args.batches:
        for C in args.slots:
            row = dict(batch=B, slots=C, kv_mb=2 * B * K * C * D * 4 / 1e6)
            row.update(
                xla_ms=xla_ms(B, C, False, args.repeats),
                xla_keys_dc_ms=xla_ms(B, C, True, args.repeats),
                torch_einsum_ms=torch_ms(B, C, False, args.threads, args.repeats),
                torch_sdpa_ms=torch_ms(B, C, True, args.threads, args.repeats),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    md = markdown(rows, args)
    print("\n" + md)
    out = Path(args.out)
    outputs.write_report(out.parent, out.name, md, {"args": vars(args), "rows": rows})
    print(f"saved {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
