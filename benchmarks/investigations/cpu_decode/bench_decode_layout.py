"""Which layout lets a CPU decode step read weights and KV once? Three layer loops, side by side in one run.

    python -m benchmarks.investigations.cpu_decode.bench_decode_layout   # SmolLM2-135M shapes, batch 1 and 16

A decode step of SmolLM2-135M's shapes (30 layers, fused q/k/v and gate/up matrices, a KV cache of --slots slots,
random fp32 weights; the LM head left out), --steps steps in one `lax.fori_loop`, in three layouts:
- scan: `lax.scan` over stacked [L, ...] weights and cache (anjax's layout: one layer body to compile);
- unrolled + stacked: a Python loop over the layers, the cache stacked [L, ...];
- unrolled + split: a Python loop, one cache buffer per layer.
XLA:CPU copies what a layer reads out of a stacked array (`dynamic-slice` / `slice` fusions) and copies the
stacked cache again where a loop iteration both reads and updates it; only the split layout reads each weight
and KV slot once. GB/s = (weights + keys and values) / step time; the machine's jitted sum and one large matvec
are measured in the same run for the roofline. -> OUT.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).resolve().parent  # this investigation's result files
L, E, F, H, K, D = 30, 576, 1536, 9, 3, 64  # SmolLM2-135M


def layer(x_BxE, w, k_BxKxCxD, v_BxKxCxD, pos):
    """One decoder layer for one token per row: its key/value written at slot `pos`, attention over every slot."""
    B = x_BxE.shape[0]
    qkv = x_BxE @ w["qkv"]
    q = qkv[:, : H * D].reshape(B, K, H // K, D)
    k = qkv[:, H * D : (H + K) * D].reshape(B, K, 1, D)
    v = qkv[:, (H + K) * D :].reshape(B, K, 1, D)
    k_BxKxCxD = jax.lax.dynamic_update_slice_in_dim(k_BxKxCxD, k, pos, axis=2)
    v_BxKxCxD = jax.lax.dynamic_update_slice_in_dim(v_BxKxCxD, v, pos, axis=2)
    probs = jax.nn.softmax(jnp.einsum("bkgd,bkcd->bkgc", q, k_BxKxCxD) / D**0.5, -1)
    x_BxE = x_BxE + jnp.einsum("bkgc,bkcd->bkgd", probs, v_BxKxCxD).reshape(B, H * D) @ w["o"]
    gu = x_BxE @ w["gu"]
    return x_BxE + (jax.nn.silu(gu[:, :F]) * gu[:, F:]) @ w["down"], k_BxKxCxD, v_BxKxCxD


def loops(stacked: dict, steps: int) -> dict:
    """{layout: f(x, keys, values) running `steps` decode steps}."""
    per_layer = [{n: w[i] for n, w in stacked.items()} for i in range(L)]

    def scan(x, keys, values):
        def step(s, c):
            def one(x, a):
                x, k, v = layer(x, a[0], a[1], a[2], s)
                return x, (k, v)

            x, (k, v) = jax.lax.scan(one, c[0], (stacked, c[1], c[2]))
            return x, k, v

        return jax.lax.fori_loop(0, steps, step, (x, keys, values))

    def unrolled_stacked(x, keys, values):
        def step(s, c):
            x, keys, values = c
            for i, w in enumerate(per_layer):
                x, k, v = layer(x, w, keys[i], values[i], s)
                keys, values = keys.at[i].set(k), values.at[i].set(v)
            return x, keys, values

        return jax.lax.fori_loop(0, steps, step, (x, keys, values))

    def unrolled_split(x, keys, values):
        def step(s, c):
            x, keys, values = c[0], list(c[1]), list(c[2])
            for i, w in enumerate(per_layer):
                x, keys[i], values[i] = layer(x, w, keys[i], values[i], s)
            return x, tuple(keys), tuple(values)

        return jax.lax.fori_loop(0, steps, step, (x, keys, values))

    return {"scan": scan, "unrolled + stacked": unrolled_stacked, "unrolled + split": unrolled_split}


def seconds(f, make_args, repeats: int) -> float:
    """Best wall time of f on fresh (donated) arguments, compile excluded."""
    jax.block_until_ready(f(*make_args()))
    best = float("inf")
    for _ in range(repeats):
        args = jax.block_until_ready(make_args())
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def machine_bandwidth(mb: int = 512) -> dict:
    """GB/s of a jitted sum over `mb` MB and of one [8192, 8192] matvec."""
    big, m, v = jnp.ones((mb * 2**20 // 4,)), jnp.ones((8192, 8192)), jnp.ones((8192,))
    total = seconds(jax.jit(jnp.sum), lambda: (big,), 5)
    matvec = seconds(jax.jit(jnp.matmul), lambda: (m, v), 5)
    return {"sum_gbs": big.size * 4 / total / 1e9, "matvec_gbs": m.size * 4 / matvec / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--slots", type=int, default=1280, help="KV cache slots per row")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "bench_decode_layout"), help="path stem for .json and .md")
    args = p.parse_args()
    if min(args.batches) < 1 or args.slots < args.steps or args.repeats < 1:
        p.error("need batches >= 1, --slots >= --steps and --repeats >= 1")

    keys = iter(jax.random.split(jax.random.key(0), 4))
    shapes = {"qkv": (L, E, (H + 2 * K) * D), "o": (L, H * D, E), "gu": (L, E, 2 * F), "down": (L, F, E)}
    stacked = {n: jax.random.normal(next(keys), s) * 0.02 for n, s in shapes.items()}
    weight_bytes = sum(w.size for w in stacked.values()) * 4
    machine = machine_bandwidth()
    rows = []
    for B in args.batches:
        shape = (L, B, K, args.slots, D)
        kv_bytes = 2 * L * B * K * args.slots * D * 4
        for name, f in loops(stacked, args.steps).items():
            split = name.endswith("split")

            def make_args(shape=shape, split=split, B=B):
                kv = (jnp.zeros(shape), jnp.zeros(shape))
                return (jnp.ones((B, E)), *(tuple(c) for c in kv)) if split else (jnp.ones((B, E)), *kv)

            step_s = seconds(jax.jit(f, donate_argnums=(1, 2)), make_args, args.repeats) / args.steps
            gbs = (weight_bytes + kv_bytes) / step_s / 1e9
            rows.append(dict(batch=B, layout=name, ms_per_step=1e3 * step_s, tok_s=B / step_s, gbs=gbs))
            print(json.dumps(rows[-1]), flush=True)
    md = markdown(rows, machine, args, weight_bytes)
    print("\n" + md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(f"saved {out.with_suffix('.json')} and .md")


def markdown(rows, machine, args, weight_bytes) -> str:
    lines = [
        f"SmolLM2-135M decode step shapes ({weight_bytes / 1e6:.0f} MB of layer weights, {args.slots} KV slots per "
        f"row), {jax.devices()[0].platform}; machine: jitted sum {machine['sum_gbs']:.1f} GB/s, one large matvec "
        f"{machine['matvec_gbs']:.1f} GB/s",
        "",
        "| batch | layout | ms / step | tok/s | GB/s read once | x scan |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    scan = {r["batch"]: r["tok_s"] for r in rows if r["layout"] == "scan"}
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['layout']} | {r['ms_per_step']:.2f} | {r['tok_s']:.1f} | {r['gbs']:.1f} | "
            f"{r['tok_s'] / scan[r['batch']]:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
