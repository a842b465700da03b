"""Why a batch-1 decode step's per-layer matvecs read their weights slower than one large matvec on XLA:CPU.

    python -m benchmarks.investigations.cpu_decode.bench_matvec   # SmolLM2-135M layer shapes, batch 1, every setting

A batch-1 decode step reads every weight once in small matrix-vector products (per layer: q/k/v fused
[E, 960], o [E, E], gate/up fused [E, 2F], down [F, E]: 1.3-7.1 MB each), one after the other. This runs
the 30 layers' matvecs with their elementwise glue (no attention, no LM head) as XLA:CPU compiles them, and
one matvec over a matrix of the same bytes, in separate processes that differ in one setting each:

- all cores: the default;
- one core: the process pinned to one core (`os.sched_setaffinity` before JAX starts);
- all cores, YNNPACK off: `--xla_cpu_experimental_ynn_fusion_type=` (XLA's own dot emitters);
- two host devices: `--xla_force_host_platform_device_count=2`, the layers tensor-parallel over them
  (`shard_map`: q/k/v split on E and summed, o split on its output, gate/up on F, down on F and summed).

Variants within a process: "layers" (weights [E, N] as the engine stores them, x @ W), "layers, W [N, E]"
(x contracted with the last axis, the layout of the one large matvec), "layers, halves" (each matrix as two
column halves: two independent dots XLA may run at once), the same bytes in 30 or 8 equal products (a chain
x -> x + tanh(x @ W)[:, :E]), "one large matvec"; with two host devices, "layers, one device" and "layers,
tensor parallel" (checked equal). GB/s = weight bytes / time, best of --repeats calls per round, best of
--rounds shuffled rounds. -> OUT.{json,md,png}
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from anjax.io import outputs
from benchmarks.investigations.cpu_decode.bench_decode_layout import E, F, H, K, L  # SmolLM2-135M

HERE = Path(__file__).resolve().parent  # this investigation's result files
N_QKV = (H + 2 * K) * (E // H)
SETTINGS = {  # name: (XLA_FLAGS added to the user's, one core)
    "all cores": ("", False),
    "one core": ("", True),
    "all cores, YNNPACK off": ("--xla_cpu_experimental_ynn_fusion_type=", False),
    "two host devices": ("--xla_force_host_platform_device_count=2", False),
}


def worker(setting: str, repeats: int) -> dict:
    """{"bytes": the layers' weight bytes, "seconds": {variant: best seconds}} for one setting (this process was
    started with its environment)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    weights = [
        {
            n: rng.standard_normal(s, np.float32) * 0.02
            for n, s in (("qkv", (E, N_QKV)), ("o", (E, E)), ("gu", (E, 2 * F)), ("down", (F, E)))
        }
        for _ in range(L)
    ]
    nbytes = sum(w.nbytes for layer in weights for w in layer.values())
    x_1xE = jnp.full((1, E), 0.1, jnp.float32)
    x_at_w = lambda a, w: a @ w  # the engine's layout: W [E, N]

    def chain(matvec):
        """30 layers: x -> x + o(tanh(qkv(x)[:E])) -> x + down(silu(g) * u), (g, u) = gate_up(x)."""

        def run(x, ws):
            for w in ws:
                x = x + matvec(jnp.tanh(matvec(x, w["qkv"])[:, :E]), w["o"])
                g, u = jnp.split(matvec(x, w["gu"]), 2, -1)
                x = x + matvec(jax.nn.silu(g) * u, w["down"])
            return x

        return jax.jit(run)

    if setting == "two host devices":
        one = jax.devices()[0]
        variants = {
            "layers, one device": functools.partial(chain(x_at_w), x_1xE, jax.device_put(weights, one)),
            "layers, tensor parallel": _tensor_parallel(weights, x_1xE),
        }
        got, want = (np.asarray(f()) for f in (variants["layers, tensor parallel"], variants["layers, one device"]))
        if not np.allclose(got, want, atol=1e-5):
            raise SystemExit(f"tensor parallel differs from one device by {np.abs(got - want).max()}")
    else:
        transposed = jax.tree.map(lambda w: jnp.asarray(np.ascontiguousarray(w.T)), weights)
        halves = jax.tree.map(lambda w: tuple(jnp.asarray(h.copy()) for h in np.split(w, 2, 1)), weights)
        big_RxC = jnp.asarray(rng.standard_normal((nbytes // 4 // 8192, 8192), np.float32))
        variants = {
            "layers": functools.partial(chain(x_at_w), x_1xE, jax.tree.map(jnp.asarray, weights)),
            "layers, W [N, E]": functools.partial(chain(lambda a, w: jnp.einsum("be,ne->bn", a, w)), x_1xE, transposed),
            "layers, halves": functools.partial(
                chain(lambda a, w: jnp.concatenate([a @ w[0], a @ w[1]], -1)), x_1xE, halves
            ),
            "one large matvec": functools.partial(jax.jit(jnp.matmul), big_RxC, jnp.ones((8192,), jnp.float32)),
        }
        for n in (30, 8):  # the same bytes in fewer, larger products: x -> x + tanh(x @ W)[:, :E]
            equal = [jnp.asarray(rng.standard_normal((E, nbytes // 4 // E // n), np.float32)) for _ in range(n)]
            f = jax.jit(lambda x, ws: functools.reduce(lambda x, w: x + jnp.tanh(x @ w)[:, :E], ws, x))
            variants[f"{n} products of {equal[0].nbytes / 1e6:.0f} MB"] = functools.partial(f, x_1xE, equal)
    for f in variants.values():
        jax.block_until_ready(f())  # compile
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name in random.sample(list(variants), len(variants)):
            t0 = time.perf_counter()
            jax.block_until_ready(variants[name]())
            best[name] = min(best[name], time.perf_counter() - t0)
    return {"bytes": nbytes, "seconds": best}


def _tensor_parallel(weights, x_1xE):
    """The chain over two devices (Megatron-style splits, `shard_map`); the output equals the one-device chain."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

    def split(w):  # each leaf [2, ...]: device i holds [i]
        g, u = (np.split(h, 2, 1) for h in np.split(w["gu"], 2, 1))
        return {
            "qkv": w["qkv"].reshape(2, E // 2, N_QKV),  # rows of E: partial sums
            "o": np.stack(np.split(w["o"], 2, 1)),  # output columns: gathered
            "gu": np.stack([np.concatenate(pair, 1) for pair in zip(g, u)]),  # device i: gate and up columns i
            "down": w["down"].reshape(2, F // 2, E),  # rows of F: partial sums
        }

    specs = [dict.fromkeys(("qkv", "o", "gu", "down"), P("tp"))] * L
    sharded = jax.device_put([split(w) for w in weights], jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    x = jax.device_put(x_1xE, NamedSharding(mesh, P()))

    def run(x, ws):
        i = jax.lax.axis_index("tp")
        for w in ws:
            x_half = jax.lax.dynamic_slice_in_dim(x, i * (E // 2), E // 2, 1)
            qkv = jax.lax.psum(x_half @ w["qkv"][0], "tp")
            x = x + jax.lax.all_gather(jnp.tanh(qkv[:, :E]) @ w["o"][0], "tp", axis=1, tiled=True)
            g, u = jnp.split(x @ w["gu"][0], 2, -1)
            x = x + jax.lax.psum((jax.nn.silu(g) * u) @ w["down"][0], "tp")
        return x

    f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), specs), out_specs=P(), check_vma=False))
    return lambda: f(x, sharded)


def run_setting(setting: str, repeats: int) -> dict:
    flags, one_core = SETTINGS[setting]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    cmd = [sys.executable, "-m", __spec__.name, "--worker", setting, "--repeats", str(repeats)]
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    root = Path(__file__).resolve().parents[3]  # where `benchmarks` imports from
    done = subprocess.run(cmd, env=env, preexec_fn=pin, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode:
        raise SystemExit(f"{setting}: worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="shuffled rounds over the settings (best of)")
    p.add_argument("--repeats", type=int, default=20, help="calls per variant per round (best of)")
    p.add_argument("--out", default=str(HERE / "bench_matvec"), help="path stem for .json, .md and .png")
    p.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        p.error("need --rounds >= 1 and --repeats >= 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return

    best: dict[tuple[str, str], float] = {}
    nbytes = 0
    for r in range(args.rounds):
        for setting in random.sample(list(SETTINGS), len(SETTINGS)):
            res = run_setting(setting, args.repeats)
            nbytes = res["bytes"]
            for variant, s in res["seconds"].items():
                best[setting, variant] = min(best.get((setting, variant), float("inf")), s)
            print(f"round {r + 1}: {setting}: {json.dumps(res['seconds'])}", flush=True)
    base = best["all cores", "layers"]
    rows = [
        dict(setting=s, variant=v, ms=t * 1e3, gb_s=nbytes / t / 1e9, vs_layers=base / t) for (s, v), t in best.items()
    ]
    rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["variant"]))
    md = markdown(rows, nbytes, args)
    print("\n" + md)
    out = Path(args.out)
    outputs.write_report(out.parent, out.name, md, {"args": vars(args), "bytes": nbytes, "rows": rows}, plot)
    print(f"saved {out.with_suffix('.json')}, .md and .png")


def markdown(rows: list[dict], nbytes: int, args) -> str:
    lines = [
        f"SmolLM2-135M's {L} layers of matvecs, batch 1, fp32 ({nbytes / 1e6:.0f} MB of weights), {os.cpu_count()} "
        f"cores; best of {args.rounds} x {args.repeats} calls; x = the layers on all cores / this",
        "",
        "| setting | variant | ms | GB/s | x layers, all cores |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['variant']} | {r['ms']:.2f} | {r['gb_s']:.1f} | {r['vs_layers']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, file) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.2))
    labels = [f"{r['setting']}: {r['variant']}" for r in rows]
    ax.barh(range(len(rows)), [r["gb_s"] for r in rows], color=[f"C{list(SETTINGS).index(r['setting'])}" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("weights read, GB/s")
    ax.set_title("batch-1 decode matvecs on XLA:CPU: 30 layers vs one large matvec")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)


if __name__ == "__main__":
    main()
