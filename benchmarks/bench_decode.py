"""Anchor vs full KV cache (and HF transformers) on SmolLM2-135M fp32: prefill, decode, KV bytes.

    python benchmarks/bench_decode.py                       # 1k/4k/16k prompts, batch 1/8/16
    python benchmarks/bench_decode.py --quick               # 1k/4k, batch 1/16, 16 new tokens

Prompts are real English (CPython's pydoc_data.topics), one window of the text per row.
Anchors: AnLLM-EP (. ? !). SmolLM2 was not trained with anchors, so the anchor run's text is not
meaningful; its speed and memory are (the computation is the same for a trained AnLLM).
Prefill is measured at batch 1 for each prompt length; decode at batch B starts from B copies
of that row's prefilled state (rows are independent, so the work per row is the same as for B
different prompts). KV bytes: the decode buffer (keys + values, all layers and rows); the
anchor prefill buffer is capacity + chunk slots per row whatever the prompt length.
HF transformers (torch CPU, same GGUF weights, greedy): batch 1, prompts up to --hf-max-length,
the best over torch thread counts --hf-threads; decode tok/s = new tokens / (time(1 + new
tokens) - time(1 token)).
Configurations whose full-cache KV would exceed --max-kv-gb are skipped. Timings on a shared
machine are noisy: each number is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing anjax

import jax
import jax.numpy as jnp

from anjax.inference.engine import Engine, EngineConfig, Prefilled
from anjax.io.loading import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def english_tokens(tokenizer, n: int) -> list[int]:
    """At least n token ids of English prose (the pydoc topics, repeated if needed)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def tile(pre: Prefilled, batch: int) -> Prefilled:
    """B copies of a one-row prefilled batch (the batch axis is 1 in stacked keys/values [L, B, K, C, D] and a
    policy's mass [L, B, K, C], 0 elsewhere: per-layer buffers [B, K, C, D] and every [B, ...] field)."""
    repeat = lambda axis: lambda x: jnp.repeat(x, batch, axis=axis)  # noqa: E731
    s = pre.state
    kv_axis = 0 if isinstance(s.cache.keys, tuple) else 1
    kv = {name: jax.tree.map(repeat(kv_axis), getattr(s.cache, name)) for name in ("keys", "values")}
    rows = jax.tree.map(repeat(0), s.replace(cache=s.cache.replace(keys=(), values=()), mass=None))
    state = rows.replace(cache=rows.cache.replace(**kv), mass=None if s.mass is None else repeat(1)(s.mass))
    return dataclasses.replace(pre, state=state, rows=pre.rows * batch, protected=pre.protected * batch, n=batch)


def bench_engine(engine: Engine, prompt: list[int], batches, args) -> dict:
    """{"prefill": tok/s at batch 1, B: {"decode": tok/s, "kv_mb": decode buffer MB, "held": slots}}."""
    capacity = args.anchor_capacity if engine.spec.anchor_cache else len(prompt) + args.new_tokens
    pres = [engine.prefill([prompt], 1, args.chunk_size, capacity) for _ in range(args.repeats)]
    out = {"prefill": max((len(prompt) - 1) / p.seconds for p in pres), "held": int(pres[0].state.cache.length[0])}
    pre = pres[-1]
    for b in batches:
        cfg = engine.cfg
        if 2 * cfg.num_layers * b * (capacity + 1) * cfg.num_kv_heads * cfg.head_dim * 4 / 1e9 > args.max_kv_gb:
            out[b] = None
            continue
        runs = []
        for _ in range(args.repeats):
            g = engine.decode(tile(pre, b), args.new_tokens)
            runs.append(
                (
                    sum(x.stats["generated_tokens"] for x in g) / g[0].stats["decode_s"],
                    g[0].stats["decode_buffer_bytes"] * b / 1e6,
                )
            )
        out[b] = {"decode": max(r[0] for r in runs), "kv_mb": runs[0][1]}
    return out


def hf_model():
    import torch
    import transformers

    from anjax.io.gguf_import import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def bench_hf(model, prompt: list[int], args) -> dict:
    """Best prefill and decode tok/s over the torch thread counts of --hf-threads."""
    import torch

    runs = []
    for threads in args.hf_threads:
        torch.set_num_threads(threads)
        runs.append(hf_run(model, torch.tensor([prompt]), args))
        print(f"HF transformers, {len(prompt)} tokens, {threads} torch threads: {json.dumps(runs[-1])}", flush=True)
    return {key: max((r[key] for r in runs if r[key]), default=None) for key in runs[0]}


def hf_run(model, ids, args) -> dict:
    import torch

    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t0

    run(1)  # warm-up
    first = min(run(1) for _ in range(args.repeats))
    total = min(run(args.new_tokens + 1) for _ in range(args.repeats))
    # decode: None when the difference of the two timings is lost in their noise (long prompts, busy machine)
    return {"prefill": ids.shape[1] / first, "decode": args.new_tokens / (total - first) if total > first else None}


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=EngineConfig.chunk_size)
    p.add_argument("--anchor-capacity", type=int, default=2048, help="slots an anchor-cache row may keep")
    p.add_argument("--hf-max-length", type=int, default=4096, help="longest prompt for the HF column (0: none)")
    p.add_argument(
        "--hf-threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch thread counts to try (best kept: 2 OpenMP threads suffer on a busy 2-core machine)",
    )
    p.add_argument("--max-kv-gb", type=float, default=6.0, help="skip full-cache runs whose KV exceeds this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1k/4k prompts, batch 1/16, 16 new tokens, 1 repeat")
    p.add_argument("--out", default=str(RESULTS / "bench_decode"), help="path stem for .json and .png")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.batches, args.new_tokens, args.repeats = [1024, 4096], [1, 16], 16, 1

    cfg, params, tokenizer = load_model(None, scan_layers=True)
    engines = {
        "anchor": Engine(cfg, params, tokenizer, config=EngineConfig(cache="anchor", anchor_mode="ep")),
        "full": Engine(cfg, params, tokenizer, config=EngineConfig(cache="full")),
    }
    text = english_tokens(tokenizer, max(args.lengths))
    hf_lengths = [n for n in args.lengths if n <= args.hf_max_length]
    peer = hf_model() if hf_lengths else None
    rows = []
    for length in args.lengths:
        prompt = text[:length]
        res = {kind: bench_engine(eng, prompt, args.batches, args) for kind, eng in engines.items()}
        hf = bench_hf(peer, prompt, args) if length in hf_lengths else None
        for b in args.batches:
            a, f = res["anchor"][b], res["full"][b]
            rows.append(
                dict(
                    length=length,
                    batch=b,
                    anchor_slots=res["anchor"]["held"],
                    prefill_anchor=res["anchor"]["prefill"] if b == 1 else None,
                    prefill_full=res["full"]["prefill"] if b == 1 else None,
                    prefill_hf=hf["prefill"] if hf and b == 1 else None,
                    decode_anchor=a and a["decode"],
                    decode_full=f and f["decode"],
                    decode_hf=hf["decode"] if hf and b == 1 else None,
                    kv_mb_anchor=a and a["kv_mb"],
                    kv_mb_full=f and f["kv_mb"],
                )
            )
            print(json.dumps(rows[-1]), flush=True)

    header = (
        "prompt batch | prefill tok/s anchor  full    HF | decode tok/s anchor   full     HF | "
        "anchor/full  full/HF | KV MB anchor    full | anchor slots"
    )
    print(
        f"\nSmolLM2-135M fp32, {jax.devices()[0].platform}, {args.new_tokens} new tokens, chunk {args.chunk_size}, "
        f"anchor capacity {args.anchor_capacity}\n{header}"
    )
    for r in rows:
        speed = r["decode_anchor"] / r["decode_full"] if r["decode_anchor"] and r["decode_full"] else None
        vs_hf = r["decode_full"] / r["decode_hf"] if r["decode_full"] and r["decode_hf"] else None
        print(
            f"{r['length']:>6} {r['batch']:>5} | {fmt(r['prefill_anchor']):>20} {fmt(r['prefill_full']):>5} "
            f"{fmt(r['prefill_hf']):>5} | {fmt(r['decode_anchor']):>19} {fmt(r['decode_full']):>6} "
            f"{fmt(r['decode_hf']):>6} | {fmt(speed, '.2f'):>11} {fmt(vs_hf, '.2f'):>8} | "
            f"{fmt(r['kv_mb_anchor']):>12} {fmt(r['kv_mb_full']):>7} | {r['anchor_slots']:>12}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, args, out.with_suffix(".png"))
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, b in enumerate(args.batches):
        sel = [r for r in rows if r["batch"] == b]
        color = f"C{i}"
        for key, style, label in (
            ("decode_anchor", "-o", "anchor"),
            ("decode_full", "--s", "full"),
            ("decode_hf", ":^", "HF transformers"),
        ):
            pts = [(r["length"], r[key]) for r in sel if r[key]]
            if pts:
                ax1.plot(*zip(*pts), style, color=color, label=f"{label}, batch {b}")
        for key, style in (("kv_mb_anchor", "-o"), ("kv_mb_full", "--s")):
            pts = [(r["length"], r[key]) for r in sel if r[key]]
            if pts:
                ax2.plot(*zip(*pts), style, color=color, label=f"{key[6:]}, batch {b}")
    for ax, title in ((ax1, "decode tokens/s"), (ax2, "KV cache MB (decode buffer)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M fp32 on CPU: anchor vs full KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
